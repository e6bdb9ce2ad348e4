"""The Ray executor of tasks.corpus.parallel: one Ray task per unit of work, on a Ray cluster.

run_on_ray(address, pending, fn, finish, errors, bar, through_store)
  address   runtime.ray_address: "auto", "host:port" (the cluster's GCS), "ray://host:port" (Ray
            Client), or None: a Ray on this machine, started on first use and kept for the life of
            this process (like the local pool).
  pending   the units without a marker, each submitted as ray.remote(fn).remote(unit.args),
            largest first; Ray's scheduler runs as many at once as the cluster has CPUs (one CPU
            per unit). fn is pickled by reference: every node must import this project (the same
            version).
  Store     a local store.root: units read and write under the stage's working directory, which
            must then be a folder mounted at the same path on every node. An object-store root
            (s3://..., any fsspec URL): units never see this machine's paths. Each runs through
            run_through_store on its worker: the unit's args are rewritten so that every path
            under this process's working directory points into a scratch folder of the worker's
            own, and every path under this process's download cache (<home>/cache/<stage>/<key>/..,
            upstream artifact files) is fetched by the worker from the store into its own cache;
            the files of the stage's working directory named after the unit (`_work/*/<unit>.*`,
            an earlier phase's per-unit output) and those its args list under "inputs" (paths
            relative to the working directory: what a unit reads of other units' output, e.g.
            dedup's partitions) are fetched from the store's partial work too, into a folder of
            the unit's own (two units on one node never share, nor delete, each other's copies).
            The unit's files are uploaded to `<root>/<stage>/<key>.partial/` and removed from the
            worker; finish then copies them here (ArtifactDir.fetch_progress). Each worker needs
            credentials for the store in its own environment (AWS_*, ...): none are sent.
            through_store = store_context(out, pending) says all this (None: a local root). A
            worker's cache keeps the upstream files for the next units (checked by size; the
            driver verified the artifact); deleting it is always safe.
  finish    called here, in the driver, with each unit's result as it arrives: it makes the
            unit's files durable (or fetches them, above) and writes its marker, exactly as with
            the local executor, so a driver killed mid-stage resumes from the same markers.
  Retries   a unit whose worker process or node dies, or that Ray's memory monitor stops, is run
            again by Ray, up to MAX_RETRIES times (max_retries; and task_oom_retries, which
            connect() sets since Ray's default is endless); its
            files are written under temporary names and renamed, so a retried unit writes the
            same bytes. An exception raised by fn is not retried: it is the unit's error.
  Fails     every failing unit named in `errors` (the caller raises); Ray's out-of-memory kill
            and an unreachable cluster become SlmErrors that name the setting to change, and so
            does a worker that cannot read or write the store (store.root, its credentials).
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from storage.errors import SlmError

PROBE_SECONDS = 5
MAX_RETRIES = 3  # reruns of a unit whose worker or node died (Ray's own retry)
_lock = threading.Lock()
_connected: tuple[bool, str | None] = (False, None)  # (connected by us, to which address)


def _ray():
    try:
        import ray
    except ImportError:
        raise SlmError("runtime.executor is ray but Ray is not installed: pip install 'slm[ray]' "
                       "(or set runtime.executor: local)") from None
    return ray


def _probe(address: str) -> None:
    """Fail in seconds on a host:port (or ray://host:port) where nothing listens: ray.init itself
    retries for over a minute before it gives up."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise OSError(f"{address!r} is not host:port")
    with socket.create_connection((host, int(port)), timeout=PROBE_SECONDS):
        pass


def connect(address: str | None):
    """Connect this process to the Ray cluster at `address` (see the module doc); returns ray."""
    global _connected
    # A task killed by Ray's memory monitor is retried without end by default (task_oom_retries
    # -1): a unit too large for its node would be killed and rerun forever. The owner of the
    # tasks, this process, counts those retries: as many as for any other death, then the
    # unit fails with OutOfMemoryError, named below. (Read from the environment when Ray starts
    # its core worker here; a value the user set is kept.)
    os.environ.setdefault("RAY_task_oom_retries", str(MAX_RETRIES))
    ray = _ray()
    with _lock:
        if ray.is_initialized() and _connected == (True, address):
            return ray
        if ray.is_initialized():
            ray.shutdown()  # connected elsewhere (another profile's address)
        try:
            if address not in (None, "auto"):
                _probe(address)
            if address is None:
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as err:  # noqa: BLE001 - ConnectionError, RuntimeError, gRPC errors alike
            raise SlmError(
                f"runtime.ray_address={address!r}: cannot connect to a Ray cluster there "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Start the "
                f"cluster (`ray start --head` on its head node), or fix runtime.ray_address (auto, "
                f"host:port, ray://host:port; leave it out for a Ray on this machine), or set "
                f"runtime.executor: local") from None
        _connected = (True, address)
        return ray


def shutdown() -> None:
    """Disconnect (and stop a Ray this process started); a later run connects again."""
    global _connected
    ray = _ray()
    with _lock:
        if ray.is_initialized():
            ray.shutdown()
        _connected = (False, None)


def _unit_error(ray, name: str, err: BaseException) -> BaseException:
    """What a failed Ray task means for the user: fn's own exception, or what to change."""
    if isinstance(err, ray.exceptions.OutOfMemoryError):
        return SlmError(
            f"Ray stopped the worker running {name} for lack of memory: give the Ray nodes more "
            f"memory or make the units smaller (e.g. stages.extract.shard_mb); finished units are "
            f"kept. Ray said: {str(err).splitlines()[0]}")
    if isinstance(err, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.TaskUnschedulableError, ray.exceptions.ActorDiedError)):
        return SlmError(
            f"the Ray worker running {name} died {MAX_RETRIES + 1} times ({type(err).__name__}). A worker "
            f"killed by the system is most often out of memory (the kernel's OOM killer, outside Ray's own "
            f"memory monitor): give the Ray nodes more memory, or make the units smaller (e.g. "
            f"stages.extract.shard_mb), or run fewer at once per node (`ray start --num-cpus`); finished "
            f"units are kept, run the stage again")
    if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        return err.cause  # fn's own exception, e.g. an SlmError naming the bad record
    return err


