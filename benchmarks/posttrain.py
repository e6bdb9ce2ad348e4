"""SFT and DPO training throughput on one GPU: the zh-64m shape on the real chat and preference sets.

    python benchmarks/posttrain.py --build DIR     # tokenize ../shared/data/{sft,preference} (CPU)
    python benchmarks/posttrain.py --data DIR      # time SFT and DPO on the GPU, print the table

--build needs the tokenizer stage's output (benchmarks/pretrain.py --build-shards makes one under
its folder: artifacts/tokenizer/<key>/) and the pipeline's dependencies; it writes sft.npz
(conversations through tasks.train.finetune.prepare) and pairs.npz (tasks.train.pairs.encode_pairs) into DIR.
The GPU run imports only the engine and tasks.train's chats / pairs / objectives (and pydantic through them).

Rows (each: torch.compile, bf16 autocast, fused AdamW, the engine's train() as the stages run it,
randomly initialised weights: throughput does not depend on them):
  sft      packed conversations (tasks.train.chats.PackedChats), loss on assistant tokens only
  dpo      pairs right-padded to seq_len, chosen + rejected in one forward (tasks.train.objectives.DPO),
           reference log-probs precomputed (as the stage does; not timed)
Columns: row tokens/s (rows x seq_len / s), real tokens/s (padding excluded), learnt tokens/s
(tokens with a loss), peak GPU memory.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pretrain import SMOKE, ZH_64M, peak_gib, reset_memory  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from tasks.train.engine import TrainConfig, train  # noqa: E402
from tasks.train.metrics import read_metrics  # noqa: E402

SEQ_LEN = 512


def build(out: Path, tokenizer_dir: Path, data: Path) -> None:
    from transformers import AutoTokenizer

    from tasks.chat_data import load_conversations, load_pairs
    from tasks.train.chats import save_conversations
    from tasks.train.finetune import prepare
    from tasks.train.pairs import encode_pairs

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    files = [(str(data / "sft" / "alpaca_zh_demo.json"), "alpaca"), (str(data / "sft" / "identity.json"), "alpaca"),
             (str(data / "sft" / "sharegpt_zh_1K_format.jsonl"), "sharegpt")]
    convs, bad = load_conversations(files)
    docs, _, stats = prepare(convs, tok, SEQ_LEN, 0.0, 0)
    out.mkdir(parents=True, exist_ok=True)
    save_conversations(out / "sft.npz", docs)
    pairs, bad_pairs = load_pairs([str(data / "preference" / "dpo_zh_500.jsonl"), str(data / "preference" / "dpo_zh_demo.json")])
    arrays, counts = encode_pairs(pairs, tok, SEQ_LEN)
    np.savez(out / "pairs.npz", **arrays)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    (out / "meta.json").write_text(json.dumps({"pad_id": int(pad), "vocab": len(tok)}))
    print(f"{len(docs)} conversations ({len(bad)} quarantined, {stats.truncated} cut), {counts['pairs']} pairs "
          f"({len(bad_pairs)} quarantined) -> {out}")


def reference_logps(arrays: dict[str, np.ndarray], mcfg: ModelConfig, device) -> dict[str, np.ndarray]:
    """The initial model's sequence log-probs, as the dpo stage (tasks/stages/dpo.py) computes them before training."""
    from tasks.train.objectives import sequence_logps

    torch.manual_seed(0)
    model = Transformer(mcfg).to(device).eval()
    out = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for side in ("chosen", "rejected"):
            ids, tgt = arrays[f"{side}_ids"], arrays[f"{side}_targets"]
            parts = [sequence_logps(model, torch.from_numpy(ids[s:s + 64]).to(device),
                                    torch.from_numpy(tgt[s:s + 64]).to(device)).float().cpu().numpy()
                     for s in range(0, len(ids), 64)]
            out[f"ref_{side}"] = np.concatenate(parts).astype(np.float32)
    return out


