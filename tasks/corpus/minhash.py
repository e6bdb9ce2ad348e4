"""MinHash signatures and LSH banding, vectorized with numpy.

Shingles  the n-grams of text.tokenize's tokens: a Han character is a token, so Chinese gets
          character n-grams and Latin-script text word n-grams, in the same document too. A
          document with fewer than n tokens gets one shingle of all its tokens; a document
          without tokens has no signature (it takes part in exact dedup only).
Hash      each shingle's 64-bit hash (text.ngram_hashes: polynomial combination + murmur3
          fmix64) instead of datasketch's default sha1; permutation i maps the upper 32 bits
          x to ((a_i * x + b_i) mod 2^64) >> 32 with a_i odd (multiply-add-shift, a universal
          family): plain uint64 arithmetic in numpy, no modulo, no Python loop per shingle.
Batches   permutations are applied to blocks of BLOCK shingles ([num_perm, BLOCK] uint64,
          4 MB, cache-sized) and reduced per document with np.minimum.reduceat.
LSH       lsh_params() picks bands and rows by the criterion of datasketch's _optimal_param
          (the one MinHashLSH uses; same result, computed in numpy); band_keys() hashes each
          band's rows to one uint64, which is datasketch's band logic (equal band -> candidate
          pair) reproduced in numpy, so that buckets are found by a group-by on the keys
          (tasks/corpus/clusters.py) instead of a dict per band. tests/test_corpus_dedup.py
          checks both against datasketch.
"""
from __future__ import annotations

import sys

import numpy as np

from tasks.corpus.text import Tokens, fmix64, ngram_hashes, short_doc_hashes

BLOCK = 4096
assert sys.byteorder == "little", "minhash reads the high half of uint64 values in place"
EMPTY = np.uint32(0xFFFFFFFF)
_S32 = np.uint64(32)
_Q = np.uint64(0x9E3779B97F4A7C15)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    top = np.iinfo(np.uint64).max
    a = rng.integers(0, top, size=num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
    b = rng.integers(0, top, size=num_perm, dtype=np.uint64, endpoint=True)
    return a, b


def _apply(sig: np.ndarray, hashes: np.ndarray, docs: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """sig[doc] = min(sig[doc], h_i(shingle)) for shingles sorted by doc."""
    x = hashes >> _S32
    with np.errstate(over="ignore"):
        for lo in range(0, len(x), BLOCK):
            block = x[lo:lo + BLOCK]
            d = docs[lo:lo + BLOCK]
            values = np.multiply.outer(a, block)
            values += b[:, None]
            high = values.view(np.uint32)[:, 1::2]  # (a*x + b) >> 32, read in place (little endian)
            starts = np.flatnonzero(np.concatenate(([True], d[1:] != d[:-1])))
            part = np.minimum.reduceat(high, starts, axis=1).T
            rows = d[starts]
            sig[rows] = np.minimum(sig[rows], part)


def signatures(tokens: Tokens, num_perm: int, ngram: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 [n_docs, num_perm] signatures, bool [n_docs] has-a-signature) for a token batch."""
    a, b = permutations(num_perm, seed)
    sig = np.full((tokens.n_docs, num_perm), EMPTY, dtype=np.uint32)
    hashes, docs, _ = ngram_hashes(tokens, ngram)
    _apply(sig, hashes, docs, a, b)
    short_hashes, short_docs = short_doc_hashes(tokens, ngram)
    _apply(sig, short_hashes, short_docs, a, b)
    return sig, tokens.per_doc() > 0


def lsh_params(threshold: float, num_perm: int, false_positive_weight: float = 0.5,
               false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimizing the weighted false positive + false negative areas at the threshold.

    The criterion of datasketch's MinHashLSH (its _optimal_param; tests/test_corpus_dedup.py checks
    that both pick the same pair over a grid of thresholds and sizes), computed here with numpy:
    for every (b, r) with b * r <= num_perm, the probability that two documents of similarity s
    share a band, 1 - (1 - s^r)^b, is a polynomial of degree <= num_perm, so Gauss-Legendre
    quadrature with num_perm // 2 + 1 nodes integrates it exactly, all pairs at once. (Importing
    datasketch for this takes ~0.6 s, in dedup's serial step.) Ties go to the smaller b, then r.
    """
    b, r = zip(*[(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
    b, r = np.array(b, dtype=np.float64)[:, None], np.array(r, dtype=np.float64)[:, None]
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def area(lo: float, hi: float, miss: bool) -> np.ndarray:
        s = (hi - lo) / 2 * nodes + (hi + lo) / 2
        share = 1 - (1 - s ** r) ** b  # [pairs, nodes]
        return (hi - lo) / 2 * ((1 - share if miss else share) @ weights)

    error = area(0.0, threshold, False) * false_positive_weight + area(threshold, 1.0, True) * false_negative_weight
    best = int(np.argmin(error))
    return int(b[best, 0]), int(r[best, 0])


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 [n, bands]: one hash per band of `rows` consecutive signature values."""
    keys = np.zeros((len(sig), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            h = np.full(len(sig), np.uint64(band), dtype=np.uint64)
            for col in sig[:, band * rows:(band + 1) * rows].T:
                h = h * _Q + col.astype(np.uint64)
            keys[:, band] = fmix64(h)
    return keys


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Share of equal signature values, row by row: the MinHash estimate of Jaccard similarity."""
    return (sig_a == sig_b).mean(axis=1)
