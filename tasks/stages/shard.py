"""shard: tokenize the corpus into globally shuffled parquet shards of token ids.

Reads   dedup's documents (parquet, `id` and `text`, one row group at a time) and the
        tokenizer stage's tokenizer.json.
Writes  train/NNNNN.parquet and val/NNNNN.parquet: one row per document, a single column
        `input_ids: list<uint16>` (the document's tokens, then <|endoftext|>), zstd, row
        groups of about `row_group_tokens` tokens (the reader's unit of work); each file's
        schema metadata holds its document and token counts (`slm.docs`, `slm.tokens`).
        The manifest lists every shard with its split, documents and tokens.
Split   by document: round(val_fraction * documents) documents (at least one when
        val_fraction > 0; an empty document drawn is dropped, not replaced), drawn with
        `val_seed` from the documents' positions, so changing the shuffle `seed` keeps the
        same validation set.
Shuffle two passes, never holding the corpus in memory:
        1. tokenize in batches of about `batch_chars` characters (encode_batch_fast runs the
           batch on all cores in Rust while this thread files the previous batch), and
           append each document to one of B bucket files (uint16 ids + uint32 lengths),
           chosen by a seeded hash of its position; B is sized so a bucket is about one shard.
        2. for each bucket: load it, permute its documents with rng(seed, bucket), cut the
           permutation into shards of about `shard_mb`, write them.
        A uniform bucket per document followed by a uniform permutation inside each bucket
        gives a uniform permutation of the whole split.
Determinism the same upstream artifacts and settings give byte-identical shards: bucket
        choice is a hash of (seed, position), the in-bucket order a seeded permutation,
        nothing depends on timing, batching or thread count.
Resume  pass 1 records the bucket files' sizes after each upstream file (`_work/pass1.json`)
        and a restart truncates them there and goes on with the next file. Pass 2 is one unit
        of work per bucket (tasks.corpus.parallel: runtime.workers processes, or Ray tasks with
        runtime.executor ray), resumed bucket by bucket from the units' markers; inside a
        bucket each shard is written under a temporary name and renamed, so a shard that
        exists is complete and is skipped (shards are uploaded as progress on remote stores).
Memory  pass 1: one upstream row group, two batches of encodings in flight (~100 B per
        token while the Rust encodings live) and `buffer_mb` of bucket buffers; pass 2: one
        bucket (about one shard) twice over per worker, plus a row group being written.
        Neither grows with the corpus (benchmarks/shard.py measures it).
Disk    the bucket files in the scratch folder: 2 bytes per token and 4 per document (an
        uncompressed copy of the corpus' ids), dropped at commit.
Fails   when the tokenizer has 65536 tokens or more (uint16 ids; names the setting to fix),
        or when the corpus has no document with text.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from profiles.schema import Strict
from storage.errors import SlmError
from tasks.corpus.documents import iter_batches
from tasks.progress import Progress
from tasks.registry import Stage, StageResult
from tasks.chat_data import EOS
from tasks.corpus.documents import document_files
from tasks.corpus.parallel import Unit, run_units
from tasks.corpus.positions import mix64

STAGE_VERSION = 1
UINT16_LIMIT = 1 << 16
SPLITS = ("train", "val")
DOCS_KEY, TOKENS_KEY = b"slm.docs", b"slm.tokens"
SCHEMA = pa.schema([pa.field("input_ids", pa.list_(pa.uint16()))])


class ShardSettings(Strict):
    shard_mb: float = Field(50.0, gt=0)  # target size of a shard's token ids (2 bytes each), before zstd
    val_fraction: float = Field(0.005, ge=0, le=0.5)  # share of documents held out for validation
    seed: int = 0  # the shuffle order
    val_seed: int = 0  # which documents are held out (independent of the order)
    row_group_tokens: int = Field(1 << 18, ge=1024)  # tokens per parquet row group
    # runtime knobs: they change speed and memory, not the shards, so they stay out of the key
    batch_chars: int = Field(1_000_000, ge=1_000, exclude=True)  # characters per encode batch
    buffer_mb: int = Field(64, ge=1, exclude=True)  # pass-1 bucket buffers, all buckets together


class ShardError(SlmError):
    pass


def config(profile) -> ShardSettings:
    settings = profile.stages.shard
    vocab = profile.stages.tokenizer.vocab_size
    if vocab >= UINT16_LIMIT:
        raise ShardError(_vocab_message(vocab, "stages.tokenizer.vocab_size"))
    return settings


def _vocab_message(vocab: int, where: str) -> str:
    return (f"shard: the tokenizer has {vocab} tokens, but shards store token ids as uint16, which holds "
            f"ids below {UINT16_LIMIT}; set {where} to 65535 or less")


# --- the plan: documents, validation picks, buckets ------------------------------------------
@dataclass
class Plan:
    files: list[Path]
    docs: int
    val_positions: np.ndarray  # sorted corpus positions of the validation documents
    buckets: dict[str, int]  # split -> number of buckets

    def bucket_ids(self, split: str) -> range:
        start = 0 if split == "train" else self.buckets["train"]
        return range(start, start + self.buckets[split])


def make_plan(files: list[Path], cfg: ShardSettings, bytes_per_token: float) -> Plan:
    """Counts from the parquet footers only: no document is read here."""
    docs, text_bytes = 0, 0
    for path in files:
        meta = pq.ParquetFile(path).metadata
        docs += meta.num_rows
        column = meta.schema.names.index("text")
        text_bytes += sum(meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups))
    if docs == 0:
        raise ShardError(f"the corpus has no documents ({len(files)} files); check the upstream stages' reports")
    n_val = 0
    if cfg.val_fraction > 0 and docs > 1:
        n_val = min(docs - 1, max(1, round(cfg.val_fraction * docs)))
    rng = np.random.default_rng([cfg.val_seed, 0x7A1])
    val_positions = np.sort(rng.choice(docs, size=n_val, replace=False)) if n_val else np.zeros(0, np.int64)
    est_bytes = 2 * (text_bytes / bytes_per_token + docs)  # uint16 ids, EOS included
    shard_bytes = cfg.shard_mb * 1e6
    buckets = {"train": max(1, math.ceil(est_bytes * (docs - n_val) / docs / shard_bytes)),
               "val": max(1, math.ceil(est_bytes * n_val / docs / shard_bytes)) if n_val else 0}
    return Plan(list(files), docs, val_positions.astype(np.int64), buckets)


# --- pass 1: tokenize into buckets -----------------------------------------------------------
@dataclass
class Chunk:
    file: int  # index into plan.files
    texts: list[str]
    positions: np.ndarray  # corpus positions of these documents
    empty: list[str]  # ids of documents without text, skipped
    last: bool  # the file's last chunk: once it is filed, the file is done


def text_chunks(plan: Plan, start_file: int, batch_chars: int) -> Iterator[Chunk]:
    """Documents in corpus order from `start_file`, in chunks of about batch_chars characters.
    Every file ends with a chunk marked `last` (possibly without texts)."""
    position = sum(pq.ParquetFile(p).metadata.num_rows for p in plan.files[:start_file])
    for index in range(start_file, len(plan.files)):
        texts, positions, empty, chars = [], [], [], 0
        for batch in iter_batches(plan.files[index], columns=["id", "text"]):
            column = batch.column("text")
            lengths = pc.fill_null(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False)
            if (lengths == 0).any():
                ids = batch.column("id").to_pylist()
                empty.extend(str(ids[i]) for i in np.flatnonzero(lengths == 0))
            values = column.to_pylist()
            for i in np.flatnonzero(lengths):
                texts.append(values[i])
                positions.append(position + i)
                chars += int(lengths[i])
                if chars >= batch_chars:
                    yield Chunk(index, texts, np.array(positions, np.int64), empty, False)
                    texts, positions, empty, chars = [], [], [], 0
            position += len(batch)
        yield Chunk(index, texts, np.array(positions, np.int64), empty, True)


def token_arrays(encodings, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Encodings -> (all ids with EOS after each document, uint16; lengths incl. EOS, int64)."""
    ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    body = np.fromiter(chain.from_iterable(ids), dtype=np.uint16, count=int(lengths.sum()))
    flat = np.insert(body, np.cumsum(lengths), np.uint16(eos))
    return flat, lengths + 1


