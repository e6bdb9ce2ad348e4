"""runtime.executor ray: the corpus stages on a real local Ray cluster (a head and a second worker
node, one CPU each, on 127.0.0.1) write the same files as the local executor; a unit whose worker
dies is rerun by Ray; a wrong address fails in seconds naming the setting."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

# Every Ray process of these tests on 127.0.0.1: Ray binds its nodes to the machine's network address
# unless its "single machine" mode is on, which this switch turns on (read when ray is imported, and
# inherited by the node and worker processes the cluster starts).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from corpus_support import run_until, write_profile
from storage.artifacts import ArtifactStore
from storage.errors import SlmError
from tasks.corpus import ray_units
from tasks.corpus.parallel import Unit, run_units
from test_corpus_parallel import STAGES, corpus

# The unit functions below live in this test module, which Ray's workers cannot import (pytest
# put tests/ on this process's path only): ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}


@pytest.fixture(scope="module")
def cluster():
    made = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        made.add_node(**NODE)
        made.wait_for_nodes(timeout=120)
        yield made
    finally:
        ray_units.shutdown()
        made.shutdown()


def test_corpus_stages_on_two_ray_nodes_write_the_same_files_as_local(tmp_path, cluster):
    sources = corpus(tmp_path)
    found = {}
    for executor in ("local", "ray"):
        profile = write_profile(tmp_path, sources, stages={"extract": {"shard_mb": 0.3}}, workers=1,
                                name=executor, root=str(tmp_path / f"store-{executor}"))
        overrides = [f"runtime.executor={executor}"]
        if executor == "ray":
            overrides.append(f"runtime.ray_address={cluster.address}")
        found[executor], _ = run_until(profile, "dedup", overrides)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2  # the run was on the two-node cluster
    for stage in STAGES:
        local, on_ray = found["local"][stage], found["ray"][stage]
        assert local.key == on_ray.key, stage  # the executor is not part of the cache key
        files = {f.path: f.sha256 for f in local.files if not f.path.startswith("report.")}
        assert files == {f.path: f.sha256 for f in on_ray.files if not f.path.startswith("report.")}, stage
        assert local.counts == on_ray.counts and local.dropped == on_ray.dropped, stage
        assert sum(1 for path in files if path.startswith("docs/")) >= 4, stage
    assert found["ray"]["dedup"].extra["dedup"] == found["local"]["dedup"].extra["dedup"]


def unit_whose_worker_dies_once(args: dict) -> dict:
    """Kills its own worker process the first time it runs (a flag file says it did), then
    writes its file like a stage's unit: temp name, then rename."""
    flag = Path(args["out"]) / f"{args['name']}.died"
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pass
    else:
        os.close(fd)
        os._exit(1)
    path = Path(args["out"]) / f"{args['name']}.txt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"unit {args['name']} pid {os.getpid()}", encoding="utf-8")
    os.replace(tmp, path)
    return {"files": [path.name], "pid": os.getpid()}


def test_a_unit_whose_worker_dies_is_rerun_by_ray_and_its_marker_written(tmp_path, cluster):
    store = ArtifactStore(str(tmp_path / "store"), tmp_path)
    out = store.begin("units-test", "2" * 64, executor="ray", ray_address=cluster.address)
    units = [Unit(f"u{i}", {"name": f"u{i}", "out": str(out.path)}) for i in range(3)]
    results = run_units(out, "phase", units, unit_whose_worker_dies_once, "units")
    assert sorted(results) == ["u0", "u1", "u2"]
    for unit in units:
        assert (out.path / f"{unit.name}.died").exists()  # the first attempt died ...
        assert (out.path / f"{unit.name}.txt").read_text(encoding="utf-8").startswith(f"unit {unit.name}")
        assert (out.path / "_work" / "phase" / f"{unit.name}.json").exists()  # ... the retry finished
    assert all(results[name]["pid"] != os.getpid() for name in results)  # ran on Ray's workers


def unit_that_raises(args: dict) -> dict:
    raise SlmError(f"bad record in {args['name']}")


def test_a_failing_unit_on_ray_is_named_with_its_own_error(tmp_path, cluster):
    store = ArtifactStore(str(tmp_path / "store"), tmp_path)
    out = store.begin("units-test", "3" * 64, executor="ray", ray_address=cluster.address)
    with pytest.raises(SlmError, match="u0: bad record in u0"):
        run_units(out, "phase", [Unit("u0", {"name": "u0"})], unit_that_raises, "units")
    assert not (out.path / "_work" / "phase" / "u0.json").exists()


def test_an_unreachable_ray_address_fails_in_seconds_naming_the_setting(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), tmp_path)
    out = store.begin("units-test", "4" * 64, executor="ray", ray_address="127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(SlmError, match="runtime.ray_address"):
        run_units(out, "phase", [Unit("u0", {"name": "u0"})], unit_that_raises, "units")
    assert time.monotonic() - started < 30


def unit_that_counts_its_runs(args: dict) -> dict:
    """Leaves one file per run (so a test can count reruns), takes a moment, then its output."""
    out = Path(args["out"])
    (out / f"ran-{args['name']}-{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(args.get("seconds", 0))
    return {"files": [], "name": args["name"]}


DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import ray
import test_corpus_ray as t
ray.cloudpickle.register_pickle_by_value(t)
from storage.artifacts import ArtifactStore
from tasks.corpus.parallel import Unit, run_units
store = ArtifactStore({root!r}, {home!r})
out = store.begin("units-test", "5" * 64, executor="ray", ray_address={address!r})
units = [Unit(f"u{{i}}", {{"name": f"u{{i}}", "out": str(out.path), "seconds": 2}}) for i in range(8)]
run_units(out, "phase", units, t.unit_that_counts_its_runs, "units")
"""


def test_a_stage_rerun_after_kill_9_of_its_driver_resumes_from_the_unit_markers(tmp_path, cluster):
    import signal
    import subprocess
    root, home = str(tmp_path / "store"), str(tmp_path)
    script = DRIVER.format(tests=str(Path(__file__).parent), root=root, home=home, address=cluster.address)
    driver = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    store = ArtifactStore(root, tmp_path)
    out = store.begin("units-test", "5" * 64, executor="ray", ray_address=cluster.address)
    markers = out.path / "_work" / "phase"
    deadline = time.monotonic() + 180
    while len(list(markers.glob("*.json"))) < 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    done_before = {p.stem for p in markers.glob("*.json")}
    assert 2 <= len(done_before) < 8, "the driver was killed mid-stage"
    units = [Unit(f"u{i}", {"name": f"u{i}", "out": str(out.path)}) for i in range(8)]
    results = run_units(out, "phase", units, unit_that_counts_its_runs, "units")
    assert sorted(results) == [f"u{i}" for i in range(8)]
    for name in done_before:  # a unit with a marker is not run again
        assert len(list(out.path.glob(f"ran-{name}-*"))) == 1, name
