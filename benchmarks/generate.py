"""Decode speed and time to first token: our engine (model/generate.py) vs transformers' generate.

    python benchmarks/generate.py                         # zh-64m shape, random weights, GPU if there is one
    python benchmarks/generate.py --device cpu            # the CPU table (fp32)
    python benchmarks/generate.py --model out/hf          # a real exported directory instead
    python benchmarks/generate.py --smoke                 # tiny shape, a few tokens: checks that it runs

Both engines run the same exported weights (model.save_hf_dir -> a directory that
AutoModelForCausalLM loads), in this one process, one after the other, greedy, with the same random
prompts, for exactly --new-tokens tokens (no end-of-text stop). Rows:

  hf default          transformers generate, dynamic cache (what `generate()` does out of the box)
  hf static+compile   cache_implementation="static" + compile_config (torch.compile of the decode
                      forward, mode reduce-overhead = CUDA graphs on GPU): transformers' fastest path
  ours eager          Engine(static=False): dynamic cache, attends over the filled prefix
  ours graph          Engine(static=True): static cache captured as a CUDA graph (GPU only)
  ours compile        Engine(static=True, compile=True): torch.compile'd step (+ CUDA graph on GPU)
  ours int8           (CPU only) Engine.from_dir of the int8 build of the same weights
                      (model.quantize.save_int8_dir): torch's int8 weight kernel (bf16 activations
                      for the matmuls), dynamic cache; its greedy tokens may leave hf's (other weights)

Columns: TTFT (prefill + first token, ms), decode tokens/s summed over the batch
(= batch * (new_tokens - 1) / (time of last token - time of first token)), the ratios of decode
tokens/s to "hf default" and to "hf static+compile" at the same batch, whether row 0's greedy tokens
equal "hf default"'s and "ours eager"'s ("from N": first differing token; in bf16 other kernels
may legitimately flip a near-tie after some tokens, in fp32 all should match), and peak GPU memory, or on a
CPU the decode tokens per CPU-second of this process (load-independent on a shared machine; use
--threads 1 to make it the work done).
Each (row, batch): one warm-up call (compiles, captures graphs), then the median of --repeats
timed calls; the timed calls of all rows take turns (round-robin), so load drift on a shared
machine hits every row alike. peak GB is the peak allocated during a row's warm-up (all models
stay loaded, about 0.13 GB each in bf16 for zh-64m).

Needs only torch, transformers, safetensors (runs on a bare GPU box).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ModelConfig, Transformer, save_hf_dir  # noqa: E402
from model.generate import Engine, SamplingParams  # noqa: E402

ZH_64M = dict(vocab_size=6400, hidden_size=768, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=96,
              intermediate_size=2432, max_seq_len=2048)
SMOKE = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
             intermediate_size=128, max_seq_len=256)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- one timed call


def now() -> tuple[float, float]:
    """(wall clock, CPU time of this process): on a shared CPU box the second is immune to other
    processes taking the cores (with --threads 1 it is the work done, spin-waits aside)."""
    return time.perf_counter(), time.process_time()


def time_ours(engine: Engine, prompts: list[list[int]], new_tokens: int):
    """-> (ttft s, (wall s, cpu s) of the new_tokens - 1 decode steps, tokens of row 0)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_token_ids=[])
    sync(engine.device)
    t0 = now()
    first = last = None
    row0 = []
    for tokens in engine.generate_tokens(prompts, params):  # each step's tokens are on the host: synced
        last = now()
        first = first or last
        row0.append(tokens[0])
    assert len(row0) == new_tokens
    return first[0] - t0[0], (last[0] - first[0], last[1] - first[1]), row0


