"""Helpers for the corpus stage tests: a profile file, and the real runner up to a stage."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from profiles.loader import load_profile
from tasks.registry import select
from tasks.runner import compute_keys, open_store, open_tracker, run_stage, upstream_manifests

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TANG = DATA / "corpus" / "tang-traditional"
WIKI = DATA / "wiki" / "enwiki-pages-articles-sample.xml.bz2"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared test data sits beside the checkout, not in it)")
    return path


def write_profile(folder: Path, sources: dict, stages: dict | None = None, workers: int = 1,
                  tracking: bool = False, name: str = "corpus-test", root: str | None = None) -> Path:
    data = {"description": "corpus stage test", "runtime": {"workers": workers},
            "tracking": {"enabled": tracking}, "sources": sources}
    if root:
        data["store"] = {"root": root}
    if stages:
        data["stages"] = stages
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def run_until(profile_path: Path, until: str, overrides: list[str] | None = None):
    """Run every stage up to `until` with tasks.runner.run_stage; returns (manifests, store)."""
    profile = load_profile(str(profile_path), overrides)
    store = open_store(profile)
    tracker = open_tracker(profile)
    keys = compute_keys(profile)
    made = {}
    for stage in select(until=until):
        inputs = upstream_manifests(stage, store, keys, made)
        made[stage.name] = run_stage(stage, profile, inputs, store, tracker)
    return made, store


def artifact_dir(store, manifest) -> Path:
    return Path(store.fs_root) / manifest.stage / manifest.key[:16]


def read_docs(store, manifest) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for entry in manifest.files_under("docs"):
        rows.extend(pq.read_table(store.local_path(manifest, entry.path)).to_pylist())
    return rows