class Buckets:
    """B append-only bucket files: `<b>.ids` (uint16 tokens) and `<b>.len` (uint32 lengths).

    Appends are buffered in memory up to `budget` bytes for all buckets together, then
    written out. `sizes()` after `flush()` is the resume point."""

    def __init__(self, folder: Path, count: int, budget: int):
        self.folder, self.count, self.budget = folder, count, budget
        folder.mkdir(parents=True, exist_ok=True)
        self._ids: dict[int, list[bytes]] = {}
        self._lens: dict[int, list[bytes]] = {}
        self._held = 0

    def path(self, bucket: int, kind: str) -> Path:
        return self.folder / f"{bucket:05d}.{kind}"

    def reset(self, sizes: list[list[int]] | None) -> None:
        """Cut every file back to `sizes` (a resume point), or empty them all (None)."""
        for b in range(self.count):
            for k, kind in enumerate(("ids", "len")):
                with open(self.path(b, kind), "ab") as handle:
                    handle.truncate(sizes[b][k] if sizes else 0)

    def add(self, flat: np.ndarray, lengths: np.ndarray, buckets: np.ndarray) -> None:
        """File each document (its slice of `flat`) under its bucket, keeping corpus order."""
        order = np.argsort(buckets, kind="stable")
        lens = lengths[order]
        ends = np.cumsum(lengths)
        starts = (ends - lengths)[order]
        gathered = flat[np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))]
        docs_per = np.bincount(buckets, minlength=self.count)
        tokens_per = np.bincount(buckets, weights=lengths, minlength=self.count).astype(np.int64)
        d = t = 0
        for b in np.flatnonzero(docs_per):
            n_docs, n_tok = int(docs_per[b]), int(tokens_per[b])
            self._ids.setdefault(int(b), []).append(gathered[t:t + n_tok].tobytes())
            self._lens.setdefault(int(b), []).append(lens[d:d + n_docs].astype(np.uint32).tobytes())
            self._held += 2 * n_tok + 4 * n_docs
            d, t = d + n_docs, t + n_tok
        if self._held >= self.budget:
            self.flush()

    def flush(self) -> None:
        for store, kind in ((self._ids, "ids"), (self._lens, "len")):
            for b, parts in store.items():
                with open(self.path(b, kind), "ab") as handle:
                    handle.write(b"".join(parts))
            store.clear()
        self._held = 0

    def sizes(self) -> list[list[int]]:
        return [[self.path(b, "ids").stat().st_size, self.path(b, "len").stat().st_size] for b in range(self.count)]


