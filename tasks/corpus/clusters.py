"""Duplicate clusters from per-shard keys and LSH bands, hash-partitioned, with polars.

The documents of a corpus are named by a doc id that sorts in corpus order without a global
count: doc = shard index << ROW_BITS | row within the shard (shards in plan order, which is
sources in profile order, then files, then records).

Step 1 (per shard, tasks.stages.dedup.signature_unit) calls write_partitions(): the shard's exact keys
and its LSH band keys go to `partitions` files each, the row's partition picked by a hash of its
key, so that every document with an equal key (exact) or an equal band key (near) meets in the
same partition whatever shard it came from. Then every phase below is a unit of work (the
local pool or Ray, with its own resume marker) that reads one partition of every shard:

  exact_unit(p)      exact keys of partition p grouped: every document whose key was seen at a
                     smaller doc id is removed in favour of that first one   -> exact/p (doc, rep)
  bucket_unit(p)     band rows of partition p, the exact-removed documents left out (anti-join):
                     every member of a (band, key) bucket paired with the bucket's smallest doc
                     id (datasketch MinHashLSH's banding; the pairs of the in-memory
                     tests/dedup_reference.py bucket_edges), pairs re-partitioned by member
                                                                        -> pairs/p/q (leader, member)
  verify_unit(q)     pairs of every p for member partition q, duplicates across bands dropped,
                     kept if their signatures agree on >= threshold (rows read with pread
                     from the shards' signature files: Signatures)            -> edges/q (a, b)
  star_unit(p)       one phase of the connected components of the verified edges, for the nodes
                     of partition p: large-star and small-star steps alternated (the driver
                     loops until a pair of phases changes nothing; each phase re-partitions the
                     edges by node)                              -> cc/<phase>/p/<dest> (u, v)
  label_unit(p)      the stars read off: every node of partition p with the smallest doc id of
                     its component -> labels/p (node, label), only for documents that have an
                     edge; and each exact duplicate whose first copy is in p with the document
                     it finally gives way to                     -> exact-final/p (doc, final)

The kept document of a cluster is its smallest doc id, the first in corpus order: the rule of
the earlier in-memory step 2 (tests/dedup_reference.py), which gives the same answer.

Memory  every unit: one partition of its rows: band rows (~24 bytes each, ~bands per document),
        pairs or edges (~16 bytes each, per near duplicate), plus, in bucket_unit, the
        exact-removed doc ids (8 bytes per exact duplicate of the corpus, the anti-join's build
        side). No process holds the corpus or all its duplicates; more partitions, smaller units.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import polars as pl

from tasks.corpus.minhash import estimate_jaccard

ROW_BITS = 40  # rows per shard < 2^40; shards < 2^23
ROW_MASK = (1 << ROW_BITS) - 1
VERIFY_BLOCK = 16384
FOLDER = "_work/dedup"  # under the stage's artifact directory (scratch: dropped at commit)


def doc_ids(shard: int, n: int) -> np.ndarray:
    return (np.int64(shard) << np.int64(ROW_BITS)) + np.arange(n, dtype=np.int64)


def write_ipc(frame: pl.DataFrame, path: Path) -> None:
    """An Arrow IPC file, written under a temp name and renamed: never seen half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.write_ipc(tmp, compression="uncompressed")
    os.replace(tmp, path)


def _partition_of(values: np.ndarray, partitions: int) -> np.ndarray:
    """Partition of already-hashed uint64 keys (xxh3 halves, fmix64 band keys)."""
    return (values % np.uint64(partitions)).astype(np.int64)


