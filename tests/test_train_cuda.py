"""The engine on a CUDA GPU, as a GPU run uses it: torch.compile on (the default there), document-masked
flex attention, validation files, periodic and final evaluation, resume after kill -9.

The CPU suite cannot see what broke here before: evaluation compiles a no-grad graph of its own next to
the training graph, and on an H200 (torch 2.11) that graph's fused attention kernel crashed the process
at the end of every run with validation files (tasks/train/evaluator.py, `eval_grad_mode`). SFT and DPO run
the same way in tests/test_sft.py and tests/test_dpo.py. On the GPU box:

    python -m pytest -q tests/test_train_cuda.py tests/test_sft.py tests/test_dpo.py -k cuda
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import ModelConfig, Transformer
from tasks.shard_reader import ShardReader
from tasks.train.data import PackedBatches, ValidationRows
from tasks.train import checkpoint as ckpt
from tasks.train.data import to_device
from tasks.train.engine import autocast_context, train, TrainConfig
from tasks.train.metrics import read_metrics
from tasks.train.objectives import CausalLM
from tests.test_train_resume import assert_kill_9_then_resume_is_identical, shards  # noqa: F401 (a fixture)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compile, flex attention); "
                                "run on a GPU box: python -m pytest -q tests/test_train_cuda.py")
pytestmark = needs_cuda

SEQ = 256
# head_dim 96 and QK-norm as zh-64m (the shape that crashed), small enough to compile in seconds
SHAPE = dict(vocab_size=320, hidden_size=384, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=96,
             intermediate_size=1024, max_seq_len=SEQ)


def test_compiled_evaluation_matches_eager(tmp_path, shards):  # noqa: F811
    """The engine's compiled evaluation after compiled training steps (the step that crashed) scores
    the validation rows as eager evaluation of the saved weights does, within bf16 noise."""
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=3, seq_len=SEQ, micro_batch=8, lr=1e-3, compile=True)
    val = lambda: ValidationRows(ShardReader(shards["validation"], shuffle=False, loop=False), SEQ, 1, 100_000)  # noqa: E731
    train_rows = PackedBatches(ShardReader(shards["train"], seed=0, shuffle=True, loop=True), SEQ)
    result = train(cfg, lambda: Transformer(ModelConfig(**SHAPE)), CausalLM(), train_rows, val())

    device = torch.device("cuda")
    model = Transformer(ModelConfig(**SHAPE))
    model.load_state_dict(ckpt.load_weights(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")))
    model.to(device).eval()
    nats, count, rows = 0.0, 0, val()
    with torch.no_grad(), autocast_context(cfg, device):
        for batch in rows.batches(8):
            count += CausalLM().count(batch)
            nats += CausalLM().loss(model, to_device(batch, device))["sum"].double().item()
    eager = nats / count
    assert 0 < eager < 10 and abs(result["val"]["val_loss"] - eager) / eager < 1e-2


def write_run(out: Path, shards, **train) -> Path:  # noqa: F811
    out.mkdir()
    spec = {"train": dict(out_dir=str(out), steps=12, seq_len=SEQ, micro_batch=8, global_batch=16, lr=1e-3,
                          warmup_steps=2, log_every=1, keep_last=3, **train),
            "model": {"config": SHAPE},
            "data": {"train": shards["train"], "validation": shards["validation"], "eos_id": 1, "eval_tokens": 20_000}}
    (out / "run.json").write_text(json.dumps(spec))
    return out


def assert_compiled_runs_evaluate_and_resume(make_run, steps: int, max_loss: float) -> None:
    """Two identical compiled runs with eval_every 4 and ckpt_every 0 (`make_run(name, **train)` -> run
    dir): one straight, one killed with SIGKILL after two checkpoints and started again. Both end
    where the other ends, with an eval record at step 4 and at the end, each after its checkpoint.
    The final compiled evaluation agrees with an eager one of the same checkpoint within bf16 noise."""
    runs = [make_run(name, eval_every=4, ckpt_every=0) for name in ("straight", "killed")]
    assert assert_kill_9_then_resume_is_identical(*runs, exact=False, timeout=300) == 8
    for out in runs:
        records = read_metrics(out / "metrics.jsonl")
        evals = {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}
        assert {4, steps} <= set(evals) and all(0 < v < max_loss for v in evals.values())
        assert set(evals) <= {r["step"] for r in records if r["kind"] == "checkpoint"}  # the checkpoint came first
    compiled, eager = final_eval(runs[0]), evaluate_final_checkpoint_eagerly(runs[0], steps)
    assert abs(compiled - eager) / eager < 1e-2, (compiled, eager)


def final_eval(out: Path) -> float:
    return [r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"][-1]


def evaluate_final_checkpoint_eagerly(out: Path, steps: int) -> float:
    """A copy of a finished run without its final eval record, run again with compile off: the engine
    resumes at the final checkpoint and only evaluates, eagerly (tasks/train/engine.py)."""
    eager = out.with_name(out.name + "-eager")
    shutil.copytree(out, eager)
    spec = json.loads((eager / "run.json").read_text())
    spec["train"].update(out_dir=str(eager), compile=False)
    (eager / "run.json").write_text(json.dumps(spec))
    kept = [r for r in read_metrics(eager / "metrics.jsonl") if not (r["kind"] == "eval" and r["step"] == steps)]
    (eager / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    done = subprocess.run([sys.executable, "-m", "tasks.train.engine", "--config", str(eager / "run.json")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return final_eval(eager)


def test_pretraining_with_validation_evaluates_and_resumes_after_kill_9(tmp_path, shards):  # noqa: F811
    """Compiled training with eval_every and a final evaluation, killed with SIGKILL and resumed."""
    assert_compiled_runs_evaluate_and_resume(lambda name, **train: write_run(tmp_path / name, shards, **train), 12, 10)
