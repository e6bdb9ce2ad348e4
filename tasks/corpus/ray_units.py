"""The Ray executor of tasks.corpus.parallel: one Ray task per unit of work, on a Ray cluster.

run_on_ray(address, pending, fn, finish, errors, bar)
  address   runtime.ray_address: "auto", "host:port" (the cluster's GCS), "ray://host:port" (Ray
            Client), or None: a Ray on this machine, started on first use and kept for the life of
            this process (like the local pool).
  pending   the units without a marker, each submitted as ray.remote(fn).remote(unit.args),
            largest first; Ray's scheduler runs as many at once as the cluster has CPUs (one CPU
            per unit). fn is pickled by reference: every node must import this project (the same
            version) and see the same paths as this process, since units read their input and
            write their files under the stage's local working directory (a folder mounted at the
            same path on every node; object-store URLs for remote workers are not built yet).
  finish    called here, in the driver, with each unit's result as it arrives: it makes the
            unit's files durable and writes its marker, exactly as with the local executor, so a
            driver killed mid-stage resumes from the same markers.
  Retries   a unit whose worker process or node dies is run again by Ray (max_retries); its
            files are written under temporary names and renamed, so a retried unit writes the
            same bytes. An exception raised by fn is not retried: it is the unit's error.
  Fails     every failing unit named in `errors` (the caller raises); Ray's out-of-memory kill
            and an unreachable cluster become SlmErrors that name the setting to change.
"""
from __future__ import annotations

import socket
import threading
from typing import Callable

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
        return SlmError(f"the Ray worker running {name} died {MAX_RETRIES + 1} times "
                        f"({type(err).__name__}); finished units are kept, run the stage again")
    if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        return err.cause  # fn's own exception, e.g. an SlmError naming the bad record
    return err


def run_on_ray(address: str | None, pending: list, fn: Callable[[dict], dict], finish: Callable,
               errors: list, bar) -> None:
    ray = connect(address)
    remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(fn)
    ordered = sorted(pending, key=lambda u: -int(u.args.get("size", 0)))
    running = {remote.options(name=f"slm:{u.name}").remote(u.args): u for u in ordered}
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
