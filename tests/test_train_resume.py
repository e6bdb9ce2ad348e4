"""The engine as a real child process: exact resume after kill -9, SIGTERM, launcher stops (CPU)."""
from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tasks.train import checkpoint as ckpt
from tasks.train.engine import EXIT_STOPPED
from tasks.train.metrics import read_metrics
from tasks.processes import alive
from tasks.train.launch import run_engine

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Token shards in the shard stage's format; documents of varied length (some longer than a row)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("shards")
    paths = {}
    for split, n in (("train", 300), ("validation", 20)):
        docs = []
        for _ in range(n):  # a little structure to learn: runs of rising tokens
            start, length = rng.integers(2, 300), rng.integers(4, 120)
            docs.append([int(2 + (start + i) % 318) for i in range(length)] + [1])
        path = root / f"{split}-00000.parquet"
        pq.write_table(pa.table({"input_ids": pa.array(docs, type=pa.list_(pa.uint16()))}), path, row_group_size=64)
        paths[split] = [str(path)]
    return paths


def write_config(tmp_path, shards, name, steps=30, **train) -> Path:
    out = tmp_path / name
    out.mkdir()
    settings = dict(out_dir=str(out), steps=steps, seq_len=64, micro_batch=4, global_batch=8, lr=3e-3,
                    warmup_steps=3, log_every=1, ckpt_every=5, keep_last=3, eval_every=10,
                    deterministic=True, threads=1)
    spec = {
        "train": {**settings, **train},
        "model": {"config": TINY},
        "data": {"train": shards["train"], "validation": shards["validation"], "eos_id": 1, "eval_tokens": 2000},
    }
    path = out / "run.json"
    path.write_text(json.dumps(spec))
    return path


def write_job(out: Path, model: dict, data: dict, objective: dict, **train) -> Path:
    """A run dir holding an engine job (run.json) for the fine-tuning tests: 16 steps of 8 rows of 64
    tokens, a checkpoint every 4, `train` overriding any of it."""
    out.mkdir()
    defaults = dict(out_dir=str(out), steps=16, seq_len=64, micro_batch=4, global_batch=8, log_every=1,
                    ckpt_every=4, keep_last=3)
    spec = {"train": {**defaults, **train}, "model": model, "data": data, "objective": objective}
    (out / "run.json").write_text(json.dumps(spec))
    return out


class EngineProcess(subprocess.Popen):
    """The engine on a run.json, its stdout and stderr appended to engine.stdout / engine.stderr beside
    it; `communicate` returns what this process wrote there. Not pipes: a pipe nobody reads while the
    test waits for checkpoints fills at 64 KiB, and a child that prints more (inductor's dump of a
    failed compile) blocks on it forever instead of exiting with its error."""

    def __init__(self, config: Path, **kw):
        self.logs = [config.parent / "engine.stdout", config.parent / "engine.stderr"]
        self.offsets = [p.stat().st_size if p.exists() else 0 for p in self.logs]
        with open(self.logs[0], "ab") as out, open(self.logs[1], "ab") as err:
            super().__init__([sys.executable, "-m", "tasks.train.engine", "--config", str(config)], cwd=ROOT,
                             stdout=out, stderr=err, **kw)

    def communicate(self, input=None, timeout=None):
        self.wait(timeout)
        return tuple(p.read_bytes()[at:].decode(errors="replace") for p, at in zip(self.logs, self.offsets))


def engine(config: Path, **kw) -> EngineProcess:
    return EngineProcess(config, **kw)


def wait_for(predicate, timeout=60.0, every=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    raise TimeoutError("condition not met in time")


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if r["kind"] == "train"}


def assert_kill_9_then_resume_is_identical(straight: Path, killed: Path, exact: bool = True, timeout: float = 50) -> int:
    """Run the engine on two identical run dirs (run.json in each): one straight through, the other
    SIGKILLed once it holds two checkpoints, then started again. Asserts equal per-step losses and
    final weights: bit for bit when `exact` (CPU, deterministic), else within bf16 noise (CUDA:
    compiled kernels may sum in another order). Returns the step the killed run resumed from."""
    p_straight = engine(straight / "run.json")
    p = engine(killed / "run.json")
    wait_for(lambda: len(ckpt.list_checkpoints(killed / "checkpoints")) >= 2 or p.poll() is not None, timeout=timeout)
    p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=10)
    assert p.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err}"
    latest = ckpt.latest_checkpoint(killed / "checkpoints")
    assert latest is not None
    resumed = engine(killed / "run.json")
    _, err = resumed.communicate(timeout=timeout)
    assert resumed.returncode == 0, err
    _, err = p_straight.communicate(timeout=timeout)
    assert p_straight.returncode == 0, err
    a = load_file(ckpt.latest_checkpoint(straight / "checkpoints") / "model.safetensors")
    b = load_file(ckpt.latest_checkpoint(killed / "checkpoints") / "model.safetensors")
    if exact:
        assert losses(killed) == losses(straight)
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        want, got = losses(straight), losses(killed)
        assert sorted(got) == sorted(want)
        np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], rtol=2e-2)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=5e-2, atol=5e-3)
    return ckpt.checkpoint_step(latest)


