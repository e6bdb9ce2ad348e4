"""dedup: remove exact and near-duplicate documents, keeping one per duplicate cluster.

Reads   clean's docs/*.parquet.
Writes  docs/<same shard name>.parquet: the kept documents (meta gets dup_cluster_size when a
        document stands for a cluster of 2 or more, FineWeb-2 style, for later upsampling);
        duplicates.parquet: every removed document with the one kept in its place (removed_id,
        kept_id, kind exact|near, jaccard_estimate); report.md + report.png: the data report
        of the whole corpus run (extract -> dedup), with a sample of removed pairs.
How     1. per shard, in runtime.workers processes (or Ray tasks): an exact key per document
           (xxh3-128 of its text without whitespace) and a MinHash signature (tasks/corpus/minhash:
           character n-grams for Chinese, word n-grams for Latin text, num_perm permutations of a
           64-bit shingle hash, vectorized), cut into LSH bands (the bands and rows datasketch
           MinHashLSH's _optimal_param gives for threshold and num_perm). The exact keys and the
           band keys are written hash-partitioned (`partitions` files each), the signatures as a
           memory-mapped file; all in the stage's scratch space.
        2. hash-partitioned, as units on the same workers (tasks/corpus/clusters.py, polars):
           per partition, exact duplicates grouped by key; per partition, the documents with an
           equal band (exact duplicates left out) become candidate pairs; per pair partition,
           with `verify` a pair counts only if its signatures agree on >= threshold of their
           values (the MinHash estimate of Jaccard similarity); clusters are the connected
           components of the verified pairs (rounds of large-star / small-star units over the
           edges partitioned by node: only documents with a pair take part). Then per shard,
           its decision: which of its documents go and in favour of which. The kept document of a cluster is the
           first in corpus order: sources in profile order, then files, then records, so a source
           listed first wins (deterministic, whatever the number of workers or partitions).
        3. per shard, in parallel: the kept documents are written; report.png (it needs only
           the counts and length histograms, known after step 2) is drawn on the pool meanwhile.
Memory  steps 1 and 3: one chunk of documents (~256k characters) per worker, whatever the
        corpus size. Step 2's units: one partition of the band rows (~24 bytes x bands per
        document / partitions) or of the verified pairs, and the corpus's exact-removed doc ids
        (8 bytes each); duplicates.parquet is streamed shard by shard, one row group (64 Ki
        rows) held at a time by this process. Signatures stay on disk (only the rows of
        candidate pairs are read). docs/scale.md has the measured figures.
Resume  every unit of steps 1, 2 and 3 keeps its marker (tasks/corpus/parallel.py), the
        components' phases included; the summary is kept as one file.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from pydantic import BaseModel, ConfigDict, Field

from profiles.schema import Strict
from storage.errors import SlmError
from tasks.corpus import clusters
from tasks.corpus.documents import (
    LENGTH_EDGES,
    DocWriter,
    count_rows,
    empty_histogram,
    iter_chunks,
    length_bin,
)
from tasks.corpus.minhash import band_keys, lsh_params, signatures
from tasks.corpus.parallel import Unit, in_background, run_units, shard_units
from tasks.corpus.report import finish_stage, plot_run, table, write_run_report
from tasks.corpus.text import tokenize
from tasks.registry import Stage, StageResult

STAGE_VERSION = 3  # 2: step 2 hash-partitioned (tasks/corpus/clusters.py); 3: components as units, smaller row groups
SCRATCH = clusters.FOLDER  # "_work/dedup": step 2 (clusters.py) reads the signatures step 1 writes there
KEPT, EXACT, NEAR = 0, 1, 2
KINDS = {EXACT: "exact", NEAR: "near"}


class DedupSettings(Strict):
    exact: bool = True  # remove documents whose text (whitespace aside) is identical
    near: bool = True  # remove near-duplicates (MinHash LSH)
    num_perm: int = Field(128, ge=16, le=1024)
    threshold: float = Field(0.7, gt=0, lt=1)  # Jaccard similarity of the shingle sets
    ngram: int = Field(5, ge=1, le=32)  # shingle: n tokens (Han characters, or Latin words)
    seed: int = 1
    verify: bool = True  # keep a candidate pair only if its signature estimate >= threshold
    samples: int = Field(20, ge=0, le=1000)  # removed pairs shown in the report
    # Hash partitions of step 2: each partition is one unit of work (memory per worker ~ the
    # corpus's band rows / partitions). The output does not depend on it.
    partitions: int = Field(8, ge=1, le=4096)


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


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def signature_unit(args: dict) -> dict:
    clock = time.perf_counter()
    out, name, path = Path(args["out"]), args["name"], Path(args["path"])
    num_perm, bands, rows = args["num_perm"], args["bands"], args["rows"]
    n = count_rows(path)
    folder = out / SCRATCH / "sig"
    folder.mkdir(parents=True, exist_ok=True)
    sig_file = _reserved(np.lib.format.open_memmap(folder / f"{name}.sig.npy.tmp", mode="w+", dtype=np.uint32, shape=(n, num_perm)))
    keys = np.zeros((n, bands), dtype=np.uint64)
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
        keys[at:end] = band_keys(sig, bands, rows)
        has[at:end] = present
        at = end
    sig_file.flush()
    del sig_file
    files = clusters.write_partitions(out, name, args["shard"], exact, keys, has, args["partitions"])
    _save_npy(folder / f"{name}.has.npy", has)
    _save_npy(folder / f"{name}.chars.npy", chars)
    (folder / f"{name}.sig.npy.tmp").replace(folder / f"{name}.sig.npy")
    files += [f"{SCRATCH}/sig/{name}.{kind}.npy" for kind in ("has", "chars", "sig")]
    return {"rows": n, "bytes_in": size, "files": files, "seconds": time.perf_counter() - clock}


# --- step 2: clusters (tasks/corpus/clusters.py), then each shard's decision -------------------------
def decide_unit(args: dict) -> dict:
    """Shard s's decision: which of its documents go (exact or near, and in favour of which
    document) and, for the documents it keeps, the size of the cluster each stands for.

    Scans the component labels and the exact duplicates' final documents of the whole corpus
    (polars streams them, keeping only the rows of this shard, and the cluster sizes of its kept
    documents). Writes decision/<name>.npz
    (kind, cluster_size per row, for step 3), removed/<name>.arrow (this shard's removed documents,
    in order: doc, final, kind, jaccard_estimate, removed_id) and finals/<name>.arrow (the id of
    each of its documents that others were removed for: final, kept_id)."""
    clock = time.perf_counter()
    out, name, shard, n = Path(args["out"]), args["name"], args["shard"], args["rows"]
    folder = out / SCRATCH
    removed = [pl.LazyFrame(schema={"doc": pl.Int64, "final": pl.Int64, "kind": pl.UInt8})]
    if args["label_files"]:
        removed.append(pl.scan_ipc([out / rel for rel in args["label_files"]]).filter(pl.col("node") != pl.col("label"))
                       .select(doc="node", final="label", kind=pl.lit(NEAR, pl.UInt8)))
    if args["exact_final_files"]:
        removed.append(pl.scan_ipc([out / rel for rel in args["exact_final_files"]])
                       .select("doc", "final", kind=pl.lit(EXACT, pl.UInt8)))
    everything = pl.concat(removed)
    mine = (everything.filter((pl.col("doc") // (1 << clusters.ROW_BITS)) == shard).sort("doc")
            .collect(engine="streaming"))
    sizes = (everything.filter((pl.col("final") // (1 << clusters.ROW_BITS)) == shard)
             .group_by("final").agg(size=pl.len() + 1).sort("final").collect(engine="streaming"))
    rows = mine["doc"].to_numpy() & clusters.ROW_MASK
    kind = np.zeros(n, dtype=np.uint8)
    kind[rows] = mine["kind"].to_numpy()
    cluster_size = np.ones(n, dtype=np.int64)
    cluster_size[sizes["final"].to_numpy() & clusters.ROW_MASK] = sizes["size"].to_numpy()

    final = mine["final"].to_numpy()
    sig = folder / "sig"
    has = np.load(sig / f"{name}.has.npy")
    with_sig = has[rows] & _has(sig, args["names"], final)
    estimate = np.ones(len(rows), dtype=np.float32)
    if with_sig.any():
        estimate[with_sig] = clusters.Signatures(sig, args["names"]).jaccard(mine["doc"].to_numpy()[with_sig], final[with_sig])
    ids = pq.ParquetFile(args["path"]).read(columns=["id"]).column("id")
    removed_id = ids.take(pa.array(rows)).to_pylist()
    kept_rows = sizes["final"].to_numpy() & clusters.ROW_MASK
    _save_npz(folder / "decision" / f"{name}.npz", kind=kind, cluster_size=cluster_size)
    clusters.write_ipc(mine.with_columns(jaccard_estimate=pl.Series(estimate), removed_id=pl.Series(removed_id, dtype=pl.String)),
                    folder / "removed" / f"{name}.arrow")
    clusters.write_ipc(sizes.select("final", kept_id=pl.Series(ids.take(pa.array(kept_rows)).to_pylist(), dtype=pl.String)),
                    folder / "finals" / f"{name}.arrow")
    chars = np.load(sig / f"{name}.chars.npy")
    kept_bins = np.searchsorted(LENGTH_EDGES, chars[kind == KEPT], side="right") - 1
    hashes = np.array([xxhash.xxh64_intdigest(i.encode("utf-8")) for i in removed_id], dtype=np.uint64)
    first = np.lexsort((mine["doc"].to_numpy(), hashes))[:args["samples"]]
    return {
        "documents": n, "exact_duplicates": int((kind == EXACT).sum()), "near_duplicates": int((kind == NEAR).sum()),
        "clusters": sizes.height, "largest_cluster": int(cluster_size.max()) if n else 0, "kept": int((kind == KEPT).sum()),
        "hist": np.bincount(kept_bins, minlength=len(LENGTH_EDGES)).astype(int).tolist(),
        "sample": [[str(hashes[i]), int(mine["doc"][int(i)]), int(final[i]), int(mine["kind"][int(i)]), float(estimate[i])]
                   for i in first],
        "files": [f"{SCRATCH}/{part}/{name}.{ext}" for part, ext in (("decision", "npz"), ("removed", "arrow"), ("finals", "arrow"))],
        "seconds": time.perf_counter() - clock,
    }


def _has(folder: Path, names: list[str], docs: np.ndarray) -> np.ndarray:
    """Whether each doc (of any shard) has a signature, reading one shard's flags at a time."""
    found = np.zeros(len(docs), dtype=bool)
    shard = docs >> clusters.ROW_BITS
    for s in np.unique(shard):
        mask = shard == s
        found[mask] = np.load(folder / f"{names[int(s)]}.has.npy", mmap_mode="r")[docs[mask] & clusters.ROW_MASK]
    return found


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def step2(out, units: list[Unit], signed: dict, s: DedupSettings) -> dict:
    """Clusters and per-shard decisions, as units on the pool or Ray (each resumable), then
    duplicates.parquet and the summary (facts, pair sample, kept histogram) for the report."""
    names = [u.name for u in units]
    parts = range(s.partitions)
    base = {"out": str(out.path), "names": names, "partitions": s.partitions}
    exact_files: list[str] = []
    if s.exact:
        # "inputs": what a unit reads of other units' files (fetched by a Ray worker on an object-store root)
        done = run_units(out, "dedup-exact", [Unit(f"p{p}", {**base, "partition": p, "inputs": clusters.partition_files(
                             "exact-in", p, names)}) for p in parts], clusters.exact_unit, desc="dedup exact groups")
        exact_files = [f for r in done.values() for f in r["files"]]
    facts = {"candidate_pairs": 0, "verified_pairs": 0}
    edge_files: list[str] = []
    if s.near:
        done = run_units(out, "dedup-buckets", [Unit(f"p{p}", {**base, "partition": p, "exact_files": exact_files,
                                                             "inputs": clusters.partition_files("bands-in", p, names)
                                                             + exact_files})
                                                for p in parts], clusters.bucket_unit, desc="dedup buckets")
        pair_files = [f for r in done.values() for f in r["files"]]
        verify = []
        for q in parts:
            mine = destined_to(pair_files, q)
            verify.append(Unit(f"q{q}", {**base, "partition": q, "verify": s.verify, "threshold": s.threshold,
                                         "pair_files": mine,
                                         "inputs": mine + (clusters.signature_files(names) if s.verify else [])}))
        done = run_units(out, "dedup-verify", verify, clusters.verify_unit, desc="dedup verify")
        facts["candidate_pairs"] = sum(r["candidate_pairs"] for r in done.values())
        facts["verified_pairs"] = sum(r["verified_pairs"] for r in done.values())
        edge_files = [f for r in done.values() for f in r["files"]]
    star_files = star_phases(out, base, edge_files, s.partitions) if edge_files else []
    done = run_units(out, "dedup-labels", [Unit(f"p{p}", {**base, "partition": p, "star_files": destined_to(star_files, p),
                                                        "exact_files": exact_files,
                                                        "inputs": destined_to(star_files, p) + exact_files})
                                           for p in parts], clusters.label_unit, desc="dedup labels")
    label_files = [f for r in done.values() for f in r["files"] if "/labels/" in f]
    exact_final = [f for r in done.values() for f in r["files"] if "/exact-final/" in f]
    shared = label_files + exact_final + clusters.signature_files(names, ("has", "sig"))
    decide = [Unit(u.name, {**base, "name": u.name, "shard": i, "path": u.args["path"], "rows": signed[u.name]["rows"],
                            "label_files": label_files, "exact_final_files": exact_final, "samples": s.samples,
                            "inputs": shared})
              for i, u in enumerate(units)]
    decided = run_units(out, "dedup-decide", decide, decide_unit, desc="dedup decide")
    _write_pairs(out, names)
    out.save_progress("duplicates.parquet")
    results = [decided[name] for name in names]
    total = sum(r["documents"] for r in results)
    facts.update({
        "documents": total, "exact_duplicates": sum(r["exact_duplicates"] for r in results),
        "near_duplicates": sum(r["near_duplicates"] for r in results), "clusters": sum(r["clusters"] for r in results),
        "largest_cluster": max((r["largest_cluster"] for r in results), default=0),
    })
    hist = np.sum([r["hist"] for r in results], axis=0).astype(int).tolist()
    kept = {"in": total, "out": sum(r["kept"] for r in results), "hist": hist}
    return {"facts": facts, "pairs_sample": _pair_sample(units, results, s.samples), "kept": kept}