def write_partitions(out: Path, name: str, shard: int, exact: np.ndarray, band_keys: np.ndarray,
                     has: np.ndarray, partitions: int) -> list[str]:
    """Step 1's share of step 2: the shard's exact keys [n, 2] and, for the documents with a
    signature, their band keys [n, bands], each row in the file of its key's partition."""
    docs = doc_ids(shard, len(exact))
    files = []
    part = _partition_of(exact[:, 1], partitions)
    for p in range(partitions):
        mask = part == p
        rel = f"{FOLDER}/exact-in/{p}/{name}.arrow"
        write_ipc(pl.DataFrame({"hi": exact[mask, 0], "lo": exact[mask, 1], "doc": docs[mask]}), out / rel)
        files.append(rel)
    with_sig = np.flatnonzero(has)
    bands = band_keys.shape[1]
    keys = band_keys[with_sig].reshape(-1)  # row-major: document by document, band by band
    band = np.tile(np.arange(bands, dtype=np.uint16), len(with_sig))
    doc = np.repeat(docs[with_sig], bands)
    part = _partition_of(keys, partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    for p in range(partitions):
        pick = order[bounds[p]:bounds[p + 1]]
        rel = f"{FOLDER}/bands-in/{p}/{name}.arrow"
        write_ipc(pl.DataFrame({"band": band[pick], "key": keys[pick], "doc": doc[pick]}), out / rel)
        files.append(rel)
    return files


def partition_files(kind: str, p: int, names: list[str]) -> list[str]:
    """Partition p of every shard's step-1 files of `kind` (exact-in, bands-in), relative to the
    stage's working directory: a unit's "inputs" (tasks/corpus/ray_units.py fetches them)."""
    return [f"{FOLDER}/{kind}/{p}/{name}.arrow" for name in names]


def signature_files(names: list[str], kinds: tuple[str, ...] = ("sig",)) -> list[str]:
    """Every shard's step-1 signature files (sig: the signatures, has: which rows have one)."""
    return [f"{FOLDER}/sig/{name}.{kind}.npy" for name in names for kind in kinds]


def _inputs(out: Path, kind: str, p: int, names: list[str]) -> list[Path]:
    return [out / rel for rel in partition_files(kind, p, names)]


def exact_unit(args: dict) -> dict:
    """Partition p of the exact keys: (doc, rep) for every document whose key came earlier."""
    clock = time.perf_counter()
    out, p = Path(args["out"]), args["partition"]
    rows = pl.scan_ipc(_inputs(out, "exact-in", p, args["names"]))
    removed = (rows.with_columns(rep=pl.col("doc").min().over("hi", "lo"))
               .filter(pl.col("doc") != pl.col("rep")).select("doc", "rep").sort("doc")
               .collect(engine="streaming"))
    rel = f"{FOLDER}/exact/{p}.arrow"
    write_ipc(removed, out / rel)
    return {"removed": removed.height, "files": [rel], "seconds": time.perf_counter() - clock}


def bucket_unit(args: dict) -> dict:
    """Partition p of the band rows: (leader, member) candidate pairs, written by member partition."""
    clock = time.perf_counter()
    out, p, partitions = Path(args["out"]), args["partition"], args["partitions"]
    rows = pl.scan_ipc(_inputs(out, "bands-in", p, args["names"]))
    if args["exact_files"]:
        removed = pl.scan_ipc([out / rel for rel in args["exact_files"]]).select("doc")
        rows = rows.join(removed, on="doc", how="anti")
    pairs = (rows.with_columns(leader=pl.col("doc").min().over("band", "key"))
             .filter(pl.col("doc") != pl.col("leader"))
             .select("leader", member=pl.col("doc"))
             .unique()
             .with_columns(q=(pl.col("member") % partitions))
             .collect(engine="streaming"))
    files = []
    for (q,), part in pairs.partition_by("q", as_dict=True, include_key=False).items():
        rel = f"{FOLDER}/pairs/{p}/{q}.arrow"
        write_ipc(part, out / rel)
        files.append(rel)
    return {"pairs": pairs.height, "files": sorted(files), "seconds": time.perf_counter() - clock}


class Signatures:
    """The shards' signature files (tasks.stages.dedup.signature_unit), rows read by doc id.

    Read with pread, row by row, not through a memory map: a map's pages (and the pages the
    kernel maps around each fault, ~64 KB) stay in the process's resident set, so random rows
    from every shard made a unit's RSS grow with the corpus."""

    def __init__(self, folder: Path, names: list[str]):
        self.folder, self.names = folder, names
        self.layout: dict[int, tuple[int, int]] = {}  # shard -> (data offset, row bytes)

    def _layout(self, shard: int) -> tuple[int, int]:
        if shard not in self.layout:
            with open(self.folder / f"{self.names[shard]}.sig.npy", "rb") as handle:
                version = np.lib.format.read_magic(handle)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(handle) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(handle))
                assert dtype == np.uint32, dtype
                self.layout[shard] = (handle.tell(), shape[1] * 4)
        return self.layout[shard]

    def rows(self, docs: np.ndarray) -> np.ndarray:
        shard = docs >> ROW_BITS
        width = self._layout(int(shard[0]))[1] // 4 if len(docs) else 0
        out = np.empty((len(docs), width), dtype=np.uint32)
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            offset, size = self._layout(int(s))
            fd = os.open(self.folder / f"{self.names[int(s)]}.sig.npy", os.O_RDONLY)
            try:
                data = b"".join(os.pread(fd, size, offset + int(row) * size) for row in docs[where] & ROW_MASK)
            finally:
                os.close(fd)
            out[where] = np.frombuffer(data, dtype=np.uint32).reshape(len(where), width)
        return out

    def jaccard(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        found = np.empty(len(a), dtype=np.float32)
        for lo in range(0, len(a), VERIFY_BLOCK):
            found[lo:lo + VERIFY_BLOCK] = estimate_jaccard(self.rows(a[lo:lo + VERIFY_BLOCK]),
                                                           self.rows(b[lo:lo + VERIFY_BLOCK]))
        return found


def verify_unit(args: dict) -> dict:
    """Member partition q: the candidate pairs of every band partition, each pair once, those
    whose signature estimate reaches the threshold (all of them without verify)."""
    clock = time.perf_counter()
    out, q = Path(args["out"]), args["partition"]
    files = [out / rel for rel in args["pair_files"]]
    if files:
        pairs = pl.scan_ipc(files).unique().sort("member", "leader").collect(engine="streaming")
    else:
        pairs = pl.DataFrame(schema={"leader": pl.Int64, "member": pl.Int64})
    candidates = pairs.height
    if args["verify"] and candidates:
        sigs = Signatures(out / FOLDER / "sig", args["names"])
        good = sigs.jaccard(pairs["leader"].to_numpy(), pairs["member"].to_numpy()) >= args["threshold"]
        pairs = pairs.filter(pl.Series(good))
    rel = f"{FOLDER}/edges/{q}.arrow"
    write_ipc(pairs.select(a=pl.col("leader"), b=pl.col("member")), out / rel)
    return {"candidate_pairs": candidates, "verified_pairs": pairs.height, "files": [rel],
            "seconds": time.perf_counter() - clock}


def _keyed_to(rows: pl.LazyFrame, p: int, partitions: int) -> pl.LazyFrame:
    return rows.filter(pl.col("u") % partitions == p)


def _write_by_node(out: Path, folder: str, pairs: pl.DataFrame, partitions: int) -> list[str]:
    """Undirected edges (x, y) as rows (u, v) in both directions, each row in the file of u's
    partition: what the next phase's unit for that partition reads."""
    rows = (pl.concat([pairs.select(u="x", v="y"), pairs.select(u="y", v="x")]).unique()
            .with_columns(dest=pl.col("u") % partitions))
    files = []
    for (dest,), part in rows.partition_by("dest", as_dict=True, include_key=False).items():
        rel = f"{folder}/{dest}.arrow"
        write_ipc(part.sort("u", "v"), out / rel)
        files.append(rel)
    return sorted(files)


def star_unit(args: dict) -> dict:
    """One phase of the connected components, for the nodes of partition p: a large-star or a
    small-star step (Kiveris et al. 2014, "Connected Components in MapReduce and Beyond").

    Each node u sees its neighbours N(u) (the rows (u, v) of its partition):
      large  m = min(N(u) + u); every larger neighbour v > u is re-attached to m: edge (v, m)
      small  m = min of the smaller neighbours and u; each of them (and u) is attached to m
    Both keep every component connected and never join two. Alternated, they reach stars whose
    centre is the component's smallest node: then neither changes anything. `changes` counts the
    nodes where this step can still change the graph (large: a node with both a smaller and a
    larger neighbour; small: a node with two or more smaller neighbours); 0 in a large and the
    small step after it means stars.

    Reads the phase's rows keyed to p (the first phase: the verified edges (a, b), both ways);
    writes the new edges keyed by node partition: <folder>/<dest>.arrow. Memory: the rows of
    one partition."""
    clock = time.perf_counter()
    out, p, partitions = Path(args["out"]), args["partition"], args["partitions"]
    files = [out / rel for rel in args["inputs"]]
    if args["first"]:
        edges = pl.scan_ipc(files) if files else pl.LazyFrame(schema={"a": pl.Int64, "b": pl.Int64})
        rows = pl.concat([edges.select(u="a", v="b"), edges.select(u="b", v="a")])
    else:
        rows = pl.scan_ipc(files) if files else pl.LazyFrame(schema={"u": pl.Int64, "v": pl.Int64})
    rows = _keyed_to(rows, p, partitions).unique().collect(engine="streaming")
    if args["step"] == "large":
        per_node = rows.group_by("u").agg(m=pl.min_horizontal(pl.col("v").min(), pl.col("u").first()),
                                          larger=(pl.col("v") > pl.col("u")).any())
        changes = per_node.filter((pl.col("m") < pl.col("u")) & pl.col("larger")).height
        pairs = (rows.filter(pl.col("v") > pl.col("u")).join(per_node.select("u", "m"), on="u")
                 .select(x="v", y="m"))
    else:
        smaller = rows.filter(pl.col("v") < pl.col("u"))
        per_node = smaller.group_by("u").agg(m=pl.col("v").min(), count=pl.len())
        changes = per_node.filter(pl.col("count") > 1).height
        pairs = pl.concat([smaller.join(per_node.select("u", "m"), on="u").select(x="v", y="m"),
                           per_node.select(x="u", y="m")]).filter(pl.col("x") != pl.col("y"))
    written = _write_by_node(out, f"{args['folder']}/{p}", pairs, partitions)
    return {"changes": changes, "rows": rows.height, "files": written, "seconds": time.perf_counter() - clock}


def label_unit(args: dict) -> dict:
    """Partition p once the stars are reached: every node with its component's smallest node
    (a star's leaf has one neighbour, its centre; a centre has only larger ones) -> labels/p
    (node, label); and, for the exact duplicates whose first copy `rep` is in partition p, the
    document each finally gives way to (rep's label, or rep) -> exact-final/p (doc, final).
    Memory: the rows of one partition and the exact duplicates of its reps."""
    clock = time.perf_counter()
    out, p, partitions = Path(args["out"]), args["partition"], args["partitions"]
    files = [out / rel for rel in args["star_files"]]
    rows = pl.scan_ipc(files) if files else pl.LazyFrame(schema={"u": pl.Int64, "v": pl.Int64})
    labels = (_keyed_to(rows, p, partitions).group_by("u")
              .agg(label=pl.min_horizontal(pl.col("v").min(), pl.col("u").first()))
              .select(node="u", label="label").sort("node").collect(engine="streaming"))
    written = [f"{FOLDER}/labels/{p}.arrow"]
    write_ipc(labels, out / written[0])
    if args["exact_files"]:
        final = (pl.scan_ipc([out / rel for rel in args["exact_files"]]).filter(pl.col("rep") % partitions == p)
                 .join(labels.lazy(), left_on="rep", right_on="node", how="left")
                 .select("doc", final=pl.coalesce("label", "rep")).sort("doc").collect(engine="streaming"))
        written.append(f"{FOLDER}/exact-final/{p}.arrow")
        write_ipc(final, out / written[1])
    return {"nodes": labels.height, "files": written, "seconds": time.perf_counter() - clock}