def _save_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    os.replace(tmp, path)


def pass_one(plan: Plan, cfg: ShardSettings, tok, eos: int, work: Path) -> dict:
    """Tokenize every document into its bucket. Returns the pass's counts (kept for a resume)."""
    progress_path = work / "pass1.json"
    total_buckets = plan.buckets["train"] + plan.buckets["val"]
    buckets = Buckets(work / "buckets", total_buckets, cfg.buffer_mb << 20)
    state = json.loads(progress_path.read_text()) if progress_path.exists() else None
    if state and state.get("buckets") != total_buckets:
        state = None  # planned differently (cannot happen for one key); start over
    buckets.reset(state["sizes"] if state else None)
    done = state["files_done"] if state else 0
    counts = state["counts"] if state else {"docs": 0, "tokens": 0, "dropped": 0, "dropped_ids": []}
    bar = Progress("shard: tokenize", None, unit="token", initial=counts["tokens"])

    def file_away(chunk: Chunk, encodings) -> None:
        if chunk.texts:
            flat, lengths = token_arrays(encodings, eos)
            is_val = np.isin(chunk.positions, plan.val_positions, assume_unique=True)
            h = mix64(chunk.positions, cfg.seed)
            val = plan.buckets["train"] + (h % np.uint64(max(plan.buckets["val"], 1))).astype(np.int64)
            buckets.add(flat, lengths, np.where(is_val, val, (h % np.uint64(plan.buckets["train"])).astype(np.int64)))
            counts["docs"] += len(lengths)
            counts["tokens"] += int(lengths.sum())
            bar.update(int(lengths.sum()))
        counts["dropped"] += len(chunk.empty)
        counts["dropped_ids"] = (counts["dropped_ids"] + chunk.empty)[:100]
        if chunk.last:
            buckets.flush()
            _save_json(progress_path, {"files_done": chunk.file + 1, "buckets": total_buckets,
                                       "sizes": buckets.sizes(), "counts": counts})

    # The encoder thread runs batch k+1 in Rust (GIL released, all cores) while this thread
    # files batch k; at most two batches of encodings are alive.
    with ThreadPoolExecutor(max_workers=1) as encoder:
        pending: deque = deque()
        for chunk in text_chunks(plan, done, cfg.batch_chars):
            pending.append((chunk, encoder.submit(tok.encode_batch_fast, chunk.texts, add_special_tokens=False)))
            if len(pending) >= 2:
                chunk, future = pending.popleft()
                file_away(chunk, future.result())
        while pending:
            chunk, future = pending.popleft()
            file_away(chunk, future.result())
    bar.close()
    return counts


