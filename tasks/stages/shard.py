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
        1. one unit per document file (tasks.corpus.parallel: runtime.workers processes, or
           Ray tasks with runtime.executor ray): tokenize it in batches of about `batch_chars`
           characters (encode_batch_fast runs a batch on all cores in Rust) and file each
           document under one of B buckets, chosen by a seeded hash of its corpus position;
           the unit writes its piece: its documents' ids (uint16) and lengths (uint32) bucket
           by bucket, with an index of where each bucket starts. B is sized so a bucket is about
           one shard.
        2. one unit per bucket: read the bucket's share of every piece, in file order (byte
           ranges: a unit reads only its bucket, locally or from the store), permute its
           documents with rng(seed, bucket), cut the permutation into shards of about
           `shard_mb`, write them.
        A uniform bucket per document followed by a uniform permutation inside each bucket
        gives a uniform permutation of the whole split.
Determinism the same upstream artifacts and settings give byte-identical shards: bucket
        choice is a hash of (seed, position), a bucket is its pieces in file order, the
        in-bucket order a seeded permutation; nothing depends on timing, batching, workers or
        the executor.
Resume  both passes resume unit by unit from their markers (a file tokenized, a bucket
        written); inside a bucket each shard is written under a temporary name and renamed,
        so a shard that exists is complete and is skipped (files are uploaded as progress on
        remote stores).
Memory  pass 1: one document file's token ids twice over (~4 bytes per token; a file is about
        stages.extract.shard_mb of text) and one batch of encodings (~100 B per token while
        the Rust encodings live) per worker; pass 2: one bucket (about one shard) twice over
        per worker, plus a row group being written; the driver plans pass 2 from the buckets'
        lengths, one bucket at a time. None grows with the corpus (benchmarks/shard.py).
Disk    the pieces in the scratch folder: 2 bytes per token and 4 per document (an
        uncompressed copy of the corpus' ids), dropped at commit.
Fails   when the tokenizer has 65536 tokens or more (uint16 ids; names the setting to fix),
        or when the corpus has no document with text.
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from profiles.schema import Strict
from storage.artifacts import SCRATCH
from storage.errors import SlmError
from tasks.chat_data import EOS
from tasks.corpus.documents import document_files, iter_batches
from tasks.corpus.parallel import Unit, run_units
from tasks.corpus.positions import mix64
from tasks.registry import Stage, StageResult

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


# --- pass 1: tokenize each document file into its share of every bucket (one unit per file) ---
def text_chunks(path: Path, first_position: int, batch_chars: int) -> Iterator[tuple[list[str], np.ndarray, list[str]]]:
    """A document file in order, in chunks of about batch_chars characters: (texts, their corpus
    positions, ids of the documents without text, skipped)."""
    texts, positions, empty, chars = [], [], [], 0
    position = first_position
    for batch in iter_batches(path, columns=["id", "text"]):
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
                yield texts, np.array(positions, np.int64), empty
                texts, positions, empty, chars = [], [], [], 0
        position += len(batch)
    yield texts, np.array(positions, np.int64), empty


def token_arrays(encodings, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Encodings -> (all ids with EOS after each document, uint16; lengths incl. EOS, int64)."""
    ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    body = np.fromiter(chain.from_iterable(ids), dtype=np.uint16, count=int(lengths.sum()))
    flat = np.insert(body, np.cumsum(lengths), np.uint16(eos))
    return flat, lengths + 1


def by_bucket(flat: np.ndarray, lengths: np.ndarray, buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The documents (slices of `flat`) reordered bucket by bucket, each bucket's in their order
    (a stable sort): (ids, lengths) in that order."""
    order = np.argsort(buckets, kind="stable")
    lens = lengths[order]
    starts = (np.cumsum(lengths) - lengths)[order]
    return flat[np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))], lens


def _write_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    array.tofile(tmp)
    os.replace(tmp, path)


def piece_files(name: str) -> list[str]:
    """A pass-1 unit's files, relative to the artifact directory: its documents' token ids
    (uint16) and lengths (uint32), bucket by bucket, and the index: [buckets + 1, 2] int64, where
    bucket b's documents and tokens start in the piece (row b) and end (row b + 1)."""
    return [f"{SCRATCH}/pieces/{name}.{kind}" for kind in ("ids", "len", "index")]


