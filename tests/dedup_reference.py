"""The reference answer for dedup: every document in one process, numpy and scipy, no partitions.

This is the in-memory step 2 that tasks/stages/dedup.py used before it was hash-partitioned
(tasks/corpus/clusters.py), kept here to check that the partitioned path gives the same
answer (tests/test_corpus_dedup.py) and as the baseline of benchmarks/data.py's scale table.
It computes everything from clean's shards itself, with the project's signature functions:

    reference(paths, settings) -> {"removed": [(removed_id, kept_id, kind, jaccard_estimate)],
                                   "cluster_size": {kept_id: size}, "facts": {...}}

Memory: ~80 bytes per document plus one band's sort (~50 bytes per document) and ~30 bytes
per candidate pair, all in this process.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from tasks.corpus.minhash import band_keys, estimate_jaccard, lsh_params, signatures
from tasks.corpus.text import tokenize
from tasks.stages.dedup import EXACT, KEPT, KINDS, NEAR, exact_key


def bucket_edges(keys: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs of one band: every member of a bucket paired with the bucket's first.

    keys: uint64 [m] band keys of the documents `index` (global ordinals, ascending).
    Returns (first, member) arrays of global ordinals, first < member."""
    if not len(keys):
        return index[:0], index[:0]
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    new_run = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
    run_first = np.flatnonzero(new_run)
    run_of = np.cumsum(new_run) - 1
    leader = order[run_first[run_of]]
    pair = leader != order
    return index[leader[pair]], index[order[pair]]


def corpus_signatures(paths, num_perm: int, ngram: int, seed: int, batch: int = 4096):
    """(ids, exact keys [n, 2], signatures [n, num_perm], has-a-signature [n]) of the shards, in order."""
    ids, exact, sigs, has = [], [], [], []
    for path in paths:
        table = pq.read_table(path, columns=["id", "text"])
        texts = table.column("text").to_pylist()
        ids += table.column("id").to_pylist()
        exact += [exact_key(t) for t in texts]
        for lo in range(0, len(texts), batch):
            sig, present = signatures(tokenize(texts[lo:lo + batch]), num_perm, ngram, seed)
            sigs.append(sig)
            has.append(present)
    width = (0, num_perm)
    return (ids, np.array(exact, dtype=np.uint64).reshape(-1, 2),
            np.concatenate(sigs) if sigs else np.zeros(width, np.uint32),
            np.concatenate(has) if has else np.zeros(0, bool))


def cluster(exact: np.ndarray, has: np.ndarray, keys, sig_rows: Callable[[np.ndarray], np.ndarray], settings) -> dict:
    """Every document's fate: kind (KEPT, EXACT, NEAR), final (the ordinal kept in its place),
    estimate (Jaccard estimate against final), cluster_size, and the facts.

    exact [n, 2] exact keys, has [n], keys [n, bands] band keys (an array or a memory map: read
    one band at a time), sig_rows(ordinals) -> their signatures (e.g. from memory-mapped files)."""
    total = len(exact)
    ordinal = np.arange(total, dtype=np.int64)
    bands, _ = lsh_params(settings.threshold, settings.num_perm)
    rep_exact = ordinal.copy()
    if settings.exact and total:
        _, first, inverse = np.unique(exact, axis=0, return_index=True, return_inverse=True)
        rep_exact = first[inverse.reshape(-1)].astype(np.int64)
    facts = {"candidate_pairs": 0, "verified_pairs": 0}
    rep_near = ordinal.copy()
    if settings.near and total:
        alive = np.flatnonzero(has & (rep_exact == ordinal))
        edges = [bucket_edges(np.asarray(keys[:, band])[alive], alive) for band in range(bands)]
        left = np.concatenate([e[0] for e in edges])
        right = np.concatenate([e[1] for e in edges])
        if len(left):
            code = np.unique(left * total + right)
            left, right = code // total, code % total
        facts["candidate_pairs"] = len(left)
        if settings.verify and len(left):
            good = _jaccard(sig_rows, left, right) >= settings.threshold
            left, right = left[good], right[good]
        facts["verified_pairs"] = len(left)
        graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(total, total)).tocsr()
        count, labels = connected_components(graph, directed=False)
        smallest = np.full(count, total, dtype=np.int64)
        np.minimum.at(smallest, labels, ordinal)
        rep_near = smallest[labels]
    final = rep_near[rep_exact]
    kind = np.where(rep_exact != ordinal, EXACT, np.where(final != ordinal, NEAR, KEPT)).astype(np.uint8)
    estimate = np.ones(total, dtype=np.float32)
    both = has & has[final] & (kind != KEPT)
    estimate[both] = _jaccard(sig_rows, np.flatnonzero(both), final[both])
    cluster_size = np.bincount(final, minlength=total)
    facts.update({"documents": total, "exact_duplicates": int((kind == EXACT).sum()),
                  "near_duplicates": int((kind == NEAR).sum()), "clusters": int((cluster_size > 1).sum()),
                  "largest_cluster": int(cluster_size.max()) if total else 0})
    return {"kind": kind, "final": final, "estimate": estimate, "cluster_size": cluster_size, "facts": facts}


def _jaccard(rows, a: np.ndarray, b: np.ndarray, block: int = 16384) -> np.ndarray:
    found = np.empty(len(a), dtype=np.float32)
    for lo in range(0, len(a), block):
        found[lo:lo + block] = estimate_jaccard(rows(a[lo:lo + block]), rows(b[lo:lo + block]))
    return found


def reference(paths, settings) -> dict:
    """The answer for clean's shards `paths` (in corpus order) under DedupSettings `settings`."""
    ids, exact, sig, has = corpus_signatures(paths, settings.num_perm, settings.ngram, settings.seed)
    bands, rows = lsh_params(settings.threshold, settings.num_perm)
    found = cluster(exact, has, band_keys(sig, bands, rows), lambda index: sig[index], settings)
    removed = np.flatnonzero(found["kind"] != KEPT)
    return {
        "removed": [(ids[i], ids[found["final"][i]], KINDS[int(found["kind"][i])], float(found["estimate"][i]))
                    for i in removed],
        "cluster_size": {ids[i]: int(n) for i, n in enumerate(found["cluster_size"]) if n > 1},
        "facts": found["facts"],
    }
