"""Counter-based pseudo-random numbers per corpus position: a document's number depends only on
its position and the seed, never on batching or on the order the work was done in (the
tokenizer's sample, the shard stage's shuffle, the training stages' held-out split)."""
from __future__ import annotations

import numpy as np


def mix64(values: np.ndarray, seed: int) -> np.ndarray:
    """A fixed pseudo-random uint64 per (seed, value): splitmix64 of value + seed-derived offset.

    Counter-based, so a document's number depends only on its position, never on batching
    or on the order the work was done in."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(positions: np.ndarray, seed: int) -> np.ndarray:
    return (mix64(positions, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