def tokenize_unit(args: dict) -> dict:
    """One unit of pass 1: tokenize one document file and file each document under its bucket.

    A document's bucket is a seeded hash of its corpus position (the validation documents, drawn
    by the plan, go to the val buckets), so it does not depend on which unit or worker ran.
    Writes the piece_files of the unit (temp names, then renamed; the index last). Memory: the
    file's token ids twice over (~4 bytes per token), one encode batch of Rust encodings."""
    from tokenizers import Tokenizer

    clock = time.perf_counter()
    out, name = Path(args["out"]), args["name"]
    tok = Tokenizer.from_file(args["tokenizer"])
    tok.encode_special_tokens = True  # "<|im_end|>" written in a document is text, not a control token
    n_train, n_val = args["buckets"]
    val_positions = np.asarray(args["val_positions"], dtype=np.int64)
    flats, lengths, buckets, empty = [], [], [], []

    def file_away(positions: np.ndarray, encodings) -> None:
        flat, lens = token_arrays(encodings, args["eos"])
        h = mix64(positions, args["seed"])
        val = n_train + (h % np.uint64(max(n_val, 1))).astype(np.int64)
        train = (h % np.uint64(n_train)).astype(np.int64)
        flats.append(flat)
        lengths.append(lens)
        buckets.append(np.where(np.isin(positions, val_positions, assume_unique=True), val, train))

    # The encoder thread runs batch k+1 in Rust (GIL released, all cores) while this thread
    # files batch k; at most two batches of encodings are alive.
    with ThreadPoolExecutor(max_workers=1) as encoder:
        pending: deque = deque()
        for texts, positions, skipped in text_chunks(Path(args["path"]), args["first_position"], args["batch_chars"]):
            empty += skipped
            if texts:
                pending.append((positions, encoder.submit(tok.encode_batch_fast, texts, add_special_tokens=False)))
            if len(pending) >= 2:
                positions, future = pending.popleft()
                file_away(positions, future.result())
        while pending:
            positions, future = pending.popleft()
            file_away(positions, future.result())
    flat = np.concatenate(flats) if flats else np.zeros(0, np.uint16)
    flats.clear()  # the batches' copy goes: the file's ids are held twice at most (flat, then ids)
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    bucket = np.concatenate(buckets) if buckets else np.zeros(0, np.int64)
    ids, lens_sorted = by_bucket(flat, lens, bucket)
    del flat
    per_bucket = np.stack([np.bincount(bucket, minlength=n_train + n_val),
                           np.bincount(bucket, weights=lens, minlength=n_train + n_val).astype(np.int64)], axis=1)
    index = np.concatenate([np.zeros((1, 2), np.int64), np.cumsum(per_bucket, axis=0)])
    files = piece_files(name)
    (out / files[0]).parent.mkdir(parents=True, exist_ok=True)
    _write_array(out / files[0], ids)
    _write_array(out / files[1], lens_sorted.astype(np.uint32))
    _write_array(out / files[2], index.astype(np.int64))
    return {"docs": len(lens), "tokens": int(lens.sum()), "dropped": len(empty), "dropped_ids": empty[:100],
            "files": files, "seconds": time.perf_counter() - clock}


def pass_one(plan: Plan, cfg: ShardSettings, tokenizer_path: Path, eos: int, out) -> tuple[list[str], dict]:
    """Tokenize every document file (tasks.corpus.parallel: local workers or Ray tasks, resumed
    file by file). Returns the pieces in file order and the pass's counts."""
    units, position = [], 0
    for i, path in enumerate(plan.files):
        rows = pq.ParquetFile(path).metadata.num_rows
        lo, hi = np.searchsorted(plan.val_positions, [position, position + rows])
        units.append(Unit(f"f{i:05d}", {
            "name": f"f{i:05d}", "path": str(path), "tokenizer": str(tokenizer_path), "eos": eos,
            "out": str(out.path), "first_position": position, "val_positions": plan.val_positions[lo:hi].tolist(),
            "buckets": [plan.buckets["train"], plan.buckets["val"]], "seed": cfg.seed,
            "batch_chars": cfg.batch_chars, "size": path.stat().st_size}))
        position += rows
    done = run_units(out, "shard-tokenize", units, tokenize_unit, desc="shard: tokenize")
    results = [done[u.name] for u in units]
    counts = {"docs": sum(r["docs"] for r in results), "tokens": sum(r["tokens"] for r in results),
              "dropped": sum(r["dropped"] for r in results),
              "dropped_ids": [i for r in results for i in r["dropped_ids"]][:100]}
    return [u.name for u in units], counts


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


