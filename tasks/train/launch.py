"""Run the engine in a child process (torchrun for several processes) and watch it.

    code = run_engine(config_path, workdir, nproc=1, on_poll=upload_new_checkpoints)

The child runs `python -m tasks.train.engine --config <json>` (or
`python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.train.engine ...`,
or, on one of several nodes (runtime.nnodes > 1), torchrun's static rendezvous:
`--nnodes M --node-rank K --master-addr HOST --master-port PORT`, HOST:PORT being
runtime.rdzv_endpoint, where node 0's torchrun listens) in a session of its own (start_new_session=True): a terminal's Ctrl-C or a
signal to the stage's process group does not reach it directly; this module
decides. Its pid is written to `<workdir>/engine.pid`.

Stopping it: `stop(proc)` sends SIGTERM to the child's process group (the
engine saves a checkpoint and exits with status 143; torchrun forwards it to
its workers), waits `grace_seconds`, then SIGKILLs the group. `run_engine`
does this whenever it leaves early: an exception (Prefect cancelling the task,
KeyboardInterrupt, a failing on_poll), SIGTERM to the stage process when
`run_engine` runs on the main thread (it is turned into an exception), and
interpreter exit (atexit). `stop_all()` stops every child this process
started, for a flow's on_cancellation / on_crashed hooks. If the stage process
dies without any of that (kill -9), the engine notices its parent is gone
(SLM_PARENT_PID) within a second, checkpoints and exits.

A restart of the stage first stops a child left over from an earlier stage
process (found by engine.pid, checked by its command line), so two trainers
never write the same checkpoints.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tasks.processes import alive

_RUNNING: dict[int, subprocess.Popen] = {}
_LOCK = threading.Lock()
PID_FILE = "engine.pid"


@dataclass(frozen=True)
class Nodes:
    """Where this node stands among the training nodes (profile: runtime.nnodes, runtime.node_rank,
    runtime.rdzv_endpoint "host:port" of node 0). Every node runs `nproc` processes."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    def torchrun_args(self) -> list[str]:
        if self.nnodes <= 1:
            return ["--standalone"]
        host, _, port = (self.rdzv_endpoint or "").rpartition(":")
        return [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", f"--master-addr={host}",
                f"--master-port={port}"]


def engine_command(config_path: Path, nproc: int = 1, nodes: Nodes = Nodes()) -> list[str]:
    engine = ["-m", "tasks.train.engine", "--config", str(config_path)]
    if nproc <= 1 and nodes.nnodes <= 1:
        return [sys.executable, *engine]
    return [sys.executable, "-m", "torch.distributed.run", *nodes.torchrun_args(), f"--nproc-per-node={nproc}",
            *engine]


JOIN_FILE = "torchrun-nodes.json"  # node 0 writes it beside run.json: what nodes K > 0 join (tasks/train/nodes.py)


def pid_file(nodes: Nodes = Nodes()) -> str:
    return PID_FILE if nodes.node_rank == 0 else f"engine-node{nodes.node_rank}.pid"


def _project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(_project_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["SLM_PARENT_PID"] = str(os.getpid())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _is_engine(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"tasks.train.engine" in cmdline


def stop_leftover(workdir: Path, grace_seconds: float = 60.0, nodes: Nodes = Nodes()) -> bool:
    """Stop an engine still running from an earlier stage process (per engine.pid). True if one was."""
    path = Path(workdir) / pid_file(nodes)
    if not path.exists():
        return False
    try:
        pid = int(path.read_text().strip())
    except ValueError:
        return False
    if not (alive(pid) and _is_engine(pid)):
        return False
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        _signal_group(pid, signal.SIGKILL)
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the child leads its own session, so its pgid is its pid
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen, grace_seconds: float = 60.0) -> int:
    """SIGTERM the child's process group, wait up to grace_seconds, then SIGKILL it. Returns its status."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    with _LOCK:
        _RUNNING.pop(proc.pid, None)
    return proc.returncode


def stop_all(grace_seconds: float = 60.0) -> None:
    """Stop every engine child this process started (for flow cancel / crash hooks)."""
    with _LOCK:
        procs = list(_RUNNING.values())
    for proc in procs:
        stop(proc, grace_seconds)


atexit.register(stop_all)


class _Terminated(Exception):
    pass


def run_engine(
    config_path: Path,
    workdir: Path,
    nproc: int = 1,
    on_poll: Callable[[], None] | None = None,
    poll_seconds: float = 2.0,
    grace_seconds: float = 60.0,
    log_path: Path | None = None,
    nodes: Nodes = Nodes(),
) -> int:
    """Start the engine, wait for it (calling on_poll every poll_seconds), return its exit status.

    0 = finished, 143 = stopped after a checkpoint (engine.EXIT_STOPPED), other = failed.
    stdout/stderr go to log_path if given (appended), else to this process's own.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stop_leftover(workdir, grace_seconds, nodes)
    if nodes.nnodes > 1 and nodes.node_rank == 0:  # written anew by every attempt: the others join each one
        join = {"config": str(config_path), "nproc": nproc, "nnodes": nodes.nnodes, "rdzv_endpoint": nodes.rdzv_endpoint}
        (workdir / (JOIN_FILE + ".tmp")).write_text(json.dumps(join))
        os.replace(workdir / (JOIN_FILE + ".tmp"), workdir / JOIN_FILE)
    out = open(log_path, "ab") if log_path else None
    proc = subprocess.Popen(
        engine_command(config_path, nproc, nodes), cwd=str(_project_root()), env=_env(), start_new_session=True,
        stdout=out, stderr=subprocess.STDOUT if out else None,
    )
    with _LOCK:
        _RUNNING[proc.pid] = proc
    (workdir / pid_file(nodes)).write_text(str(proc.pid))
    previous = None
    if threading.current_thread() is threading.main_thread():
        def _raise(signum, frame):
            raise _Terminated(f"signal {signal.Signals(signum).name}")

        previous = signal.signal(signal.SIGTERM, _raise)
    try:
        while True:
            try:
                proc.wait(timeout=poll_seconds)
                break
            except subprocess.TimeoutExpired:
                pass
            if on_poll:
                on_poll()
        if on_poll:
            on_poll()
        return proc.returncode
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        stop(proc, grace_seconds)
        if out:
            out.close()
