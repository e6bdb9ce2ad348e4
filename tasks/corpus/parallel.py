"""Per-shard work in a process pool, resumable shard by shard.

run_units(out, phase, units, fn, desc) -> {unit name: result}
  units   a list of Unit(name, args) in a stable order. The plan must not depend on the
          number of workers, so a restart with other settings finds the same units. args["size"]
          (bytes, optional) lets the pool start the largest units first.
  fn      a top-level function fn(args) -> dict (JSON-able), safe to run in a fresh process
          (forkserver). It writes its own files under the artifact directory (temp name, then
          rename) and lists them, relative to the artifact directory, in result["files"].
  Resume  when a unit finishes, its files are made durable (out.save_progress) and then its
          result is written to `_work/<phase>/<name>.json` (the marker, last). A restarted
          stage with the same key skips every unit that has a marker and reuses its result.
  Workers out.workers processes (forkserver: no fork of a threaded parent; the server
          preloads the heavy imports once, so each stage's pool starts fast). One worker, or
          one pending unit, runs in this process.
  Memory  one unit's working set per worker; results are small dicts.
  Fails   after the units already running have finished (their work is kept), with every
          failing unit named.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable

from tqdm import tqdm

from storage.errors import SlmError

# Imported once by the forkserver, so that every worker it forks starts with them loaded
# (pandas too: pyarrow imports it, ~0.4 s, the first time it converts a Python list).
PRELOAD = ["numpy", "pandas", "pyarrow.parquet", "pyarrow.compute", "xxhash", "zhconv", "ijson", "mwparserfromhell",
           "tasks.corpus.documents", "tasks.corpus.text", "tasks.corpus.readers", "tasks.corpus.wikitext",
           "tasks.corpus.minhash", "tasks.extract", "tasks.normalize", "tasks.clean", "tasks.dedup"]
_context = None


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

    def finish(unit: Unit, result: dict) -> None:
        for rel in result.get("files", []):
            out.save_progress(rel)
        rel = marker_rel(phase, unit.name)
        path = out.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
        out.save_progress(rel)
        results[unit.name] = result

    bar = tqdm(total=len(units), initial=len(units) - len(pending), desc=desc, unit="shard")
    errors: list[tuple[str, BaseException]] = []
    try:
        workers = min(max(1, int(getattr(out, "workers", 1))), len(pending))
        if workers <= 1:
            for unit in pending:
                finish(unit, fn(unit.args))
                bar.update(1)
        else:
            # Largest units first, so that no worker is left with a big one at the end.
            pending.sort(key=lambda u: -int(u.args.get("size", 0)))
            with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
                running = {pool.submit(fn, unit.args): unit for unit in pending}
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
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
    finally:
        bar.close()
    if errors:
        if all(isinstance(err, SlmError) for _, err in errors):
            raise SlmError("; ".join(f"{name}: {err}" for name, err in errors))
        raise errors[0][1]
    return {name: results[name] for name in names}


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
