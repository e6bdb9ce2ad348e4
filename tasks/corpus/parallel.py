"""Per-shard work in a process pool or on a Ray cluster, resumable shard by shard.

run_units(out, phase, units, fn, desc) -> {unit name: result}
  units   a list of Unit(name, args) in a stable order. The plan must not depend on the
          number of workers, so a restart with other settings finds the same units. args["size"]
          (bytes, optional) lets the pool start the largest units first.
  fn      a top-level function fn(args) -> dict (JSON-able), safe to run in a fresh process
          (forkserver) and in this one. It writes its own files under the artifact directory
          (temp name, then rename) and lists them, relative to the artifact directory, in
          result["files"]. Its files must depend only on args (not on which process ran it),
          so that every stage's output is the same whatever the number of workers.
  Resume  when a unit finishes, its files are made durable (out.save_progress) and then its
          result is written to `_work/<phase>/<name>.json` (the marker, last). A restarted
          stage with the same key skips every unit that has a marker and reuses its result.
  Executor out.executor: "local" (below) or "ray": every pending unit is a Ray task on the
          cluster at out.ray_address (tasks/corpus/ray_units.py); markers, resume and failures
          are the same, since both write them here, in the driver, through finish(). On an
          object-store root the units read and write through the store, not this machine's paths.
  Workers (local) out.workers processes in all: this process is one of them, the other
          out.workers - 1 are a pool kept for the life of this process and reused by every
          phase of every stage (forkserver: no fork of a threaded parent; the server preloads
          the heavy imports once, and the pool's workers keep what they loaded, e.g. the
          conversion tables). A pool worker that is free takes the largest unit left; this
          process takes the smallest, from the first moment (while the pool is still starting),
          so that neither waits on a process start nor idles while a unit waits in a queue.
          One worker, or one pending unit: all in this process. in_background() puts one more
          call (e.g. a plot) on a free pool worker beside a phase.
  Memory  one unit's working set per worker (this process included); results are small dicts.
  Fails   after the units already running have finished (their work is kept), with every
          failing unit named.
"""
from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import select
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable


from storage.errors import SlmError
from tasks.processes import alive
from tasks.progress import Progress

# Imported once by the forkserver, so that every worker it forks starts with them loaded
# (pandas too: pyarrow imports it, ~0.4 s, the first time it converts a Python list).
PRELOAD = ["numpy", "pandas", "pyarrow.parquet", "pyarrow.compute", "xxhash", "zhconv", "ijson", "mwparserfromhell",
           "tasks.corpus.documents", "tasks.corpus.text", "tasks.corpus.readers", "tasks.corpus.wikitext",
           "tasks.corpus.minhash", "tasks.stages.extract", "tasks.stages.normalize", "tasks.stages.clean", "tasks.stages.dedup"]
_context = None
_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_free: threading.Semaphore | None = None  # one permit per pool worker not running anything


@dataclass(frozen=True)
class Unit:
    name: str  # unique within the phase; used for the marker and output file names
    args: dict  # what fn needs (paths as strings); must pickle


def _pool_context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _exit_with_driver(driver: int) -> None:
    """Initializer of every pool worker: the worker ends when the driver (the process that made
    the pool) ends, however it ends. The pool's queues do not tell a worker that its driver died
    (each worker holds both ends of them), so a driver killed with SIGKILL left its workers, and
    their forkserver, waiting for work for good."""
    def watch() -> None:
        try:
            handle = os.pidfd_open(driver)  # readable once the driver has ended (Linux >= 5.3)
        except ProcessLookupError:
            os._exit(1)
        except (AttributeError, OSError):  # no pidfd here (macOS, older kernels): poll
            while alive(driver):
                time.sleep(1.0)
            os._exit(1)
        select.select([handle], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="slm-exit-with-driver", daemon=True).start()


