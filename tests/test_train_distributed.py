"""DDP and FSDP2 through torchrun (2 CPU processes, gloo) train like one process, and their
checkpoints resume across parallel modes and process counts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tasks.train import checkpoint as ckpt
from tasks.train.metrics import read_metrics
from tasks.train.launch import engine_command

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("dist-shards")
    docs = []
    for _ in range(300):
        start, length = rng.integers(2, 300), rng.integers(4, 120)
        docs.append([int(2 + (start + i) % 318) for i in range(length)] + [1])
    schema = pa.list_(pa.uint16())
    pq.write_table(pa.table({"input_ids": pa.array(docs, type=schema)}), root / "train.parquet", row_group_size=64)
    pq.write_table(pa.table({"input_ids": pa.array(docs[:20], type=schema)}), root / "val.parquet")
    return root


def run(shards: Path, out: Path, steps: int, nproc: int, parallel: str = "ddp") -> None:
    out.mkdir(exist_ok=True)
    spec = {
        "train": dict(out_dir=str(out), steps=steps, seq_len=64, micro_batch=2, global_batch=8, lr=3e-3,
                      schedule="constant", warmup_steps=2, log_every=1, ckpt_every=0, eval_every=0, threads=1,
                      parallel=parallel),
        "model": {"config": TINY},
        "data": {"train": [str(shards / "train.parquet")], "validation": [str(shards / "val.parquet")],
                 "eos_id": 1, "eval_tokens": 2000},
    }
    (out / "run.json").write_text(json.dumps(spec))
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPUs, also on a GPU box
    done = subprocess.run(engine_command(out / "run.json", nproc), cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=cpu_only)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def test_fsdp_then_ddp_resume_matches_one_process(shards, tmp_path):
    run(shards, tmp_path / "single", steps=10, nproc=1)
    mixed = tmp_path / "mixed"
    run(shards, mixed, steps=5, nproc=2, parallel="fsdp")  # sharded; the checkpoint is gathered whole
    run(shards, mixed, steps=10, nproc=2, parallel="ddp")  # resumes it under DDP
    resume = [r for r in read_metrics(mixed / "metrics.jsonl") if r["kind"] == "resume"]
    assert [r["step"] for r in resume] == [5]
    want, got = losses(tmp_path / "single"), losses(mixed)
    assert len(got) == len(want) == 10
    np.testing.assert_allclose(got, want, rtol=2e-5)  # same batches, same updates; only float sums differ
    a = load_file(str(ckpt.step_dir(tmp_path / "single" / "checkpoints", 10) / "model.safetensors"))
    b = load_file(str(ckpt.step_dir(mixed / "checkpoints", 10) / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5)
    # each rank saved its own RNG states
    assert {p.name for p in ckpt.step_dir(mixed / "checkpoints", 10).glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}


PROBE = """
import gc, sys
import torch
import torch.distributed as dist
from tasks.train.engine import main
code = main(["--config", sys.argv[1]])
alive = [type(o).__name__ for o in gc.get_objects() if isinstance(o, torch.nn.Module) and "FSDP" in type(o).__name__]
print(f"exit code {code}; process group left {dist.is_initialized()}; FSDP modules alive {alive}")
"""


def test_the_engine_frees_the_sharded_model_and_its_process_group_before_exit(shards, tmp_path):
    """The rare abort at the end of a 2-process run: the FSDP model outlived train() in reference
    cycles, holding gloo's process group until interpreter exit, whose teardown then killed the
    process. When the engine's main returns, nothing of the sharded model is left alive."""
    out = tmp_path / "fsdp"
    out.mkdir()
    spec = {"train": dict(out_dir=str(out), steps=3, seq_len=64, micro_batch=2, global_batch=8, lr=3e-3,
                          log_every=1, ckpt_every=0, eval_every=0, threads=1, parallel="fsdp"),
            "model": {"config": TINY}, "data": {"train": [str(shards / "train.parquet")], "eos_id": 1}}
    (out / "run.json").write_text(json.dumps(spec))
    (tmp_path / "probe.py").write_text(PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "probe.py"), str(out / "run.json")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("exit code 0; process group left False; FSDP modules alive []") == 2, done.stdout