# --- pass 2: shuffle each bucket into shards -------------------------------------------------
def shard_cuts(lengths: np.ndarray, shard_bytes: float) -> np.ndarray:
    """Boundaries (in documents) cutting a permuted bucket into shards of about shard_bytes."""
    total = 2 * int(lengths.sum())
    n = max(1, round(total / shard_bytes))
    cum = np.cumsum(lengths)
    inner = np.searchsorted(cum, cum[-1] * np.arange(1, n) / n, "left") + 1
    return np.unique(np.concatenate([[0], inner, [len(lengths)]]))


def write_shard(path: Path, values: np.ndarray, lengths: np.ndarray, row_group_tokens: int) -> None:
    """One shard, written under a temporary name and renamed when complete."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    schema = SCHEMA.with_metadata({DOCS_KEY: str(len(lengths)).encode(), TOKENS_KEY: str(int(offsets[-1])).encode()})
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    # dictionary pages (the vocabulary is < 65536) + zstd: smaller and faster to write than plain
    with pq.ParquetWriter(tmp, schema, compression="zstd", write_statistics=False) as writer:
        row = 0
        while row < len(lengths):
            stop = int(np.searchsorted(offsets, offsets[row] + row_group_tokens, "left"))
            stop = min(max(stop, row + 1), len(lengths))
            rel = offsets[row:stop + 1] - offsets[row]
            column = pa.ListArray.from_arrays(pa.array(rel.astype(np.int32)),
                                              pa.array(values[offsets[row]:offsets[stop]]))
            writer.write_table(pa.Table.from_arrays([column], schema=schema))
            row = stop
    os.replace(tmp, path)


def shard_stats(path: Path) -> tuple[int, int]:
    meta = pq.read_schema(path).metadata or {}
    return int(meta[DOCS_KEY]), int(meta[TOKENS_KEY])


def bucket_order(bucket: int, lens: np.ndarray, cfg: ShardSettings) -> tuple[np.ndarray, np.ndarray]:
    """A bucket's permutation of its documents and the cuts of that order into shards."""
    perm = np.random.default_rng([cfg.seed, 0x5EED, bucket]).permutation(len(lens))
    return perm, shard_cuts(lens[perm], cfg.shard_mb * 1e6)


def bucket_unit(args: dict) -> dict:
    """One unit of pass 2: permute one bucket and write its shards (those not written yet; a
    shard is written under a temporary name and renamed). Runs in a worker."""
    cfg = ShardSettings.model_validate(args["settings"])
    out, folder, b = Path(args["out"]), Path(args["buckets"]), args["bucket"]
    lens = np.fromfile(folder / f"{b:05d}.len", dtype=np.uint32).astype(np.int64)
    perm, cuts = bucket_order(b, lens, cfg)
    rels = [f"{args['split']}/{args['first'] + i:05d}.parquet" for i in range(len(cuts) - 1)]
    missing = [i for i, rel in enumerate(rels) if not (out / rel).exists()]
    if missing:
        ids = np.fromfile(folder / f"{b:05d}.ids", dtype=np.uint16)
        ends = np.cumsum(lens)
        for i in missing:
            docs = perm[cuts[i]:cuts[i + 1]]
            values = np.concatenate([ids[e - n:e] for e, n in zip(ends[docs].tolist(), lens[docs].tolist())])
            write_shard(out / rels[i], values, lens[docs], cfg.row_group_tokens)
    return {"files": rels, "shards": [[rel, *shard_stats(out / rel)] for rel in rels]}


