"""Kill -9 `slm run` (flow `slm`) in the middle of a stage, run it again: completed work is
not recomputed and the killed stage continues from its partial state.

The run is a real `slm run` subprocess (Prefect ephemeral mode, MLflow on SQLite) over a
profile with `local` sources, two `http` sources served by tests/http_server.py (one fast,
one throttled so the kill lands mid-transfer) and an `hf` source served by the same server
impersonating the Hugging Face hub (HF_ENDPOINT), with an HF_TOKEN that must never be
written anywhere.

Parametrized over the artifact root: a local path, and s3://bucket/artifacts on moto (with
Prefect's result storage on s3:// too). For S3 the local work and cache dirs are deleted
between kill and rerun, as on a fresh machine: finished files come back from the remote
`<key>.partial/`, not from the network.

Later stages: the helpers are stage-generic. Killing, say, `clean` after `download` committed
is, with the same profile and server:

    pipe = Pipeline(profile, env, tmp_path, until="clean")
    before = kill_mid_stage(pipe, "clean", lambda: any(pipe.work_dir("clean").rglob("*")), log1)
    seen = len(http_server.requests)
    after = run_to_end(pipe, log2)
    assert_resumed(before, after, "clean", pipe.until)   # download..normalize: same manifests
    assert http_server.requests[seen:] == []             # nothing downloaded again
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from flows.cli import main as slm
from profiles.loader import load_profile
from storage.artifacts import ArtifactStore
from storage.keys import short
from storage.manifest import MANIFEST_NAME, Manifest
from tasks.registry import all_stages, select
from tasks.runner import compute_keys, open_store, run_stage

MiB = 1 << 20
SLOW_BYTES = 6 * MiB
SLOW_RATE = 512 * 1024  # ~12 s for the slow file: the kill lands in the middle
READY_TIMEOUT = 120  # Prefect's ephemeral server starts in ~10 s; this bounds the whole first run
RUN_TIMEOUT = 150
TOKEN = "hf_TESTtokenDoNotStore_7f3a9c1e"


# --- a `slm run` subprocess and the store as the test sees it --------------------------------
@dataclass
class Pipeline:
    profile: Path
    env: dict[str, str]
    cwd: Path
    until: str | None = None  # `slm run --until`: the last stage this pipeline runs

    @property
    def loaded(self):
        return load_profile(str(self.profile))

    def store(self) -> ArtifactStore:
        return open_store(self.loaded)

    def keys(self) -> dict[str, str]:
        return compute_keys(self.loaded)

    def manifests(self) -> dict[str, Manifest]:
        """Committed manifests of this profile's stages (read fresh from the store)."""
        store, found = self.store(), {}
        store.fs.invalidate_cache()
        for stage, key in self.keys().items():
            manifest = store.load_manifest(stage, key)
            if manifest is not None:
                found[stage] = manifest
        return found

    def work_dir(self, stage: str) -> Path:
        """The local directory where a running stage keeps its partial work."""
        store = self.store()
        key = self.keys()[stage]
        if store.is_local:
            return Path(store._partial(stage, key))
        return Path(os.environ["SLM_HOME"]) / "work" / stage / (short(key) + ".partial")

    def start(self, log: Path) -> subprocess.Popen:
        script = Path(sys.executable).with_name("slm")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]
        with open(log, "wb") as sink:
            until = ["--until", self.until] if self.until else []
            return subprocess.Popen([*command, "run", "--profile", str(self.profile), *until], cwd=self.cwd,
                                    env=self.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run and everything it started (Prefect's server): no cleanup code runs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"slm run exited ({proc.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            kill_group(proc)
            pytest.fail(f"no {what} within {timeout} s:\n{tail(log)}")
        time.sleep(0.1)


def kill_mid_stage(pipe: Pipeline, stage: str, ready: Callable[[], bool], log: Path) -> dict[str, Manifest]:
    """Start `slm run`, wait until `ready()` (the stage has partial work), kill -9 it.

    Returns the manifests committed at the moment of the kill; asserts `stage` is not one of them.
    """
    proc = pipe.start(log)
    try:
        wait_until(proc, ready, READY_TIMEOUT, f"partial work in stage {stage}", log)
    finally:
        kill_group(proc)
    before = pipe.manifests()
    assert stage not in before, f"the kill came too late: {stage} had already committed"
    return before


def run_to_end(pipe: Pipeline, log: Path) -> dict[str, Manifest]:
    proc = pipe.start(log)
    try:
        proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"slm run did not finish within {RUN_TIMEOUT} s:\n{tail(log)}")
    assert proc.returncode == 0, tail(log)
    return pipe.manifests()


def assert_resumed(before: dict[str, Manifest], after: dict[str, Manifest], killed: str, until: str | None) -> None:
    """Stages committed before the kill are reused unchanged (same manifest: same files and
    finished_at); the killed stage and every stage after it up to `until` are committed now."""
    for stage, manifest in before.items():
        assert after[stage] == manifest, f"{stage} was recomputed (finished_at {manifest.finished_at} -> {after[stage].finished_at})"
    order = [stage.name for stage in select(until=until)]
    for stage in order[order.index(killed):]:
        assert stage in after, f"{stage} did not commit after the rerun"


# --- the test ------------------------------------------------------------------------------------
HUB_FILES = {"data/part-0.jsonl": '{"text": "今天天气很好"}\n' * 2000, "data/part-1.jsonl": '{"text": "我们去公园"}\n' * 3000}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_and_rerun(artifact_root, http_server, make_profile, tmp_path, slm_home, capsys, request):
    remote = artifact_root.startswith("s3://")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("北京欢迎你\n" * 100, encoding="utf-8")
    (corpus / "b.txt").write_text("上海的夜景\n" * 100, encoding="utf-8")
    small = "一二三四五六七八九十\n".encode() * 3000
    slow = random.Random(7).randbytes(SLOW_BYTES)
    fast_url = http_server.add("/fast/small.txt", small)
    slow_url = http_server.add("/slow/big.bin", slow, rate=SLOW_RATE)
    for name, text in HUB_FILES.items():
        http_server.add_hf("acme/zh-corpus", name, text.encode())
    store = {"root": artifact_root}
    if remote:
        store["results"] = request.getfixturevalue("s3").url("results")
    profile = make_profile({
        "store": store,
        "stages": {"download": {"parallel": 4, "retries": 2, "backoff_seconds": 0.2, "timeout_seconds": 30}},
        "sources": {
            "notes": {"kind": "local", "path": str(corpus), "format": "lines"},
            "fast": {"kind": "http", "url": fast_url, "sha256": hashlib.sha256(small).hexdigest()},
            "slow": {"kind": "http", "url": slow_url, "sha256": hashlib.sha256(slow).hexdigest()},
            "hub": {"kind": "hf", "repo": "acme/zh-corpus", "files": ["data/part-*.jsonl"], "format": "jsonl"},
        },
    }, "resume")
    env = {**os.environ, "HF_ENDPOINT": http_server.base, "HF_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    pipe = Pipeline(profile, env, tmp_path, until="download")  # later stages need formats these files lack
    finished = ["notes/a.txt", "notes/b.txt", "fast/small.txt", "hub/data/part-0.jsonl", "hub/data/part-1.jsonl"]
    key = pipe.keys()["download"]

    def download_half_done() -> bool:
        work = pipe.work_dir("download")
        part = work / "slow" / "big.bin.part"
        if not (all((work / rel).exists() for rel in finished) and part.exists() and part.stat().st_size >= MiB):
            return False
        if remote:  # finished files must have reached the remote partial before the kill
            have = set(request.getfixturevalue("s3").keys(f"artifacts/download/{short(key)}.partial/"))
            return all(f"artifacts/download/{short(key)}.partial/{rel}" in have for rel in finished)
        return True

    # 1. Kill -9 in the middle of download.
    before = kill_mid_stage(pipe, "download", download_half_done, tmp_path / "run1.log")
    part = pipe.work_dir("download") / "slow" / "big.bin.part"
    have = part.stat().st_size
    mtimes = {rel: (pipe.work_dir("download") / rel).stat().st_mtime_ns for rel in finished}
    assert MiB <= have < SLOW_BYTES and part.read_bytes() == slow[:have]
    capsys.readouterr()
    assert slm(["stages", "--profile", str(profile)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["download", short(key), "partial"]
    if remote:  # a fresh machine: nothing local survives, only the remote partial
        for name in ("work", "cache"):
            shutil.rmtree(slm_home / name, ignore_errors=True)

    # 2. Run again, full speed.
    http_server.update("/slow/big.bin", rate=None)
    seen = len(http_server.requests)
    after = run_to_end(pipe, tmp_path / "run2.log")
    assert_resumed(before, after, "download", pipe.until)
    again = http_server.requests[seen:]

    # Finished files were not fetched again (local: still on disk; S3: from the remote partial);
    # the hub's file listing is asked again (the glob is resolved at each run).
    assert {r.path for r in again if r.path != "/slow/big.bin"} <= {"/api/datasets/acme/zh-corpus/tree/main"}
    manifest = after["download"]
    for rel in finished:
        assert manifest.extra["files"][rel] == {"resumed": "kept"}
    if not remote:  # the very files written before the kill were committed, not rewritten
        committed = Path(pipe.store()._dir("download", key))
        assert {rel: (committed / rel).stat().st_mtime_ns for rel in finished} == mtimes
    # The killed transfer continued from its partial file (S3: the .part was local, so from 0).
    (resumed,) = [r for r in again if r.path == "/slow/big.bin"]
    if remote:
        assert (resumed.range_start, resumed.status, resumed.sent) == (None, 200, SLOW_BYTES)
    else:
        assert (resumed.range_start, resumed.status, resumed.sent) == (have, 206, SLOW_BYTES - have)
    assert manifest.file("slow/big.bin").sha256 == hashlib.sha256(slow).hexdigest()
    assert manifest.file("hub/data/part-1.jsonl").size == len(HUB_FILES["data/part-1.jsonl"].encode())
    assert manifest.mlflow_run_id and manifest.counts["files"] == 6

    if remote:
        s3 = request.getfixturevalue("s3")
        assert f"artifacts/download/{short(key)}/{MANIFEST_NAME}" in s3.keys("artifacts/")
        assert not [k for k in s3.keys("artifacts/") if ".partial/" in k]
        assert s3.keys("results/"), "Prefect persisted no result to s3://.../results"
        assert json.loads(s3.get(f"artifacts/download/{short(key)}/{MANIFEST_NAME}"))["key"] == key

    # 3. A run with the same profile is now pure reuse: same manifest, not one request.
    seen = len(http_server.requests)
    profile_now = pipe.loaded
    assert run_stage(all_stages()["download"], profile_now, {}, open_store(profile_now), None) == manifest
    assert len(http_server.requests) == seen

    # 4. The token reached the hub, and nothing the run wrote contains it.
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in http_server.requests)
    assert_secret_absent(TOKEN.encode(), [slm_home, Path(env["PREFECT_HOME"]), tmp_path / "run1.log", tmp_path / "run2.log"])
    if remote:
        s3 = request.getfixturevalue("s3")
        for name in s3.keys():
            assert TOKEN.encode() not in s3.get(name), f"s3://{s3.bucket}/{name} contains HF_TOKEN"


def assert_secret_absent(secret: bytes, places: list[Path]) -> None:
    checked = 0
    for place in places:
        for path in [place] if place.is_file() else sorted(p for p in place.rglob("*") if p.is_file()):
            assert secret not in path.read_bytes(), f"{path} contains HF_TOKEN"
            checked += 1
    assert checked >= 3  # the manifest, mlflow.db and the logs at least
