"""Several GPUs of one host: the engine under torchrun (DDP or FSDP2) vs one GPU, same global batch.

    python benchmarks/scaling.py --shards DIR                    # 1 GPU, then every visible GPU
    python benchmarks/scaling.py --shards DIR --nprocs 1,2 --parallel ddp,fsdp

DIR is a shard artifact (benchmarks/pretrain.py --build-shards makes one). Each run is the
engine's own command line (tasks.train.launch.engine_command: `python -m torch.distributed.run
--standalone --nproc-per-node=N -m tasks.train.engine --config run.json`), the zh-64m shape, seq
512, a global batch of 256 rows split evenly over the processes (micro-batch 256 / N, no
accumulation), the same seed and data order, compiled, bf16 autocast.
The table: tokens/s after warm-up, speedup over one GPU, and the largest difference of the
training loss (mean over each --log-every steps) to the one-GPU run over the first --compare steps (the same rows go
through the same weights; only float summation order differs, so the curves agree to bf16 noise).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pretrain import SMOKE, ZH_64M  # noqa: E402
from tasks.train.metrics import read_metrics  # noqa: E402
from tasks.train.launch import engine_command  # noqa: E402


def run(name: str, shards: Path, nproc: int, parallel: str, steps: int, log_every: int, work: Path, smoke: bool) -> list[dict]:
    manifest = json.loads((shards / "_MANIFEST.json").read_text())
    files = [str(shards / s["path"]) for s in manifest["extra"]["shards"] if s["split"] == "train"]
    out = work / name
    spec = {
        "train": {"out_dir": str(out), "steps": steps, "seq_len": 64 if smoke else 512, "micro_batch": (8 if smoke else 256) // nproc,
                  "global_batch": 8 if smoke else 256, "lr": 1e-3, "warmup_steps": min(10, steps), "schedule": "constant",
                  "compile": not smoke, "parallel": parallel,
                  "log_every": log_every, "ckpt_every": 0, "keep_last": 1, "seed": 0},
        "model": {"config": {**(SMOKE if smoke else ZH_64M), "vocab_size": ZH_64M["vocab_size"]}},
        "data": {"train": files, "eos_id": int(manifest["extra"].get("eos_id", 0)), "seed": 0},
        "objective": {"name": "causal_lm"},
    }
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps(spec))
    start = time.perf_counter()
    subprocess.run(engine_command(out / "run.json", nproc), cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--nprocs", default="", help="comma-separated process counts (default: 1 and every visible GPU)")
    p.add_argument("--parallel", default="ddp", help="comma-separated: ddp, fsdp")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--compare", type=int, default=20, help="steps whose losses are compared with one GPU")
    p.add_argument("--log-every", type=int, default=5, help="steps per logged loss (each log is a host sync: "
                   "1 makes every step wait for the GPU and hides the data work less)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (gloo): checks the script")
    args = p.parse_args(argv)
    gpus = torch.cuda.device_count()
    nprocs = [int(x) for x in args.nprocs.split(",") if x.strip()] or sorted({1, max(gpus, 1)})
    work = Path(tempfile.mkdtemp(prefix="slm-scaling-"))
    runs = {}
    for parallel in [x.strip() for x in args.parallel.split(",") if x.strip()]:
        for n in nprocs:
            name = "1 gpu" if n == 1 else f"{n} gpus {parallel}"
            if name not in runs:
                runs[name] = (n, run(name.replace(" ", "-"), args.shards, n, parallel, args.steps, args.log_every, work,
                                     args.smoke))
    skip = args.steps // 3 // args.log_every  # logged intervals of compilation and warm-up
    compare = max(1, args.compare // args.log_every)
    one = runs.get("1 gpu")
    print(f"\n{torch.cuda.get_device_name(0) if gpus else 'cpu'} x{gpus}, torch {torch.__version__}; zh-64m, seq 512, "
          f"global batch 256, {args.steps} steps (tokens/s over the last {args.steps - skip * args.log_every}; "
          f"losses: means over {args.log_every} steps)")
    print(f"{'run':<16}{'tokens/s':>12}{'speedup':>9}{'max |loss diff|':>17}  first losses")
    rows = []
    for name, (n, recs) in runs.items():
        timed = recs[skip:]
        tps = sum(r["tokens_per_s"] for r in timed) / len(timed)
        base = None
        if one:
            base = sum(r["tokens_per_s"] for r in one[1][skip:]) / len(one[1][skip:])
        diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(recs[:compare], one[1][:compare])) if one else float("nan")
        first = " ".join(f"{r['loss']:.4f}" for r in recs[:5])
        print(f"{name:<16}{tps:>12,.0f}{(tps / base if base else float('nan')):>8.2f}x{diff:>17.4f}  {first}")
        rows.append({"name": name, "nproc": n, "tokens_per_s": tps, "speedup": tps / base if base else None,
                     "max_loss_diff": diff, "losses": [r["loss"] for r in recs]})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