MAX_STAR_PHASES = 200  # a chain of n nodes takes O(log^2 n) rounds; far more means a bug


def destined_to(files: list[str], p: int) -> list[str]:
    """The files of one phase destined to partition p (written as .../<dest>.arrow)."""
    return [f for f in files if f.endswith(f"/{p}.arrow")]


def star_phases(out, base: dict, edge_files: list[str], partitions: int) -> list[str]:
    """The connected components of the verified edges as rounds of units (tasks/corpus/clusters.py
    star_unit): large-star and small-star steps alternated until a pair of them changes nothing.
    Each phase is resumable like any other (dedup-components-<k>); returns the last phase's files."""
    files = edge_files
    last_large = None
    for k in range(MAX_STAR_PHASES):
        step = "large" if k % 2 == 0 else "small"
        phase = [Unit(f"p{p}", {**base, "partition": p, "step": step, "first": k == 0, "folder": f"{SCRATCH}/cc/{k}",
                                "inputs": files if k == 0 else destined_to(files, p)})
                 for p in range(partitions)]
        done = run_units(out, f"dedup-components-{k}", phase, clusters.star_unit, desc=f"dedup components {k}")
        files = sorted(f for r in done.values() for f in r["files"])
        changes = sum(r["changes"] for r in done.values())
        if step == "large":
            last_large = changes
        elif last_large == 0 and changes == 0:
            return files
    raise DedupError(f"the connected components did not settle in {MAX_STAR_PHASES} phases: a bug, please report it")


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


