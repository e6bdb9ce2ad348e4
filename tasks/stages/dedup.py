"""dedup: remove exact and near-duplicate documents, keeping one per duplicate cluster.

Reads   clean's docs/*.parquet.
Writes  docs/<same shard name>.parquet: the kept documents (meta gets dup_cluster_size when a
        document stands for a cluster of 2 or more, FineWeb-2 style, for later upsampling);
        duplicates.parquet: every removed document with the one kept in its place (removed_id,
        kept_id, kind exact|near, jaccard_estimate); report.md + report.png: the data report
        of the whole corpus run (extract -> dedup), with a sample of removed pairs.
How     1. per shard, in runtime.workers processes: an exact key per document (xxh3-128 of its
           text without whitespace) and a MinHash signature (tasks/corpus/minhash: character
           n-grams for Chinese, word n-grams for Latin text, num_perm permutations of a 64-bit
           shingle hash, vectorized), cut into LSH bands; written to the stage's scratch space.
        2. in this process: exact duplicates grouped by key; then, band by band, documents with
           an equal band become candidate pairs (datasketch MinHashLSH's banding, with the bands and
           rows its _optimal_param gives for threshold and num_perm, done by sorting);
           with `verify` a pair counts only if its signatures agree on >= threshold of their
           values (the MinHash estimate of Jaccard similarity); clusters are the connected
           components of the pairs (scipy). The kept document of a cluster is the first in
           corpus order: sources in profile order, then files, then records, so a source listed
           first wins (deterministic, whatever the number of workers).
        3. per shard, in parallel: the kept documents are written; report.png (it needs only
           the counts and length histograms, known after step 2) is drawn on the pool meanwhile.
Memory  steps 1 and 3: one chunk of documents (~256k characters) per worker, whatever the
        corpus size. Step 2 grows with the number of documents N, not with their length:
        ~80 bytes each (exact keys, lengths, cluster arrays) plus one band's keys with their sort
        temporaries (~50 bytes each) at a time, plus ~30 bytes per candidate pair; the
        signatures stay on disk (memory-mapped; only the rows of candidate pairs are read).
        10 M documents: ~1.3 GB.
Beyond  one machine's memory (~100 M documents on 24 GB), the same steps scale out: steps 1
        and 3 are independent per shard (a Dask or Ray cluster through Prefect's task runners,
        prefect-dask / prefect-ray), and step 2 becomes disk-based bucket stages: each band's
        (key, ordinal) pairs partitioned by key prefix into files, each partition sorted on its
        own to emit candidate pairs, then connected components over the pair files (e.g. a
        Dask dataframe union-find). Not built here: the corpora of this project's profiles fit.
Resume  steps 1 and 3 keep finished shards; step 2's result is kept as one file.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from pydantic import BaseModel, ConfigDict, Field

from profiles.schema import Strict
from storage.errors import SlmError
from tasks.corpus.documents import LENGTH_EDGES, DocWriter, count_rows, empty_histogram, iter_chunks, length_bin
from tasks.corpus.minhash import band_keys, bucket_edges, estimate_jaccard, lsh_params, signatures
from tasks.corpus.parallel import Unit, in_background, run_units, shard_units
from tasks.corpus.report import finish_stage, plot_run, table, write_run_report
from tasks.corpus.text import tokenize
from tasks.registry import Stage, StageResult

STAGE_VERSION = 1
SCRATCH = "_work/dedup"
KEPT, EXACT, NEAR = 0, 1, 2
KINDS = {EXACT: "exact", NEAR: "near"}
VERIFY_BLOCK = 16384


class DedupSettings(Strict):
    exact: bool = True  # remove documents whose text (whitespace aside) is identical
    near: bool = True  # remove near-duplicates (MinHash LSH)
    num_perm: int = Field(128, ge=16, le=1024)
    threshold: float = Field(0.7, gt=0, lt=1)  # Jaccard similarity of the shingle sets
    ngram: int = Field(5, ge=1, le=32)  # shingle: n tokens (Han characters, or Latin words)
    seed: int = 1
    verify: bool = True  # keep a candidate pair only if its signature estimate >= threshold
    samples: int = Field(20, ge=0, le=1000)  # removed pairs shown in the report


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    settings: DedupSettings


def config(profile) -> DedupConfig:
    return DedupConfig(settings=profile.stages.dedup)


class DedupError(SlmError):
    pass


# --- step 1: keys and signatures per shard ---------------------------------------------------------
def exact_key(text: str) -> tuple[int, int]:
    value = xxhash.xxh3_128_intdigest("".join(text.split()).encode("utf-8"))
    return value >> 64, value & 0xFFFFFFFFFFFFFFFF


def _reserved(memmap):
    """The memmap with its file's blocks allocated now: on a full disk this raises ENOSPC here,
    where a write through the sparse mapping later would kill the process with SIGBUS."""
    if memmap.size and hasattr(os, "posix_fallocate"):
        with open(memmap.filename, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    return memmap


def signature_unit(args: dict) -> dict:
    clock = time.perf_counter()
    out, name, path = Path(args["out"]), args["name"], Path(args["path"])
    num_perm, bands, rows = args["num_perm"], args["bands"], args["rows"]
    n = count_rows(path)
    folder = out / SCRATCH / "sig"
    folder.mkdir(parents=True, exist_ok=True)
    sig_file = _reserved(np.lib.format.open_memmap(folder / f"{name}.sig.npy.tmp", mode="w+", dtype=np.uint32, shape=(n, num_perm)))
    key_file = _reserved(np.lib.format.open_memmap(folder / f"{name}.keys.npy.tmp", mode="w+", dtype=np.uint64, shape=(n, bands)))
    exact = np.zeros((n, 2), dtype=np.uint64)
    has = np.zeros(n, dtype=bool)
    chars = np.zeros(n, dtype=np.int64)
    at, size = 0, 0
    for chunk in iter_chunks(path, columns=["text"]):
        texts = [row["text"] for row in chunk]
        size += sum(len(t.encode("utf-8")) for t in texts)
        end = at + len(texts)
        exact[at:end] = [exact_key(t) for t in texts]
        chars[at:end] = [len(t) for t in texts]
        sig, present = signatures(tokenize(texts), num_perm, args["ngram"], args["seed"])
        sig_file[at:end] = sig
        key_file[at:end] = band_keys(sig, bands, rows)
        has[at:end] = present
        at = end
    sig_file.flush()
    key_file.flush()
    del sig_file, key_file
    np.savez(folder / f"{name}.info.npz", exact=exact, has=has, chars=chars)
    for kind in ("sig", "keys"):
        (folder / f"{name}.{kind}.npy.tmp").replace(folder / f"{name}.{kind}.npy")
    files = [f"{SCRATCH}/sig/{name}.{kind}" for kind in ("sig.npy", "keys.npy", "info.npz")]
    return {"rows": n, "bytes_in": size, "files": files, "seconds": time.perf_counter() - clock}


# --- step 2: clusters -------------------------------------------------------------------------------
class Signatures:
    """The shards' signature files, memory-mapped, addressed by global ordinal."""

    def __init__(self, folder: Path, names: list[str], offsets: np.ndarray):
        self.maps = [np.load(folder / f"{name}.sig.npy", mmap_mode="r") for name in names]
        self.offsets = offsets

    def rows(self, index: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        out = np.empty((len(index), self.maps[0].shape[1] if self.maps else 0), dtype=np.uint32)
        for s in np.unique(shard):
            mask = shard == s
            local = index[mask] - self.offsets[s]
            order = np.argsort(local)
            picked = np.asarray(self.maps[s][local[order]])
            rows = np.empty_like(picked)
            rows[order] = picked
            out[mask] = rows
        return out

    def jaccard(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        found = np.empty(len(a), dtype=np.float32)
        for lo in range(0, len(a), VERIFY_BLOCK):
            found[lo:lo + VERIFY_BLOCK] = estimate_jaccard(self.rows(a[lo:lo + VERIFY_BLOCK]), self.rows(b[lo:lo + VERIFY_BLOCK]))
        return found


def cluster(folder: Path, names: list[str], s: DedupSettings, bands: int) -> dict:
    """Decide, for every document, which document stays in its place (itself if kept)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    infos = [np.load(folder / f"{name}.info.npz") for name in names]
    sizes = np.array([len(info["has"]) for info in infos], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes)))[:-1]
    total = int(sizes.sum())
    exact = np.concatenate([info["exact"] for info in infos]) if names else np.zeros((0, 2), np.uint64)
    has = np.concatenate([info["has"] for info in infos]) if names else np.zeros(0, bool)
    ordinal = np.arange(total, dtype=np.int64)

    rep_exact = ordinal.copy()
    if s.exact and total:
        _, first, inverse = np.unique(exact, axis=0, return_index=True, return_inverse=True)
        rep_exact = first[inverse.reshape(-1)].astype(np.int64)

    facts = {"candidate_pairs": 0, "verified_pairs": 0}
    rep_near = ordinal.copy()
    sigs = Signatures(folder, names, offsets)
    if s.near and total:
        alive = np.flatnonzero(has & (rep_exact == ordinal))
        keys = [np.load(folder / f"{name}.keys.npy", mmap_mode="r") for name in names]
        lefts, rights = [], []
        for band in range(bands):
            column = np.concatenate([np.asarray(k[:, band]) for k in keys])[alive]
            left, right = bucket_edges(column, alive)
            lefts.append(left)
            rights.append(right)
        left = np.concatenate(lefts)
        right = np.concatenate(rights)
        if len(left):
            code = np.unique(left * total + right)
            left, right = code // total, code % total
        facts["candidate_pairs"] = int(len(left))
        if s.verify and len(left):
            good = sigs.jaccard(left, right) >= s.threshold
            left, right = left[good], right[good]
        facts["verified_pairs"] = int(len(left))
        graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(total, total)).tocsr()
        count, labels = connected_components(graph, directed=False)
        smallest = np.full(count, total, dtype=np.int64)
        np.minimum.at(smallest, labels, ordinal)
        rep_near = smallest[labels]

    final = rep_near[rep_exact]
    kind = np.where(rep_exact != ordinal, EXACT, np.where(final != ordinal, NEAR, KEPT)).astype(np.uint8)
    removed = np.flatnonzero(kind != KEPT)
    estimate = np.ones(len(removed), dtype=np.float32)
    with_sig = has[removed] & has[final[removed]]
    if with_sig.any():
        estimate[with_sig] = sigs.jaccard(removed[with_sig], final[removed][with_sig])
    cluster_size = np.bincount(final, minlength=total)
    chars = np.concatenate([info["chars"] for info in infos]) if names else np.zeros(0, np.int64)
    kept_bins = np.searchsorted(LENGTH_EDGES, chars[kind == KEPT], side="right") - 1
    kept = {"in": total, "out": int((kind == KEPT).sum()),  # what step 3 will write (the report's plot)
            "hist": np.bincount(kept_bins, minlength=len(LENGTH_EDGES)).astype(int).tolist()}
    facts.update({
        "documents": total, "exact_duplicates": int((kind == EXACT).sum()), "near_duplicates": int((kind == NEAR).sum()),
        "clusters": int((cluster_size > 1).sum()), "largest_cluster": int(cluster_size.max()) if total else 0,
    })
    return {"offsets": offsets, "sizes": sizes, "final": final, "kind": kind, "removed": removed,
            "estimate": estimate, "cluster_size": cluster_size, "facts": facts, "kept": kept}


# --- step 3: write the kept documents ------------------------------------------------------------------
def write_unit(args: dict) -> dict:
    clock = time.perf_counter()
    out, name = Path(args["out"]), args["name"]
    decision = np.load(out / SCRATCH / "decision" / f"{name}.npz")
    kind, size = decision["kind"], decision["cluster_size"]
    writer = DocWriter(out / "docs" / f"{name}.parquet")
    counts = {"in": 0, "out": 0, "chars_out": 0, "bytes_in": args["bytes_in"]}
    dropped = {"exact-duplicate": 0, "near-duplicate": 0}
    hist = empty_histogram()
    i = 0
    try:
        for chunk in iter_chunks(Path(args["path"])):
            for row in chunk:
                counts["in"] += 1
                if kind[i] == KEPT:
                    if size[i] > 1:
                        meta = json.loads(row["meta"] or "{}")
                        meta["dup_cluster_size"] = int(size[i])
                        row["meta"] = json.dumps(meta, ensure_ascii=False, sort_keys=True)
                    writer.add_row(row)
                    counts["out"] += 1
                    counts["chars_out"] += len(row["text"])
                    hist[length_bin(len(row["text"]))] += 1
                else:
                    dropped[f"{KINDS[int(kind[i])]}-duplicate"] += 1
                i += 1
    except BaseException:
        writer.abort()
        raise
    files = [f"docs/{name}.parquet"] if writer.close() else []
    return {"counts": counts, "dropped": {k: v for k, v in dropped.items() if v}, "hist": hist, "files": files,
            "seconds": time.perf_counter() - clock}


def _ids(paths: list[Path], offsets: np.ndarray, index: np.ndarray, column: str = "id") -> list:
    """Values of one column for global ordinals `index`, reading one shard's column at a time
    (pq.ParquetFile, not pq.read_table: that one imports pyarrow.dataset, ~0.25 s)."""
    found: list = [None] * len(index)
    shard = np.searchsorted(offsets, index, side="right") - 1
    for s in np.unique(shard):
        where = np.flatnonzero(shard == s)
        values = pq.ParquetFile(paths[s]).read(columns=[column]).column(column).take(pa.array(index[where] - offsets[s]))
        for position, value in zip(where, values.to_pylist()):
            found[position] = value
    return found


def run(cfg: DedupConfig, inputs: dict, out) -> StageResult:
    clock = time.perf_counter()
    upstream = inputs["clean"]
    s = cfg.settings
    bands, rows = lsh_params(s.threshold, s.num_perm)
    units = shard_units(out, upstream, {"num_perm": s.num_perm, "bands": bands, "rows": rows,
                                        "ngram": s.ngram, "seed": s.seed})
    if not units:
        raise DedupError("clean left no documents to deduplicate: loosen stages.clean or check the sources")
    signed = run_units(out, "dedup-signatures", units, signature_unit, desc="dedup signatures")
    names = [u.name for u in units]
    folder = out.path / SCRATCH / "sig"
    decided = out.path / SCRATCH / "decision"
    summary_file = out.path / SCRATCH / "clusters.json"
    if not summary_file.exists() or "kept" not in json.loads(summary_file.read_text(encoding="utf-8")):
        result = cluster(folder, names, s, bands)
        decided.mkdir(parents=True, exist_ok=True)
        for name, offset, size in zip(names, result["offsets"], result["sizes"]):
            part = slice(int(offset), int(offset + size))
            np.savez(decided / f"{name}.npz", kind=result["kind"][part], cluster_size=result["cluster_size"][part])
            out.save_progress(f"{SCRATCH}/decision/{name}.npz")
        _write_pairs(out, units, result)
        out.save_progress("duplicates.parquet")
        summary = {"facts": result["facts"], "pairs_sample": _pair_sample(out, units, result, s.samples),
                   "kept": result["kept"]}
        summary_file.write_text(json.dumps(summary, ensure_ascii=False), encoding="utf-8")
        out.save_progress(f"{SCRATCH}/clusters.json")
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    # report.png needs only each stage's in, out and length histogram, known now: it is drawn on
    # the pool while the kept documents are written (with one worker: here, after them).
    lineage = list(upstream.extra.get("lineage", [])) + [{"stage": "dedup", **summary["kept"]}]
    plotted = in_background(out, plot_run, lineage, str(out.path / "report.png"))
    write_args = [Unit(u.name, {**u.args, "bytes_in": signed[u.name]["bytes_in"]}) for u in units]
    written = run_units(out, "dedup-write", write_args, write_unit, desc="dedup write")
    plotted()
    facts = summary["facts"]
    facts.update({"bands": bands, "rows": rows, "num_perm": s.num_perm, "threshold": s.threshold,
                  "duplicate_rate": (facts["exact_duplicates"] + facts["near_duplicates"]) / max(1, facts["documents"])})
    out.log_metrics({"duplicate_rate": facts["duplicate_rate"], "exact_duplicates": facts["exact_duplicates"],
                     "near_duplicates": facts["near_duplicates"], "candidate_pairs": facts["candidate_pairs"],
                     "verified_pairs": facts["verified_pairs"], "clusters": facts["clusters"]})
    note = (f"Exact duplicates, then MinHash LSH near-duplicates: {s.num_perm} permutations, threshold {s.threshold}, "
            f"{bands} bands x {rows} rows, {s.ngram}-token shingles.")
    result = finish_stage(out, "dedup", written, clock, upstream=upstream, note=note,
                          extra={"dedup": facts, "pairs_sample": summary["pairs_sample"]})
    write_run_report(out, result.extra["lineage"], _sections(facts, summary["pairs_sample"]), plot=False)
    result.summary = (f"{facts['documents']:,} in -> {facts['documents'] - facts['exact_duplicates'] - facts['near_duplicates']:,} "
                      f"out: {facts['exact_duplicates']:,} exact and {facts['near_duplicates']:,} near duplicates "
                      f"({facts['duplicate_rate']:.1%})")
    return result


def _write_pairs(out, units, result) -> None:
    paths = [Path(u.args["path"]) for u in units]
    removed = result["removed"]
    kept = result["final"][removed]
    ids = _ids(paths, result["offsets"], np.concatenate([removed, kept]))  # one read of each shard's ids
    table_ = pa.table({
        "removed_id": pa.array(ids[:len(removed)], pa.string()),
        "kept_id": pa.array(ids[len(removed):], pa.string()),
        "kind": pa.array([KINDS[int(k)] for k in result["kind"][removed]], pa.string()),
        "jaccard_estimate": pa.array(result["estimate"], pa.float32()),
    })
    pq.write_table(table_, out.path / "duplicates.parquet", compression="zstd")


def _pair_sample(out, units, result, k: int) -> list[dict]:
    """k removed documents (smallest hash of their id) with the document kept in their place."""
    if k <= 0 or not len(result["removed"]):
        return []
    paths = [Path(u.args["path"]) for u in units]
    pairs = pq.ParquetFile(out.path / "duplicates.parquet").read()
    hashes = np.array([xxhash.xxh64_intdigest(i.encode("utf-8")) for i in pairs.column("removed_id").to_pylist()], dtype=np.uint64)
    chosen = np.argsort(hashes, kind="stable")[:k]
    removed = result["removed"][chosen]
    kept = result["final"][removed]
    texts = _ids(paths, result["offsets"], np.concatenate([removed, kept]), "text")
    removed_text, kept_text = texts[:len(removed)], texts[len(removed):]
    sample = []
    for j, row in enumerate(chosen):
        sample.append({
            "removed_id": pairs.column("removed_id")[int(row)].as_py(), "kept_id": pairs.column("kept_id")[int(row)].as_py(),
            "kind": pairs.column("kind")[int(row)].as_py(),
            "jaccard_estimate": round(float(pairs.column("jaccard_estimate")[int(row)].as_py()), 3),
            "removed_text": removed_text[j][:200], "kept_text": kept_text[j][:200],
        })
    return sample


def _sections(facts: dict, sample: list[dict]) -> list[str]:
    rows = [[k, v] for k, v in facts.items()]
    lines = ["## Deduplication", "", table(["fact", "value"], rows), ""]
    if sample:
        lines += ["## Sample of removed documents and the document kept in their place", "",
                  table(["kind", "Jaccard (est.)", "removed", "kept"],
                        [[p["kind"], p["jaccard_estimate"], f"{p['removed_id']}: {p['removed_text'][:120]}",
                          f"{p['kept_id']}: {p['kept_text'][:120]}"] for p in sample]), ""]
    return lines


STAGE = Stage(
    name="dedup",
    version=STAGE_VERSION,
    upstream=("clean",),
    settings=DedupSettings,
    config=config,
    run=run,
)
