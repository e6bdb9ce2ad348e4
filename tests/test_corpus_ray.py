"""runtime.executor ray: the corpus stages on a real local Ray cluster (a head and a second worker
node, one CPU each, on 127.0.0.1) write the same files as the local executor, with the store in a
folder or in an S3 bucket (moto's server), and with a worker killed mid-stage; a unit whose worker
dies is rerun by Ray; a driver killed with kill -9 resumes from the unit markers; a wrong address,
a worker killed at every attempt, a unit stopped by Ray's memory monitor and a store the workers
cannot write fail naming what to change."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
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
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def cluster(moto_endpoint, tmp_path_factory):
    """Two nodes whose environment holds credentials for moto's S3 (as a cluster's nodes would for
    their bucket) and a scratch folder for the units that run through the store."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in S3_ENV.items():
            env.setenv(name, value)
        env.setenv("AWS_ENDPOINT_URL", moto_endpoint)
        scratch = tmp_path_factory.mktemp("ray-workers")
        env.setenv("SLM_WORKER_DIR", str(scratch))
        made = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        made.add_node(**NODE)
        made.worker_dir = scratch
    try:
        made.wait_for_nodes(timeout=120)
        yield made
    finally:
        ray_units.shutdown()
        made.shutdown()


@contextlib.contextmanager
def killing_one_unit(cluster):
    """SIGKILL the first worker of this cluster seen running one of our units (Ray titles a worker
    process `ray::<task name>` while it runs a task, and our units are named `slm:<unit>`; the
    cluster's processes carry its SLM_WORKER_DIR, so another test session's Ray is left alone);
    yields the list that receives the killed unit's title."""
    killed: list[str] = []
    stop = threading.Event()
    ours = f"SLM_WORKER_DIR={cluster.worker_dir}".encode()

    def hunt():
        while not stop.is_set() and not killed:
            for proc in Path("/proc").iterdir():
                try:
                    title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
                    if not title.startswith("ray::slm:"):
                        continue
                    environ = (proc / "environ").read_bytes().split(b"\0")
                except (OSError, ValueError):
                    continue
                if ours in environ:
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append(title)
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=hunt, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        stop.set()
        thread.join(timeout=10)


def test_corpus_stages_on_two_ray_nodes_write_the_same_files_as_local(tmp_path, cluster, s3):
    """extract -> shard with the local executor, and on the two Ray nodes with the store in an S3
    bucket (moto's server) and one unit's worker SIGKILLed mid-stage: the units read their inputs
    from the bucket and upload their files to it, never this machine's paths; Ray reruns the killed
    unit; both runs write the same files. (Ray with the store in a shared folder is the same code
    path minus the transfers: the unit tests below use it.)"""
    sources = corpus(tmp_path)
    found = {}
    for run, root in {"local": str(tmp_path / "store-local"), "ray": s3.url("store")}.items():
        profile = write_profile(tmp_path, sources, workers=1, name=run, root=root, stages={
            "extract": {"shard_mb": 0.3}, "tokenizer": {"vocab_size": 512, "sample_chars": 100_000},
            "shard": {"shard_mb": 0.05, "val_fraction": 0.05}})
        if run == "local":
            found[run], _ = run_until(profile, "shard", ["runtime.executor=local"])
            continue
        with killing_one_unit(cluster) as killed:
            found[run], _ = run_until(profile, "shard", ["runtime.executor=ray", f"runtime.ray_address={cluster.address}"])
        assert killed, "no unit was seen running"
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2  # the run was on the two-node cluster
    for stage in (*STAGES, "tokenizer", "shard"):
        local, on_ray = found["local"][stage], found["ray"][stage]
        assert local.key == on_ray.key, stage  # neither executor nor store is part of the cache key
        files = {f.path: f.sha256 for f in local.files if not f.path.startswith("report.")}
        assert files == {f.path: f.sha256 for f in on_ray.files if not f.path.startswith("report.")}, stage
        assert local.counts == on_ray.counts and local.dropped == on_ray.dropped, stage
        assert sum(1 for path in files if path.startswith(("docs/", "train/"))) >= 4 or stage == "tokenizer", stage
    assert found["ray"]["dedup"].extra["dedup"] == found["local"]["dedup"].extra["dedup"]
    # every unit's files went through the bucket (the partial work, deleted at commit): the
    # workers' scratch folders hold nothing of them any more, their caches the upstream files
    scratch = cluster.worker_dir
    assert sorted(p.name for p in (scratch / "work").iterdir()) == ["clean", "dedup", "extract", "normalize", "shard",
                                                                    "tokenizer"]
    assert not [p for p in (scratch / "work").rglob("*") if p.is_file()]
    assert {p.name for p in (scratch / "cache").iterdir()} == {"download", "extract", "normalize", "clean", "dedup",
                                                               "tokenizer"}  # the tokenizer's and shard's units read these
    assert not [k for k in s3.keys("store/") if ".partial/" in k]


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