def worker_pool(size: int) -> ProcessPoolExecutor:
    """The shared pool of `size` worker processes (started on first use, kept until exit)."""
    global _pool, _pool_size, _free
    if _pool is not None and (_pool_size != size or getattr(_pool, "_broken", False)):
        shutdown_pool()
    if _pool is None:
        _pool = ProcessPoolExecutor(max_workers=size, mp_context=_pool_context(),
                                    initializer=_exit_with_driver, initargs=(os.getpid(),))
        _pool_size, _free = size, threading.Semaphore(size)
    return _pool


def shutdown_pool(kill: bool = False) -> None:
    """Stop the shared pool's workers (a later run_units starts a new pool). kill: at once, even
    those running a unit (for a process that is ending: a unit writes its files under temporary
    names and its marker last, so one cut short leaves neither and runs again next time)."""
    global _pool, _pool_size
    if _pool is not None:
        if kill:
            # ProcessPoolExecutor has no public way to stop a running task; _processes is its
            # table of worker processes (the same from Python 3.8 to 3.13).
            for process in list((getattr(_pool, "_processes", None) or {}).values()):
                process.kill()
        _pool.shutdown(wait=True, cancel_futures=True)
    _pool, _pool_size = None, 0


atexit.register(shutdown_pool)


def _submit_when_free(pool: ProcessPoolExecutor, free: threading.Semaphore, fn, *args) -> Future:
    """Submit once a pool worker is free (the caller holds a permit of `free`), so that no task
    waits in the pool's queue behind another: whatever is not submitted can still go elsewhere."""
    try:
        future = pool.submit(fn, *args)
    except BaseException:
        free.release()
        raise
    future.add_done_callback(lambda _: free.release())
    return future


def in_background(out, fn: Callable, *args) -> Callable[[], Any]:
    """Start fn(*args) on a pool worker, beside the units that follow (out.workers > 1), and return
    a call that waits for its result; with one worker, executor ray (the cluster runs the units),
    or no pool worker free within a minute, fn runs in this process when that call is made. For a step off the critical path, e.g. a plot."""
    workers = max(1, int(getattr(out, "workers", 1)))
    if workers > 1 and getattr(out, "executor", "local") == "local":
        pool = worker_pool(workers - 1)
        free = _free
        if free.acquire(timeout=60):
            return _submit_when_free(pool, free, fn, *args).result
    return lambda: fn(*args)


def marker_rel(phase: str, name: str) -> str:
    return f"_work/{phase}/{name}.json"


def run_units(out, phase: str, units: list[Unit], fn: Callable[[dict], dict], desc: str) -> dict[str, dict]:
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ValueError(f"{phase}: unit names must be unique")
    results: dict[str, dict] = {}
    pending: list[Unit] = []
    for unit in units:
        marker = out.path / marker_rel(phase, unit.name)
        if marker.exists():
            results[unit.name] = json.loads(marker.read_text(encoding="utf-8"))
        else:
            pending.append(unit)

    remote_workers = None  # executor ray on an object-store root: the units' files arrive in the store

    def finish(unit: Unit, result: dict) -> None:
        for rel in result.get("files", []):
            if remote_workers is None:
                out.save_progress(rel)
            else:
                out.fetch_progress(rel)
        rel = marker_rel(phase, unit.name)
        path = out.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
        out.save_progress(rel)
        results[unit.name] = result

    # a bar on the terminal, a line in the run's log (Prefect task run's in a flow) at most every
    # 10 s, and the Prefect progress artifact of the stage
    bar = Progress(desc, len(units), unit="shard", initial=len(units) - len(pending))
    errors: list[tuple[str, BaseException]] = []
    try:
        workers = min(max(1, int(getattr(out, "workers", 1))), len(pending))
        if pending and getattr(out, "executor", "local") == "ray":
            from tasks.corpus.ray_units import run_on_ray, store_context  # Ray is imported only when asked for
            remote_workers = store_context(out, pending)
            run_on_ray(out.ray_address, pending, fn, finish, errors, bar, remote_workers)
        elif workers <= 1:
            for unit in pending:
                finish(unit, fn(unit.args))
                bar.update(1)
        else:
            _run_shared(pending, fn, workers - 1, finish, errors, bar)
    finally:
        bar.close()
    if errors:
        if all(isinstance(err, SlmError) for _, err in errors):
            raise SlmError("; ".join(f"{name}: {err}" for name, err in errors))
        raise errors[0][1]
    return {name: results[name] for name in names}


