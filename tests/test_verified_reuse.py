"""A cache hit counts only after the artifact verifies, through the real flow `slm` (Prefect's cache
included): truncate a committed file and run again; the run reports it, moves the artifact aside,
recomputes it, says so in its log and on the stage's MLflow run, and exits 0."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main as slm
from profiles.loader import load_profile
from storage.keys import short
from tasks.runner import compute_keys, open_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_truncated_artifact_is_never_a_cache_hit(slm_home, tmp_path, make_profile):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(f"第{i}行：春眠不觉晓，处处闻啼鸟。\n" for i in range(400)), encoding="utf-8")
    path = make_profile({"sources": {"notes": {"kind": "local", "path": str(corpus), "format": "lines"}}}, "trust")
    profile = load_profile(str(path))
    keys = compute_keys(profile)
    store = open_store(profile)

    assert slm(["run", "--profile", str(path), "--until", "extract"]) == 0
    first = store.load_manifest("extract", keys["extract"])
    (shard,) = [e for e in first.files if e.path.startswith("docs/")]
    target = Path(store._dir("extract", first.key)) / shard.path
    target.write_bytes(target.read_bytes()[: shard.size // 2])

    # The second run is a separate process, as a user's would be: Prefect's cache has the manifest.
    slm_bin = Path(sys.executable).with_name("slm")
    done = subprocess.run([str(slm_bin), "run", "--profile", str(path), "--until", "extract"], cwd=tmp_path,
                          env=os.environ.copy(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert f"extract/{short(first.key)} is broken and will be recomputed" in log
    assert f"{target} has {shard.size // 2} bytes, its manifest says {shard.size}" in " ".join(log.split())

    second = store.load_manifest("extract", keys["extract"])
    store.verify(second)
    assert second.finished_at >= first.finished_at and second.mlflow_run_id != first.mlflow_run_id
    assert [(e.path, e.sha256) for e in second.files if e.path.startswith("docs/")] == [(shard.path, shard.sha256)]
    assert store.load_manifest("download", keys["download"]).mlflow_run_id is not None  # reused, untouched
    (moved,) = [p for p in (Path(store.fs_root) / "extract").iterdir() if ".broken-" in p.name]
    assert (moved / shard.path).stat().st_size == shard.size // 2  # kept as it was, not deleted
    assert str(target) in (moved / "_BROKEN.txt").read_text()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{slm_home / 'mlflow.db'}")
    run = client.get_run(second.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert f"{target} has {shard.size // 2} bytes" in run.data.tags["slm.repaired"]
    assert "slm.repaired" not in client.get_run(first.mlflow_run_id).data.tags