def timed(name: str, cfg: TrainConfig, mcfg: ModelConfig, objective, data, device, real: float, learnt: float) -> dict:
    torch._dynamo.reset()
    reset_memory(device)
    train(cfg, lambda: Transformer(mcfg), objective, data)
    recs = [r for r in read_metrics(Path(cfg.out_dir) / "metrics.jsonl") if r["kind"] == "train"][1:]
    tps = sum(r["tokens_per_s"] for r in recs) / len(recs)
    return {"name": name, "rows": cfg.global_batch, "micro_batch": cfg.micro_batch, "tokens_per_s": tps,
            "real_tokens_per_s": tps * real, "learnt_tokens_per_s": tps * learnt, "peak_gib": peak_gib(device)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", type=Path, default=None, metavar="DIR")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (for --build)")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--data", type=Path, default=None, metavar="DIR", help="what --build wrote")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="a tiny model and batch (checks the script on a CPU)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.build:
        if args.tokenizer is None:
            raise SystemExit("--build needs --tokenizer DIR (a tokenizer stage's output with its chat template)")
        build(args.build, args.tokenizer, args.shared)
        return 0
    if args.data is None:
        raise SystemExit("pass --data DIR (made by --build) or --build DIR")
    from tasks.train.chats import PackedChats, load_conversations_npz
    from tasks.train.pairs import PairBatches, load_arrays
    from tasks.train.objectives import DPO, SFT

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = json.loads((args.data / "meta.json").read_text())
    shape = SMOKE if args.smoke else ZH_64M
    mcfg = ModelConfig(**{**shape, "vocab_size": max(ZH_64M["vocab_size"], meta["vocab"]), "max_seq_len": SEQ_LEN})
    work = Path(tempfile.mkdtemp(prefix="slm-posttrain-"))
    warm = 2 if args.smoke else 10
    scale = 16 if args.smoke else 1  # the smoke run's batches are 16x smaller
    steps = warm * (1 + math.ceil(args.steps / warm))

    def config(name: str, micro: int, rows: int) -> TrainConfig:
        return TrainConfig(out_dir=str(work / name), steps=steps, seq_len=SEQ_LEN, micro_batch=micro // scale,
                           global_batch=rows // scale,
                           lr=1e-4, warmup_steps=min(5, steps), schedule="constant", compile=device.type == "cuda", log_every=warm,
                           ckpt_every=0, keep_last=1)

    docs = load_conversations_npz(args.data / "sft.npz")
    sample = PackedChats(docs, SEQ_LEN, meta["pad_id"], 1).next_batch(256)
    last = sample["document_ids"] == sample["document_ids"].max(axis=1, keepdims=True)
    padded = np.where((sample["targets"] * last == -100 * last).all(axis=1), last.sum(axis=1), 0)  # a last segment with no target is padding
    real = 1.0 - float(padded.sum()) / sample["document_ids"].size
    learnt = float((sample["targets"] != -100).mean())
    rows = [timed("sft", config("sft", 64, 256), mcfg, SFT(), PackedChats(docs, SEQ_LEN, meta["pad_id"], 0), device,
                  real, learnt)]

    arrays = load_arrays(args.data / "pairs.npz")
    arrays.update(reference_logps(arrays, mcfg, device))
    real = float(np.mean([(np.cumsum((t != -100)[:, ::-1], axis=1)[:, ::-1] > 0).mean()
                          for t in (arrays["chosen_targets"], arrays["rejected_targets"])]))  # up to the last reply token
    learnt = float(np.mean([(t != -100).mean() for t in (arrays["chosen_targets"], arrays["rejected_targets"])]))
    # a DPO row is a pair: 2 x seq_len tokens go through the model
    dpo = timed("dpo", config("dpo", 32, 128), mcfg, DPO(beta=0.1), PairBatches(arrays, 0), device, real, learnt)
    for k in ("tokens_per_s", "real_tokens_per_s", "learnt_tokens_per_s"):
        dpo[k] *= 2
    dpo["pairs_per_s"] = dpo["tokens_per_s"] / (2 * SEQ_LEN)
    rows.append(dpo)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}; {'smoke' if args.smoke else 'zh-64m'} shape, seq {SEQ_LEN}, compiled on CUDA, bf16 autocast on CUDA")
    print(f"{'stage':<6}{'rows/step':>10}{'micro':>7}{'row tok/s':>12}{'real tok/s':>12}{'learnt tok/s':>14}{'peak GiB':>10}")
    for r in rows:
        print(f"{r['name']:<6}{r['rows']:>10}{r['micro_batch']:>7}{r['tokens_per_s']:>12,.0f}{r['real_tokens_per_s']:>12,.0f}"
              f"{r['learnt_tokens_per_s']:>14,.0f}{r['peak_gib']:>10.2f}")
    print(f"dpo: {dpo['pairs_per_s']:,.0f} pairs/s (chosen + rejected, {SEQ_LEN} tokens each)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