def _run_shared(pending: list[Unit], fn, pool_size: int, finish, errors: list, bar) -> None:
    """Run `pending` on the shared pool and in this process at once (see the module doc).

    A feeder thread hands the largest unit left to each pool worker that becomes free (its first
    submit waits while the pool starts); this thread runs the smallest unit left meanwhile. A unit
    goes to the pool only when a worker is free, so none waits there while this process idles."""
    # Largest units first, so that no worker is left with a big one at the end.
    units = deque(sorted(pending, key=lambda u: -int(u.args.get("size", 0))))
    lock = threading.Lock()
    stop = threading.Event()
    running: dict[Future, Unit] = {}
    pool = worker_pool(pool_size)
    free = _free

    def feed() -> None:
        while not stop.is_set():
            with lock:
                if not units:
                    return
            if not free.acquire(timeout=0.1):
                continue
            with lock:
                unit = units.popleft() if units else None
            if unit is None:
                free.release()
                return
            try:
                future = _submit_when_free(pool, free, fn, unit.args)
            except BaseException:  # noqa: BLE001 - no pool (shut down, broken): this process runs the rest
                with lock:
                    units.appendleft(unit)
                return
            with lock:
                running[future] = unit

    def take() -> Unit | None:
        with lock:
            return units.pop() if units else None

    def collect(done) -> None:
        for future in done:
            unit = running.pop(future)
            try:
                finish(unit, future.result())
            except BrokenProcessPool:
                errors.append((unit.name, SlmError(
                    f"a worker process died while running {unit.name}: out of memory (rerun with "
                    f"fewer runtime.workers or smaller shards; finished shards are kept), or a script "
                    f"calling the stage without `if __name__ == \"__main__\":` (workers import it)")))
            except BaseException as err:  # noqa: BLE001 - reported below, with its unit
                errors.append((unit.name, err))
            bar.update(1)

    def finished() -> list[Future]:
        with lock:
            return [f for f in running if f.done()]

    feeder = threading.Thread(target=feed, name="slm-pool-feeder", daemon=True)
    feeder.start()
    try:
        while (unit := take()) is not None:
            try:
                finish(unit, fn(unit.args))
            except Exception as err:  # noqa: BLE001 - reported with its unit, like the pool's
                errors.append((unit.name, err))
            bar.update(1)
            collect(finished())
        stop.set()
        feeder.join()
        while (unit := take()) is not None:  # put back by a feeder that found no pool
            try:
                finish(unit, fn(unit.args))
            except Exception as err:  # noqa: BLE001
                errors.append((unit.name, err))
            bar.update(1)
        while running:
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            collect(done)
    except BaseException as err:
        stop.set()
        with lock:
            units.clear()
        feeder.join()
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            shutdown_pool(kill=True)  # Ctrl-C or SIGTERM: the process ends now, not after its units
        else:
            wait(list(running))  # units already started finish: none writes after this returns
        raise


def merge_counts(target: dict[str, int], more: dict[str, Any]) -> dict[str, int]:
    for key, value in more.items():
        target[key] = target.get(key, 0) + int(value)
    return target


def shard_units(out, upstream, extra_args: dict) -> list[Unit]:
    """One unit per document shard (docs/*.parquet) of an upstream stage, named like the shard."""
    units = []
    for entry in upstream.files_under("docs"):
        name = entry.path[len("docs/"):].removesuffix(".parquet")
        path = out.local_input(upstream, entry.path)
        units.append(Unit(name, {"name": name, "path": str(path), "out": str(out.path), "size": entry.size,
                                 **extra_args}))
    return units