def run(cfg: DedupConfig, inputs: dict, out) -> StageResult:
    clock = time.perf_counter()
    upstream = inputs["clean"]
    s = cfg.settings
    bands, rows = lsh_params(s.threshold, s.num_perm)
    units = shard_units(out, upstream, {"num_perm": s.num_perm, "bands": bands, "rows": rows,
                                        "ngram": s.ngram, "seed": s.seed})
    if not units:
        raise DedupError("clean left no documents to deduplicate: loosen stages.clean or check the sources")
    units = [Unit(u.name, {**u.args, "shard": i, "partitions": s.partitions}) for i, u in enumerate(units)]
    signed = run_units(out, "dedup-signatures", units, signature_unit, desc="dedup signatures")
    summary_file = out.path / SCRATCH / "clusters.json"
    if not summary_file.exists():
        summary = step2(out, units, signed, s)
        tmp = summary_file.with_name(summary_file.name + ".tmp")
        tmp.write_text(json.dumps(summary, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, summary_file)
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


def _ids(units: list[Unit], docs: list[int], column: str = "id") -> list:
    """Values of one column for doc ids, reading one shard's column at a time
    (pq.ParquetFile, not pq.read_table: that one imports pyarrow.dataset, ~0.25 s)."""
    docs = np.asarray(docs, dtype=np.int64)
    found: list = [None] * len(docs)
    shard = docs >> clusters.ROW_BITS
    for s in np.unique(shard):
        where = np.flatnonzero(shard == s)
        values = (pq.ParquetFile(units[int(s)].args["path"]).read(columns=[column]).column(column)
                  .take(pa.array(docs[where] & clusters.ROW_MASK)))
        for position, value in zip(where, values.to_pylist()):
            found[position] = value
    return found


PAIRS_SCHEMA = pa.schema([("removed_id", pa.string()), ("kept_id", pa.string()), ("kind", pa.string()),
                          ("jaccard_estimate", pa.float32())])
ROW_GROUP = 64 * 1024  # rows per row group of duplicates.parquet: the writer holds one (~5 MB), whatever the corpus


def _write_pairs(out, names: list[str]) -> None:
    """duplicates.parquet: every removed document, in corpus order, with the one kept in its place.
    Streamed shard by shard (the kept ids found by a join with every shard's finals), in row groups
    of ROW_GROUP rows; written under a temp name, then renamed."""
    folder = out.path / SCRATCH
    finals = pl.scan_ipc([folder / "finals" / f"{name}.arrow" for name in names])
    path = out.path / "duplicates.parquet"
    tmp = path.with_name(path.name + ".tmp")
    pending: list[pa.Table] = [PAIRS_SCHEMA.empty_table()]
    held, written = 0, 0
    with pq.ParquetWriter(tmp, PAIRS_SCHEMA, compression="zstd") as writer:
        for name in names:
            part = (pl.scan_ipc(folder / "removed" / f"{name}.arrow")
                    .join(finals, on="final", how="left", maintain_order="left")
                    .select("removed_id", "kept_id", kind=pl.col("kind").replace_strict(KINDS, return_dtype=pl.String),
                            jaccard_estimate="jaccard_estimate")
                    .collect(engine="streaming"))
            pending.append(part.to_arrow().cast(PAIRS_SCHEMA))
            held += part.height
            while held >= ROW_GROUP:
                whole = pa.concat_tables(pending)
                writer.write_table(whole.slice(0, ROW_GROUP), row_group_size=ROW_GROUP)
                pending, held, written = [whole.slice(ROW_GROUP)], held - ROW_GROUP, written + ROW_GROUP
        if held or not written:
            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP)
    os.replace(tmp, path)


def _pair_sample(units: list[Unit], results: list[dict], k: int) -> list[dict]:
    """k removed documents (smallest hash of their id) with the document kept in their place."""
    chosen = sorted((c for r in results for c in r["sample"]), key=lambda c: (int(c[0]), c[1]))[:k]
    if not chosen:
        return []
    docs = [c[1] for c in chosen] + [c[2] for c in chosen]
    ids, texts = _ids(units, docs), _ids(units, docs, "text")
    sample = []
    for j, (_, _, _, kind, estimate) in enumerate(chosen):
        sample.append({
            "removed_id": ids[j], "kept_id": ids[len(chosen) + j], "kind": KINDS[kind],
            "jaccard_estimate": round(float(np.float32(estimate)), 3),
            "removed_text": texts[j][:200], "kept_text": texts[len(chosen) + j][:200],
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