# --- units on a remote store ------------------------------------------------------------------
def store_context(out, pending: list) -> dict[str, Any] | None:
    """What run_through_store needs to know of this driver (None for a local store.root)."""
    store = out.store
    if store.is_local:
        return None
    scratch = out.path / "_work"
    named: dict[str, list[str]] = {}
    if scratch.is_dir():
        for path in scratch.rglob("*"):
            if path.is_file():
                named.setdefault(path.name.split(".", 1)[0], []).append(path.relative_to(out.path).as_posix())
    fetch = {u.name: sorted(set(named.get(u.name, [])) | set(u.args.get("inputs", []))) for u in pending}
    # What the units fetch must be in the store's partial work: upload what is not there yet
    # (e.g. shard's pass-1 buckets, written here without save_progress).
    partial = store.partial_path(out.stage, out.key)
    store.fs.invalidate_cache(partial)
    there = {name.rstrip("/"): info.get("size") for name, info in
             (store.fs.find(partial, detail=True) if store.fs.exists(partial) else {}).items()}
    for rel in sorted({rel for rels in fetch.values() for rel in rels}):
        if there.get(f"{partial}/{rel}") != (out.path / rel).stat().st_size:
            out.save_progress(rel)
    return {"root": store.root, "stage": out.stage, "key": out.key, "out": str(out.path),
            "cache": str(store.home / "cache"), "fetch": fetch}


def _worker_dir() -> Path:
    """This worker's scratch folder: the node's temp dir (SLM_WORKER_DIR if the node sets it)."""
    return Path(os.environ.get("SLM_WORKER_DIR") or Path(tempfile.gettempdir()) / f"slm-worker-{os.getuid()}")


