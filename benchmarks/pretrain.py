"""Pretraining throughput on one GPU: our engine (eager and compiled) vs stock transformers.

    python benchmarks/pretrain.py                 # zh-64m shape on a GPU (H100: ~4 minutes)
    python benchmarks/pretrain.py --smoke         # tiny shapes, a few steps, runs on a CPU

On a GPU box without the pipeline's dependencies (pydantic, fsspec, prefect, ...), build
the shard set first where they are installed and copy it over:

    python benchmarks/pretrain.py --build-shards /tmp/bench      # prints the shard dir
    python benchmarks/pretrain.py --shards <that dir>            # on the GPU box

Rows (all in this one process, one after the other, same shape and global batch):
  hf baseline       transformers Qwen3ForCausalLM of the same shape, sdpa attention (plain
                    causal, no document mask), bf16 autocast, fused AdamW, torch.compile,
                    random tokens, micro-batch 64 x 512, 4 micro-batches per step
  engine eager      tasks.train.train(): packed real documents (Song ci + Tang poems from
                    ../shared/data) tokenized and sharded by the project's tokenizer and
                    shard stages, read by tasks.shard_reader.ShardReader; document-masked
                    attention (flex attention on CUDA), bf16 autocast, fused AdamW, the same
                    micro-batch and accumulation, grad clipping
  engine compiled   the same with torch.compile of model + loss (TrainConfig.compile)
Columns: tokens/s (after warm-up), MFU (6N + attention FLOPs per token, as
ModelConfig.flops_per_token, over the device's bf16 dense peak: H100 989 TFLOP/s),
peak GPU memory (torch.cuda.max_memory_allocated), the ratio of tokens/s to the baseline,
and the last training loss (the baseline's is on random tokens).

With --shards the GPU path imports only torch, numpy, safetensors, pyarrow, tokenizers
(and transformers for the baseline): no prefect, mlflow, polars or pydantic.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ModelConfig  # noqa: E402
from tasks.shard_reader import ShardReader  # noqa: E402
from tasks.train.data import PackedBatches  # noqa: E402
from tasks.train.engine import TrainConfig, train  # noqa: E402
from tasks.train.metrics import device_peak_flops, read_metrics  # noqa: E402
from tasks.train.objectives import CausalLM  # noqa: E402

ZH_64M = dict(vocab_size=6400, hidden_size=768, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=96,
              intermediate_size=2432, max_seq_len=512)
SMOKE = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
             intermediate_size=128, max_seq_len=64)


@dataclass
class Shape:
    model: dict
    seq_len: int
    micro_batch: int
    global_batch: int
    warmup: int  # steps before timing (compilation, autotuning, allocator warm-up)
    measure: int  # timed steps


# --------------------------------------------------------------------------- data


def read_records(data_dir: Path, max_chars: int) -> list[dict]:
    """Real Chinese documents from <data>/corpus: Song ci and Tang poems, one poem a document."""
    files = sorted(glob.glob(str(data_dir / "corpus" / "song-ci-simplified" / "ci.song.*.json")))
    files += sorted(glob.glob(str(data_dir / "corpus" / "tang-traditional" / "poet.tang.*.json")))
    if not files:
        raise SystemExit(f"no corpus under {data_dir}/corpus: pass --data DIR (the folder that holds corpus/)")
    records, total = [], 0
    for f in files:
        for i, poem in enumerate(json.loads(Path(f).read_text(encoding="utf-8"))):
            text = "\n".join(poem.get("paragraphs", []))
            if text:
                records.append({"id": f"{Path(f).stem}-{i}", "source": Path(f).parent.name,
                                "title": poem.get("title") or poem.get("rhythmic") or "", "text": text})
                total += len(text)
            if total >= max_chars:
                return records
    return records


def build_shards(data_dir: Path, home: Path, vocab_size: int, max_chars: int) -> Path:
    """Token shards from real text by the project's own tokenizer and shard stages.

    The documents are committed as a `dedup` artifact, then tasks.tokenizer and tasks.shard
    run on it through tasks.runner.run_stage, as in a pipeline run. Returns the shard
    artifact's directory (what ShardReader.from_artifact reads). Needs the pipeline's
    dependencies (pydantic, fsspec, ...), unlike the rest of this script.
    """
    from datetime import datetime, timezone

    from profiles.schema import profile_model
    from storage.artifacts import ArtifactStore
    from storage.keys import stage_key
    from storage.manifest import Manifest, list_files
    from tasks.corpus.documents import DocWriter
    from tasks.registry import all_stages
    from tasks.runner import run_stage

    records = read_records(data_dir, max_chars)
    profile = profile_model().model_validate({
        "name": "bench", "store": {"root": str(home / "artifacts")}, "tracking": {"enabled": False},
        "stages": {"tokenizer": {"vocab_size": vocab_size, "sample_chars": max(10_000, max_chars),
                                 "heldout_chars": 0},
                   "shard": {"val_fraction": 0.01, "shard_mb": 4, "row_group_tokens": 1 << 16}},
    })
    store = ArtifactStore(profile.store.root, home)
    key = stage_key("dedup", 1, {"benchmark": "pretrain", "docs": len(records), "chars": max_chars}, {})
    docs = store.load_manifest("dedup", key)
    if docs is None:
        out = store.begin("dedup", key)
        writer = DocWriter(out.path / "docs" / "part-00000.parquet", row_group_bytes=4 << 20)
        for record in records:
            writer.add_row(record)
        writer.close()
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        docs = Manifest(stage="dedup", key=key, stage_version=1, files=list_files(out.path),
                        counts={"out": len(records)}, config={"benchmark": "pretrain"}, upstream={}, versions={},
                        started_at=now, finished_at=now, seconds=0.0)
        store.commit(out, docs)
    stages = all_stages()
    tok = run_stage(stages["tokenizer"], profile, {"dedup": docs}, store)
    shard = run_stage(stages["shard"], profile, {"dedup": docs, "tokenizer": tok}, store)
    return store.local_path(shard, shard.extra["shards"][0]["path"]).parents[1]


# --------------------------------------------------------------------------- runs


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


class CausalNoDocMask(CausalLM):
    """Diagnostic only (--probe nomask): plain causal attention across documents, to bound what
    document masking costs. Not a training mode of the engine."""

    def loss(self, model, batch):
        return super().loss(model, {**batch, "document_ids": None})


def run_engine(name: str, shape: Shape, shards: Path, compile: bool, work: Path, device, objective=None) -> dict:
    from model import Transformer

    torch._dynamo.reset()
    reset_memory(device)
    out = work / name.replace(" ", "-")
    rounds = 1 + math.ceil(shape.measure / shape.warmup)
    cfg = TrainConfig(out_dir=str(out), steps=shape.warmup * rounds, seq_len=shape.seq_len, micro_batch=shape.micro_batch,
                      global_batch=shape.global_batch, lr=1e-3, warmup_steps=min(10, shape.warmup), schedule="constant",
                      compile=compile, log_every=shape.warmup, ckpt_every=0, keep_last=1)
    mcfg = ModelConfig(**shape.model)
    reader = ShardReader.from_artifact(shards, "train", seed=0)
    train(cfg, lambda: Transformer(mcfg), objective or CausalLM(), PackedBatches(reader, shape.seq_len))
    recs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"][1:]  # drop the warm-up interval
    tps = sum(r["tokens_per_s"] for r in recs) / len(recs)
    return {"name": name, "tokens_per_s": tps, "peak_gib": peak_gib(device), "loss": recs[-1]["loss"]}


def run_baseline(shape: Shape, device) -> dict:
    """Stock transformers Qwen3 of the same shape, compiled, on random tokens."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch._dynamo.reset()
    reset_memory(device)
    m = shape.model
    hf_cfg = Qwen3Config(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                         num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
                         num_key_value_heads=m["num_kv_heads"], head_dim=m["head_dim"],
                         max_position_embeddings=m["max_seq_len"], tie_word_embeddings=True)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(hf_cfg).to(device).train()
    cuda = device.type == "cuda"
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), fused=cuda or None)
    cmodel = torch.compile(model)
    accum = shape.global_batch // shape.micro_batch
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step() -> torch.Tensor:
        total = torch.zeros((), device=device)
        for _ in range(accum):  # fresh random tokens (generated on the device: no host work)
            x = torch.randint(0, m["vocab_size"], (shape.micro_batch, shape.seq_len), device=device, generator=gen)
            with autocast:
                loss = cmodel(input_ids=x, labels=x).loss
            (loss / accum).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    for _ in range(shape.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(shape.measure):
        loss = step()
    final = loss.item() / accum  # the one host sync
    elapsed = time.perf_counter() - start
    tps = shape.measure * shape.global_batch * shape.seq_len / elapsed
    row = {"name": "hf baseline", "tokens_per_s": tps, "peak_gib": peak_gib(device), "loss": final}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes and a few steps (CPU)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder holding corpus/")
    p.add_argument("--shards", type=Path, default=None,
                   help="a shard artifact directory made earlier (--build-shards); skips building")
    p.add_argument("--build-shards", type=Path, default=None, metavar="DIR",
                   help="only build the shard set under DIR (needs the pipeline's dependencies), print its path")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--measure", type=int, default=None)
    p.add_argument("--engine-micro-batches", default="",
                   help="comma-separated extra micro-batch sizes for the compiled engine (same global batch), "
                        "e.g. 128,256: the baseline stays at --micro-batch")
    p.add_argument("--probe", default="", help="diagnostic rows at the largest engine micro-batch: "
                   "nomask (no document masking), cdt (inductor coordinate-descent tuning)")
    p.add_argument("--skip", default="", help="comma-separated rows to skip: eager,compiled,baseline")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        shape = Shape(SMOKE, seq_len=64, micro_batch=4, global_batch=8, warmup=4, measure=8)
        vocab_chars = 200_000
    else:
        shape = Shape(ZH_64M, seq_len=512, micro_batch=64, global_batch=256, warmup=10, measure=20)
        vocab_chars = 6_000_000
    for field in ("micro_batch", "global_batch", "warmup", "measure"):
        if getattr(args, field) is not None:
            setattr(shape, field, getattr(args, field))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    vocab = shape.model["vocab_size"]
    if args.build_shards:
        print(build_shards(args.data, args.build_shards.resolve(), vocab, vocab_chars))
        return 0
    if device.type != "cuda" and not args.smoke:
        print("warning: no GPU; the full shape on a CPU takes very long (try --smoke)", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="slm-bench-"))
    t0 = time.perf_counter()
    shards = args.shards or build_shards(args.data, work / "home", vocab, vocab_chars)
    manifest = json.loads((shards / "_MANIFEST.json").read_text())
    if manifest["extra"]["vocab_size"] > vocab:
        raise SystemExit(f"{shards}: vocabulary {manifest['extra']['vocab_size']} > the model's {vocab}")
    print(f"shards: {shards} ({manifest['counts']['train_tokens']:,} train tokens, "
          f"{'built' if not args.shards else 'given'} in {time.perf_counter() - t0:.1f}s); device {device}"
          f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    mcfg = ModelConfig(**shape.model)
    print(f"model: {mcfg.num_params() / 1e6:.1f}M params, seq {shape.seq_len}, micro-batch {shape.micro_batch}, "
          f"global batch {shape.global_batch} rows, warm-up {shape.warmup} + timed {shape.measure} steps")

    rows = []
    if "baseline" not in skip:
        rows.append(run_baseline(shape, device))
    if "eager" not in skip:
        rows.append(run_engine("engine eager", shape, shards, False, work, device))
    if "compiled" not in skip:
        rows.append(run_engine("engine compiled", shape, shards, True, work, device))
    for size in (int(x) for x in args.engine_micro_batches.split(",") if x.strip()):
        variant = Shape(shape.model, shape.seq_len, size, shape.global_batch, shape.warmup, shape.measure)
        rows.append(run_engine(f"compiled mb{size}", variant, shards, True, work, device))
    probes = {x.strip() for x in args.probe.split(",") if x.strip()}
    sizes = [int(x) for x in args.engine_micro_batches.split(",") if x.strip()] or [shape.micro_batch]
    variant = Shape(shape.model, shape.seq_len, max(sizes), shape.global_batch, shape.warmup, shape.measure)
    if "nomask" in probes:
        rows.append(run_engine("probe nomask", variant, shards, True, work, device, CausalNoDocMask()))
    if "cdt" in probes:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
        rows.append(run_engine("probe cdt", variant, shards, True, work, device))

    peak = device_peak_flops(device)
    fpt = mcfg.flops_per_token(shape.seq_len)
    base = next((r["tokens_per_s"] for r in rows if r["name"] == "hf baseline"), None)
    print(f"\n{'run':<18}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'vs hf':>8}{'loss':>8}")
    for r in rows:
        mfu = f"{r['tokens_per_s'] * fpt / peak:.1%}" if peak else "-"
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] == r["peak_gib"] else "-"
        print(f"{r['name']:<18}{r['tokens_per_s']:>12,.0f}{mfu:>8}{mem:>10}{ratio:>8}{r['loss']:>8.3f}")
        r["mfu"] = r["tokens_per_s"] * fpt / peak if peak else None
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