def pass_two(plan: Plan, cfg: ShardSettings, work: Path, out) -> list[dict]:
    """Write every shard, one unit per bucket (tasks.corpus.parallel: local workers or Ray tasks,
    resumed bucket by bucket). The shards' numbers are planned here from the buckets' document
    lengths alone, so a unit needs nothing from another. Returns the shard list."""
    folder = work / "buckets"
    units, settings = [], cfg.model_dump()
    for split in SPLITS:
        number = 0
        for b in plan.bucket_ids(split):
            lens = np.fromfile(folder / f"{b:05d}.len", dtype=np.uint32).astype(np.int64)
            if len(lens) == 0:
                continue
            _, cuts = bucket_order(b, lens, cfg)
            units.append(Unit(f"{b:05d}", {"bucket": b, "split": split, "first": number, "settings": settings,
                                           "buckets": str(folder), "out": str(out.path),
                                           "size": 2 * int(lens.sum())}))
            number += len(cuts) - 1
    results = run_units(out, "shard-write", units, bucket_unit, desc="shard: shuffle+write")
    return [{"path": rel, "split": rel.split("/", 1)[0], "docs": docs, "tokens": tokens}
            for unit in units for rel, docs, tokens in results[unit.name]["shards"]]


def run(cfg: ShardSettings, inputs: dict, out) -> StageResult:
    from tokenizers import Tokenizer

    documents, tokenizer = inputs["dedup"], inputs["tokenizer"]
    tok = Tokenizer.from_file(str(out.local_input(tokenizer, "tokenizer.json")))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab >= UINT16_LIMIT:
        raise ShardError(_vocab_message(vocab, "the tokenizer's vocab_size (stages.tokenizer.vocab_size)"))
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise ShardError(f"tokenizer/{tokenizer.key[:16]} has no {EOS} token; retrain it with this version of slm")
    tok.encode_special_tokens = True  # "<|im_end|>" written in a document is text, not a control token

    files = [out.local_input(documents, rel) for rel in document_files(documents)]
    bytes_per_token = float(tokenizer.extra.get("compression", {}).get("bytes_per_token") or 2.5)
    plan = make_plan(files, cfg, bytes_per_token)
    work = out.scratch
    work.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    counts = pass_one(plan, cfg, tok, eos, work)
    tokenize_seconds = time.perf_counter() - clock
    if counts["docs"] == 0:
        raise ShardError(f"dedup/{documents.key[:16]}: none of the {plan.docs} documents has text")
    shards = pass_two(plan, cfg, work, out)
    seconds = time.perf_counter() - clock

    totals = {s: {"docs": sum(x["docs"] for x in shards if x["split"] == s),
                  "tokens": sum(x["tokens"] for x in shards if x["split"] == s)} for s in SPLITS}
    tokens = totals["train"]["tokens"] + totals["val"]["tokens"]
    out.log_metrics({"tokens": tokens, "tokens_per_second": tokens / max(seconds, 1e-9),
                     "tokenize_tokens_per_second": tokens / max(tokenize_seconds, 1e-9)})
    return StageResult(
        counts={"in": plan.docs, "out": counts["docs"], "tokens": tokens,
                "train_docs": totals["train"]["docs"], "train_tokens": totals["train"]["tokens"],
                "val_docs": totals["val"]["docs"], "val_tokens": totals["val"]["tokens"],
                "train_shards": sum(s["split"] == "train" for s in shards),
                "val_shards": sum(s["split"] == "val" for s in shards)},
        dropped={"empty_text": counts["dropped"]} if counts["dropped"] else {},
        summary=(f"{tokens:,} tokens from {counts['docs']:,} documents in {len(shards)} shards "
                 f"(val: {totals['val']['docs']:,} documents, {totals['val']['tokens']:,} tokens); "
                 f"{tokens / max(seconds, 1e-9) / 1e6:.2f} M tokens/s"),
        extra={"shards": shards, "vocab_size": vocab, "eos_id": eos, "dtype": "uint16",
               "column": "input_ids", "seed": cfg.seed, "val_seed": cfg.val_seed,
               "dropped_ids": counts["dropped_ids"]},
    )


STAGE = Stage(
    name="shard",
    version=STAGE_VERSION,
    upstream=("dedup", "tokenizer"),
    settings=ShardSettings,
    config=config,
    run=run,
)