def unit_killed_by_the_system(args: dict) -> dict:
    """What the kernel's OOM killer does to a worker: SIGKILL, at every attempt."""
    os.kill(os.getpid(), signal.SIGKILL)
    return {"files": []}


def test_a_unit_whose_worker_is_killed_at_every_attempt_fails_naming_what_to_change(tmp_path, cluster):
    """A worker SIGKILLed at each of its 4 attempts (what the kernel's OOM killer leaves, outside
    Ray's own memory monitor): the stage fails naming the memory and the unit size to change."""
    store = ArtifactStore(str(tmp_path / "store"), tmp_path)
    out = store.begin("units-test", "6" * 64, executor="ray", ray_address=cluster.address)
    with pytest.raises(SlmError, match=r"u0: the Ray worker running u0 died 4 times .*memory.*stages.extract.shard_mb"):
        run_units(out, "phase", [Unit("u0", {"name": "u0"})], unit_killed_by_the_system, "units")
    assert not (out.path / "_work" / "phase" / "u0.json").exists()


def unit_that_outgrows_its_node(args: dict) -> dict:
    """Touches 256 MiB more every 50 ms, up to args["gib"] GiB, then gives it all back."""
    import numpy as np

    blocks = []
    for _ in range(4 * args["gib"]):
        blocks.append(np.ones(2**25))  # 256 MiB of float64, every page written
        time.sleep(0.05)
    return {"files": []}


def _memory_used_fraction(extra: int = 0) -> float:
    """(MemTotal - MemAvailable + extra) / MemTotal: how Ray's memory monitor measures a node
    outside a memory cgroup."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total, available = (int(info[k].split()[0]) * 1024 for k in ("MemTotal", "MemAvailable"))
    return (total - available + extra) / total


def test_a_unit_that_outgrows_its_node_is_stopped_by_rays_memory_monitor_and_named(tmp_path):
    """Ray's own out-of-memory kill, for real: a one-node cluster whose memory monitor acts at
    what this machine uses now plus 1.5 GiB (Ray's default, 95%, is out of reach of a test on a
    shared machine) runs a unit that grows to 6 GiB. The monitor stops it at every attempt; the
    stage fails within seconds (not after Ray's endless default of retries) naming the unit and
    what to change, and leaves no marker."""
    threshold = _memory_used_fraction(3 * 2**29)
    if threshold > 0.8:
        pytest.skip(f"this machine already uses {_memory_used_fraction():.0%} of its memory")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_memory_usage_threshold", f"{threshold:.4f}")
        env.setenv("RAY_memory_monitor_refresh_ms", "100")
        node = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        node.wait_for_nodes(timeout=120)
        store = ArtifactStore(str(tmp_path / "store"), tmp_path)
        out = store.begin("units-test", "9" * 64, executor="ray", ray_address=node.address)
        clock = time.monotonic()
        with pytest.raises(SlmError, match=r"u0: Ray stopped the worker running u0 for lack of memory: give the Ray "
                                           r"nodes more memory or make the units smaller \(e.g. stages.extract.shard_mb\)"):
            run_units(out, "phase", [Unit("u0", {"name": "u0", "gib": 6})], unit_that_outgrows_its_node, "units")
        assert time.monotonic() - clock < 120
        assert not (out.path / "_work" / "phase" / "u0.json").exists()
    finally:
        ray_units.shutdown()
        node.shutdown()


def unit_that_writes_a_file(args: dict) -> dict:
    path = Path(args["out"]) / f"{args['name']}.txt"
    path.write_text("made on a worker", encoding="utf-8")
    return {"files": [path.name]}


def test_a_worker_that_cannot_write_the_store_fails_naming_store_root(tmp_path, cluster, s3):
    """The bucket in store.root does not exist: the worker's upload fails, the stage fails naming
    store.root and what every node needs; no marker, nothing in any bucket."""
    root = f"s3://{s3.bucket}-typo/artifacts"
    out = ArtifactStore(root, tmp_path).begin("units-test", "7" * 64, executor="ray", ray_address=cluster.address)
    with pytest.raises(SlmError, match=f"u0: a Ray worker on .* could not upload u0's files through store.root "
                                       f"{root} .*Every Ray node needs access to the store"):
        run_units(out, "phase", [Unit("u0", {"name": "u0", "out": str(out.path)})], unit_that_writes_a_file, "units")
    assert not (out.path / "_work" / "phase" / "u0.json").exists()
    assert f"{s3.bucket}-typo" not in [b["Name"] for b in s3.client.list_buckets()["Buckets"]]


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