def _get(fs, remote: str, local: Path, size: int | None = None) -> None:
    """remote -> local (temp name, then rename), unless local already has the remote's size."""
    if local.exists() and local.stat().st_size == (fs.size(remote) if size is None else size):
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f"{local.name}.{os.getpid()}.fetch")
    fs.get_file(remote, str(tmp))
    os.replace(tmp, local)


def run_through_store(fn: Callable[[dict], dict], args: dict, ctx: dict) -> dict:
    """Run one unit on a worker of another machine, reading and writing through the store (module doc)."""
    from storage.artifacts import ArtifactStore
    from storage.keys import short

    home = _worker_dir()
    work = home / "work" / ctx["stage"] / f"{short(ctx['key'])}.partial" / ctx["unit"]
    name = ctx["unit"]
    try:
        store = ArtifactStore(ctx["root"], home)
        partial = store.partial_path(ctx["stage"], ctx["key"])
        for rel in ctx["fetch"]:
            _get(store.fs, f"{partial}/{rel}", work / rel)

        def localize(value):
            if isinstance(value, dict):
                return {k: localize(v) for k, v in value.items()}
            if isinstance(value, list):
                return [localize(v) for v in value]
            if isinstance(value, str):
                if value == ctx["out"] or value.startswith(ctx["out"] + "/"):
                    return str(work) + value[len(ctx["out"]):]
                if value.startswith(ctx["cache"] + "/"):
                    rel = value[len(ctx["cache"]) + 1:]  # <stage>/<key16>/<file>: a committed artifact's file
                    _get(store.fs, f"{store.fs_root}/{rel}", home / "cache" / rel)
                    return str(home / "cache" / rel)
            return value

        local_args = localize(args)
        work.mkdir(parents=True, exist_ok=True)
    except Exception as err:  # noqa: BLE001 - reading the store: credentials, network, a missing bucket
        raise _store_error(ctx["root"], f"read {name}'s input", err) from None
    result = fn(local_args)
    try:
        for rel in result.get("files", []):
            store.fs.put_file(str(work / rel), f"{partial}/{rel}")
    except Exception as err:  # noqa: BLE001
        raise _store_error(ctx["root"], f"upload {name}'s files", err) from None
    shutil.rmtree(work, ignore_errors=True)  # the unit's files are in the store; its fetched inputs go too
    return result


def _store_error(root: str, what: str, err: BaseException) -> SlmError:
    return SlmError(
        f"a Ray worker on {socket.gethostname()} could not {what} through store.root {root} "
        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Every Ray node needs access to "
        f"the store in its own environment (for S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an instance "
        f"role, AWS_ENDPOINT_URL for an S3-compatible server), or set store.root to a folder every node mounts")


def run_on_ray(address: str | None, pending: list, fn: Callable[[dict], dict], finish: Callable,
               errors: list, bar, through_store: dict | None = None) -> None:
    """through_store: store_context(out, pending) for an object-store root, else None."""
    ray = connect(address)
    ordered = sorted(pending, key=lambda u: -int(u.args.get("size", 0)))
    options = {"num_cpus": 1, "max_retries": MAX_RETRIES, "retry_exceptions": False}
    if through_store is None:
        remote = ray.remote(**options)(fn)
        running = {remote.options(name=f"slm:{u.name}").remote(u.args): u for u in ordered}
    else:
        remote = ray.remote(**options)(run_through_store)
        fn_ref = ray.put(fn)
        running = {remote.options(name=f"slm:{u.name}").remote(
            fn_ref, u.args, {**{k: v for k, v in through_store.items() if k != "fetch"},
                             "fetch": through_store["fetch"][u.name], "unit": u.name}): u for u in ordered}
    try:
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                unit = running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - reported with its unit
                    errors.append((unit.name, _unit_error(ray, unit.name, err)))
                else:
                    try:
                        finish(unit, result)
                    except Exception as err:  # noqa: BLE001
                        errors.append((unit.name, err))
                bar.update(1)
    except BaseException:
        for ref in running:  # interrupted: units not started yet never start
            ray.cancel(ref, force=False)
        raise