def test_kill_9_then_resume_is_bitwise_identical(tmp_path, shards):
    straight_cfg = write_config(tmp_path, shards, "straight")
    straight = engine(straight_cfg)  # runs beside the killed one (one thread each)
    cfg = write_config(tmp_path, shards, "killed")
    out = cfg.parent
    first = engine(cfg)
    wait_for(lambda: (out / "checkpoints" / "step_00000005").is_dir() or first.poll() is not None)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(losses(out))
    assert killed_at < 30
    second = engine(cfg)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    _, err = straight.communicate(timeout=120)
    assert straight.returncode == 0, err

    records = read_metrics(out / "metrics.jsonl")
    resumed = [r for r in records if r["kind"] == "resume"]
    assert len(resumed) == 1 and 5 <= resumed[0]["step"] < 30
    want, got = losses(straight_cfg.parent), losses(out)
    assert sorted(got) == list(range(1, 31))
    assert got == want  # per-step losses, bit for bit (JSON round-trips floats exactly)
    assert want[30] < want[1] - 0.5  # and it did learn
    a = load_file(str(ckpt.step_dir(straight_cfg.parent / "checkpoints", 30) / "model.safetensors"))
    b = load_file(str(ckpt.step_dir(out / "checkpoints", 30) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = lambda d: [(r["step"], r["val_loss"]) for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "eval"]  # noqa: E731
    assert evals(out) == evals(straight_cfg.parent)
    rates = [r["tokens_per_s"] for r in read_metrics(straight_cfg.parent / "metrics.jsonl") if r["kind"] == "train"]
    assert max(rates) < 20 * statistics.median(rates)  # an evaluation step's rate is over its step's own time


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, shards):
    cfg = write_config(tmp_path, shards, "term", steps=400, ckpt_every=50, eval_every=0)
    out = cfg.parent
    proc = engine(cfg)
    wait_for(lambda: len(losses(out)) >= 3 or proc.poll() is not None, every=0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_STOPPED, err
    assert "Traceback" not in err and "stopped (SIGTERM)" in err
    end = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "end"][-1]
    assert end["stopped"] == "SIGTERM" and 3 <= end["step"] < 400
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert ckpt.checkpoint_step(latest) == end["step"]  # the stop step itself was saved, not an older one
    assert ckpt.load_trainer(latest)["reason"] == "stop: SIGTERM"
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_launcher_stops_the_child_when_the_stage_fails(tmp_path, shards):
    """An exception in the stage process (e.g. Prefect cancelling the task) SIGTERMs the engine's group."""
    cfg = write_config(tmp_path, shards, "cancel", steps=2000, ckpt_every=0, eval_every=0, log_every=5)
    out = cfg.parent

    class Cancelled(Exception):
        pass

    def on_poll():
        if losses(out):
            raise Cancelled()

    with pytest.raises(Cancelled):
        run_engine(cfg, out, on_poll=on_poll, poll_seconds=0.1, log_path=out / "engine.log")
    assert not alive(int((out / "engine.pid").read_text()))
    end = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "end"][-1]
    assert end["stopped"] == "SIGTERM"
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(out / "checkpoints")) == end["step"]


def test_engine_stops_when_the_stage_process_dies(tmp_path, shards):
    """kill -9 of the stage process: the orphaned engine notices, checkpoints and exits."""
    cfg = write_config(tmp_path, shards, "orphan", steps=5000, ckpt_every=0, eval_every=0, log_every=5)
    out = cfg.parent
    stage = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tasks.train.launch import run_engine; "
         f"run_engine({str(cfg)!r}, {str(out)!r}, log_path={str(out / 'engine.log')!r})"],
        cwd=ROOT,
    )
    wait_for(lambda: len(losses(out)) >= 1, every=0.05)
    stage.kill()
    stage.wait(timeout=10)
    pid = int((out / "engine.pid").read_text())
    wait_for(lambda: not alive(pid), timeout=30, every=0.1)
    end = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "end"][-1]
    assert end["stopped"] == "parent exited" and end["step"] < 5000
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(out / "checkpoints")) == end["step"]


@pytest.mark.parametrize("eval_every", [5, 0], ids=["periodic-eval", "final-eval"])
def test_a_failed_evaluation_costs_no_training(tmp_path, shards, eval_every):
    """A validation file the model cannot read (token ids beyond its vocabulary) fails the evaluation
    only. The checkpoint of that step is already written, the error names both, and once the file is
    fixed a new run resumes there: the final evaluation alone is not retrained for."""
    val = tmp_path / "val.parquet"
    bad = [[400, 401, 402, 1]] * 20  # the tiny model's vocabulary is 320
    pq.write_table(pa.table({"input_ids": pa.array(bad, type=pa.list_(pa.uint16()))}), val)
    cfg = write_config(tmp_path, {**shards, "validation": [str(val)]}, "run", steps=10, eval_every=eval_every,
                       ckpt_every=0, log_every=1)
    out = cfg.parent
    failed = engine(cfg)
    _, err = failed.communicate(timeout=120)
    at = eval_every or 10
    assert failed.returncode != 0
    assert f"evaluation at step {at} failed" in err and f"checkpointed at step {at}" in err
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(out / "checkpoints")) == at

    val.write_bytes(Path(shards["validation"][0]).read_bytes())  # the user fixes the validation file
    again = engine(cfg)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "resume"] == [at]
    assert sorted(losses(out)) == list(range(1, 11))  # every step trained once: none lost, none repeated
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10]


def test_stop_flag_close_leaves_no_watch_thread():
    """close() ends the parent-watch thread before it returns: a watch thread left running dropped
    the last reference to the process group during interpreter shutdown and aborted a DDP rank."""
    import threading

    from tasks.train.engine import Dist, StopFlag

    flag = StopFlag(Dist())
    assert any(t.name == "parent-watch" for t in threading.enumerate())
    flag.close()
    assert not any(t.name == "parent-watch" for t in threading.enumerate())