def read_bucket(root: str, pieces: list[str], bucket: int, ids: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Bucket b's documents as pass 1 left them: each piece's share, in file order, read as byte
    ranges (the index's rows b and b + 1, then the lengths and ids between them), so a reader
    touches only its bucket. `root` is the artifact directory: a local folder, or the store's
    partial work (an fsspec URL) for a Ray worker on an object-store root. Returns (lengths
    int64, ids uint16 or None when ids is False)."""
    fs, base = fsspec.core.url_to_fs(root)
    lens, values = [], []
    for name in pieces:
        ids_rel, len_rel, index_rel = (f"{base}/{rel}" for rel in piece_files(name))
        (d0, t0), (d1, t1) = np.frombuffer(fs.cat_file(index_rel, start=16 * bucket, end=16 * (bucket + 2)),
                                           np.int64).reshape(2, 2).tolist()
        if d1 > d0:
            lens.append(np.frombuffer(fs.cat_file(len_rel, start=4 * d0, end=4 * d1), np.uint32))
            if ids:
                values.append(np.frombuffer(fs.cat_file(ids_rel, start=2 * t0, end=2 * t1), np.uint16))
    length = np.concatenate(lens).astype(np.int64) if lens else np.zeros(0, np.int64)
    return length, (np.concatenate(values) if values else np.zeros(0, np.uint16)) if ids else None


def bucket_unit(args: dict) -> dict:
    """One unit of pass 2: permute one bucket and write its shards (those not written yet; a
    shard is written under a temporary name and renamed). Runs in a worker."""
    cfg = ShardSettings.model_validate(args["settings"])
    out, b = Path(args["out"]), args["bucket"]
    rels = [f"{args['split']}/{args['first'] + i:05d}.parquet" for i in range(args["shards"])]
    missing = [i for i, rel in enumerate(rels) if not (out / rel).exists()]
    if missing:
        lens, ids = read_bucket(args["pieces_root"], args["pieces"], b)
        perm, cuts = bucket_order(b, lens, cfg)
        ends = np.cumsum(lens)
        for i in missing:
            docs = perm[cuts[i]:cuts[i + 1]]
            values = np.concatenate([ids[e - n:e] for e, n in zip(ends[docs].tolist(), lens[docs].tolist())])
            write_shard(out / rels[i], values, lens[docs], cfg.row_group_tokens)
    return {"files": rels, "shards": [[rel, *shard_stats(out / rel)] for rel in rels]}


def pass_two(plan: Plan, cfg: ShardSettings, pieces: list[str], out) -> list[dict]:
    """Write every shard, one unit per bucket (tasks.corpus.parallel: local workers or Ray tasks,
    resumed bucket by bucket). The shards' numbers are planned here from the buckets' document
    lengths alone (4 bytes per document read, one bucket at a time), so a unit needs nothing
    from another. Returns the shard list."""
    units, settings = [], cfg.model_dump()
    # Where the units read the pieces: here, or (Ray workers on an object-store root) the store's
    # copy of this stage's partial work, where pass 1's units uploaded them.
    store = getattr(out, "store", None)
    remote = getattr(out, "executor", "local") == "ray" and store is not None and not store.is_local
    root = store.fs.unstrip_protocol(store.partial_path(out.stage, out.key)) if remote else str(out.path)
    for split in SPLITS:
        number = 0
        for b in plan.bucket_ids(split):
            lens, _ = read_bucket(str(out.path), pieces, b, ids=False)
            if len(lens) == 0:
                continue
            _, cuts = bucket_order(b, lens, cfg)
            units.append(Unit(f"{b:05d}", {"bucket": b, "split": split, "first": number, "shards": len(cuts) - 1,
                                           "settings": settings, "pieces_root": root, "pieces": pieces,
                                           "out": str(out.path), "size": 2 * int(lens.sum())}))
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

    files = [out.local_input(documents, rel) for rel in document_files(documents)]
    bytes_per_token = float(tokenizer.extra.get("compression", {}).get("bytes_per_token") or 2.5)
    plan = make_plan(files, cfg, bytes_per_token)
    clock = time.perf_counter()
    pieces, counts = pass_one(plan, cfg, out.local_input(tokenizer, "tokenizer.json"), eos, out)
    tokenize_seconds = time.perf_counter() - clock
    if counts["docs"] == 0:
        raise ShardError(f"dedup/{documents.key[:16]}: none of the {plan.docs} documents has text")
    shards = pass_two(plan, cfg, pieces, out)
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