class Clock(BaseStreamer):
    """A transformers streamer that notes when the first generated token reaches the host."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # call 1 is the prompt
            self.first = now()

    def end(self):
        pass


def time_hf(hf, ids: torch.Tensor, new_tokens: int, static: bool, device):
    clock = Clock()
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                  attention_mask=torch.ones_like(ids), streamer=clock)
    if static:
        from transformers import CompileConfig

        cc = CompileConfig(fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else "default")
        cc._compile_all_devices = True  # transformers compiles on CUDA only unless told
        kwargs.update(cache_implementation="static", compile_config=cc)
    sync(device)
    t0 = now()
    out = hf.generate(ids, **kwargs)
    sync(device)
    t1 = now()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return clock.first[0] - t0[0], (t1[0] - clock.first[0], t1[1] - clock.first[1]), out[0, ids.shape[1]:].tolist()


# --------------------------------------------------------------------------- the table


def agreement(tokens: list[int], reference: list[int]) -> str:
    """"yes", or where the greedy tokens first differ ("from 37")."""
    diff = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
    return "yes" if diff is None and len(tokens) == len(reference) else f"from {diff}"


def summarize(runs, batch: int, new_tokens: int) -> dict:
    decoded = batch * (new_tokens - 1)
    return {"ttft_ms": 1000 * statistics.median(r[0] for r in runs),
            "decode_tok_s": decoded / statistics.median(r[1][0] for r in runs),
            "decode_tok_cpu_s": decoded / statistics.median(r[1][1] for r in runs),
            "tokens": runs[-1][2]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="an exported HF directory (default: random zh-64m-shaped weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, help="default: 256 on CUDA, 48 on CPU")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default="hf-default,hf-static,ours-eager,ours-graph,ours-compile,ours-int8",
                    help="which rows to run (ours-graph is skipped on CPU, ours-int8 on GPU)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few tokens, no compile rows")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens = args.new_tokens or (8 if args.smoke else 256 if device.type == "cuda" else 48)
    batches = [int(b) for b in args.batch.split(",")]
    rows = args.rows.split(",")
    if args.smoke:
        rows = [r for r in rows if r in ("hf-default", "ours-eager")]
    if device.type != "cuda":
        rows = [r for r in rows if r != "ours-graph"]
    else:
        rows = [r for r in rows if r != "ours-int8"]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            torch.manual_seed(0)
            model = Transformer(ModelConfig(**(SMOKE if args.smoke else ZH_64M), tie_embeddings=True))
            model_dir = save_hf_dir(model, None, Path(tmp) / "hf", dtype=dtype)
            del model
        int8_dir = None
        if "ours-int8" in rows:
            from model.quantize import save_int8_dir

            int8_dir = Path(tmp) / "int8"
            save_int8_dir(model_dir, int8_dir)
        vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        prompts = torch.randint(0, vocab, (max(batches), args.prompt_len), generator=torch.Generator().manual_seed(1))

        # Every (row, batch) as a zero-argument timed call. All models stay loaded (a 64M model is
        # small), so that the timed calls can take turns: a change in machine load during the run
        # then hits every row alike instead of whichever row ran at that moment.
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        calls = {}
        for name in rows:
            engine = None
            if name == "ours-int8":
                engine = Engine.from_dir(int8_dir, device=device, dtype=dtype, static=False)
            elif name.startswith("ours"):
                engine = Engine.from_dir(model_dir, device=device, dtype=dtype, static=name != "ours-eager",
                                         compile=name == "ours-compile")
            for b in batches:
                if engine is None:
                    ids = prompts[:b].to(device)
                    calls[name, b] = (lambda ids=ids, static=name == "hf-static":
                                      time_hf(hf, ids, new_tokens, static, device))
                else:
                    calls[name, b] = lambda e=engine, p=prompts[:b].tolist(): time_ours(e, p, new_tokens)
        peak = {}
        for (name, b), call in calls.items():  # warm-up: compiles, captures graphs
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                call()
            if device.type == "cuda":
                peak[name, b] = torch.cuda.max_memory_allocated(device) / 2**30
            print(f"  warm-up {name:14s} batch {b}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        runs = {key: [] for key in calls}
        for i in range(args.repeats):
            for key, call in calls.items():
                with torch.inference_mode():
                    runs[key].append(call())
            print(f"  round {i + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        results = []
        for (name, b), timed in runs.items():
            r = summarize(timed, b, new_tokens)
            r.update(row=name, batch=b)
            if (name, b) in peak:
                r["peak_mem_gb"] = peak[name, b]
            results.append(r)

    # ------------------------------------------------------------------ print
    base = {r["batch"]: r for r in results if r["row"] == "hf-static"}
    ref = {r["batch"]: r for r in results if r["row"] == "hf-default"}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{'smoke' if args.smoke else 'zh-64m'} shape{'' if args.model is None else f' ({args.model})'}, "
          f"{str(dtype).removeprefix('torch.')}, {name}, prompt {args.prompt_len} tokens, {new_tokens} new tokens, "
          f"torch {torch.__version__}, load avg {os.getloadavg()[0]:.1f}\n")
    eager = {r["batch"]: r for r in results if r["row"] == "ours-eager"}
    header = ("| row | batch | TTFT ms | decode tok/s | vs hf default | vs hf static+compile | tokens = hf default "
              "| tokens = ours eager |")
    header += " peak GB |" if device.type == "cuda" else " decode tok per CPU-s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        ratios = [f"{r['decode_tok_s'] / by[r['batch']]['decode_tok_s']:.2f}x" if r["batch"] in by else "-"
                  for by in (ref, base)]
        same = ["-" if r["batch"] not in by else agreement(r["tokens"], by[r["batch"]]["tokens"])
                for by in (ref, eager)]
        line = (f"| {r['row']} | {r['batch']} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} | {' | '.join(ratios)} "
                f"| {' | '.join(same)} |")
        line += f" {r['peak_mem_gb']:.2f} |" if device.type == "cuda" else f" {r['decode_tok_cpu_s']:.1f} |"
        print(line)
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "tokens"} for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
