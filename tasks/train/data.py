"""Packing: documents -> fixed-shape rows of tokens with document ids, no padding.

A document source is anything that yields 1-D integer numpy arrays (one
document each, EOS already appended, as the shard stage writes them) and has
`state_dict()` / `load_state_dict()` for its cursor: tasks.shard_reader.ShardReader
over token shards, or `ArrayDocuments` below for documents in memory. A
training source never ends: it starts the next epoch itself.

Packing (`PackedRows`): the documents are joined into one token stream and cut
into rows of `seq_len + 1` tokens that overlap by one token, row k =
stream[k*T : k*T + T + 1]: inputs are row[:-1], targets row[1:], so every
token after the first is a target exactly once and nothing is padded or
dropped. A document longer than what is left of a row continues at the start
of the next row. `document_ids` give each token its document (a running
count), so the model's attention stays inside a document and its RoPE
positions restart at each document start (and at each row start, for a
continued document: RoPE only sees relative positions anyway).

The rows of a step do not depend on the number of processes: every rank packs
the same global stream and takes its own rows (see split_rows), so the
data order, the cursor and a resume are the same on 1 or 8 GPUs.

Memory: the pending tokens (< one row plus the longest document) and one
step's rows. The cursor (`state_dict`) holds the source's cursor and the
pending tokens, so a resume continues at the exact token.

Validation (`ValidationRows`): the first documents of the validation split,
whole, up to `max_tokens`, packed the same way behind one leading EOS (so the
first document's first token is a target too), cut into rows once; the last
row is filled with masked targets (-100). `num_bytes` = UTF-8 bytes of the
decoded documents, for bits per byte.
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol

import numpy as np
import torch

IGNORE = -100  # target id that no loss is computed for


class DocumentSource(Protocol):
    def __iter__(self) -> Iterator[np.ndarray]: ...
    def __next__(self) -> np.ndarray: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class DataExhausted(RuntimeError):
    pass


class ArrayDocuments:
    """In-memory documents, served in order, epoch after epoch (loop=True) or once.

    Cursor: {"epoch", "index"} (the next document to serve). With `shuffle_seed`
    each epoch is a fresh permutation drawn from (seed, epoch), so the cursor
    alone restores the order.
    """

    def __init__(self, docs: list[np.ndarray], loop: bool = True, shuffle_seed: int | None = None):
        if not docs:
            raise ValueError("ArrayDocuments needs at least one document")
        self.docs, self.loop, self.shuffle_seed = docs, loop, shuffle_seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self.shuffle_seed is None:
            return np.arange(len(self.docs))
        return np.random.default_rng([self.shuffle_seed, epoch]).permutation(len(self.docs))

    def __iter__(self) -> "ArrayDocuments":
        return self

    def __next__(self) -> np.ndarray:
        if self.index >= len(self.docs):
            if not self.loop:
                raise StopIteration
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        doc = self.docs[self._order[self.index]]
        self.index += 1
        return doc

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


class PackedRows:
    """Documents -> (rows, seq_len + 1) token rows, overlapping by one token; see module docstring."""

    def __init__(self, source: DocumentSource, seq_len: int):
        if seq_len < 1:
            raise ValueError("seq_len must be >= 1")
        self.source, self.seq_len = source, seq_len
        self._tokens = np.zeros(0, dtype=np.int32)  # pending stream, its first token is the next row's first
        self._docs = np.zeros(0, dtype=np.int64)  # document number of each pending token
        self._next_doc = 0
        self.documents_read = 0

    def _fill(self, need: int) -> None:
        parts, ids, have = [self._tokens], [self._docs], len(self._tokens)
        while have < need:
            try:
                doc = next(self.source)
            except StopIteration:
                raise DataExhausted(
                    f"the document source ran out after {self.documents_read} documents; "
                    "a training source must loop over epochs"
                ) from None
            doc = np.asarray(doc)
            if doc.ndim != 1 or doc.size == 0:
                raise ValueError(f"document {self.documents_read}: expected a non-empty 1-D token array, got shape {doc.shape}")
            parts.append(doc.astype(np.int32, copy=False))
            ids.append(np.full(doc.size, self._next_doc, dtype=np.int64))
            self._next_doc += 1
            self.documents_read += 1
            have += doc.size
        self._tokens, self._docs = np.concatenate(parts), np.concatenate(ids)

    def next_rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, document ids), both (n, seq_len + 1); tokens int32, ids int64."""
        T = self.seq_len
        self._fill(n * T + 1)
        idx = np.arange(n)[:, None] * T + np.arange(T + 1)[None, :]
        tokens, docs = self._tokens[idx], self._docs[idx]
        self._tokens, self._docs = self._tokens[n * T :].copy(), self._docs[n * T :].copy()
        return tokens, docs

    def state_dict(self) -> dict:
        base = int(self._docs[0]) if len(self._docs) else self._next_doc
        return {
            "source": self.source.state_dict(),
            "tokens": torch.from_numpy(self._tokens.copy()),
            "docs": torch.from_numpy(self._docs - base),
            "next_doc": self._next_doc - base,
            "documents_read": self.documents_read,
        }

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self._tokens = state["tokens"].numpy().astype(np.int32)
        self._docs = state["docs"].numpy().astype(np.int64)
        self._next_doc = int(state["next_doc"])
        self.documents_read = int(state["documents_read"])


class PackedBatches:
    """Causal-LM batches from packed rows: the engine's training data for pretraining.

    next_batch(rows) -> {"input_ids", "targets", "document_ids"} numpy arrays of
    shape (rows, seq_len); document ids count from 0 in each row, so a batch
    does not depend on how many documents came before. Cursor = the packer's
    (source cursor + pending tokens).
    """

    def __init__(self, source: DocumentSource, seq_len: int):
        self.rows = PackedRows(source, seq_len)
        self.seq_len = seq_len

    def next_batch(self, rows: int) -> dict[str, np.ndarray]:
        tokens, docs = self.rows.next_rows(rows)
        return {
            "input_ids": tokens[:, :-1],
            "targets": tokens[:, 1:].astype(np.int64),
            "document_ids": (docs[:, :-1] - docs[:, :1]).astype(np.int32),  # 0, 1, ... per row
        }

    def state_dict(self) -> dict:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rows.load_state_dict(state)


class ValidationRows:
    """A fixed validation set of packed rows (see module docstring).

    docs: the validation documents (EOS appended), read in order until max_tokens.
    decode: token ids -> text (the tokenizer's), for the byte count; None -> no bits per byte.
    """

    def __init__(
        self,
        docs: Iterator[np.ndarray],
        seq_len: int,
        eos_id: int,
        max_tokens: int,
        decode: Callable[[list[int]], str] | None = None,
    ):
        taken: list[np.ndarray] = []
        total = 0
        for doc in docs:
            if total >= max_tokens:
                break
            doc = np.asarray(doc).astype(np.int32)
            taken.append(doc)
            total += doc.size
        if not taken:
            raise ValueError("the validation split has no documents")
        self.num_documents = len(taken)
        self.num_bytes = sum(len(decode(d.tolist()).encode("utf-8")) for d in taken) if decode else 0
        stream = np.concatenate([np.array([eos_id], dtype=np.int32), *taken])
        doc_ids = np.concatenate([np.zeros(1, np.int64)] + [np.full(d.size, i + 1, np.int64) for i, d in enumerate(taken)])
        self.num_targets = stream.size - 1
        T = seq_len
        n = -(-self.num_targets // T)  # ceil
        padded = n * T + 1
        tokens = np.full(padded, eos_id, dtype=np.int32)
        tokens[: stream.size] = stream
        targets_ok = np.zeros(padded, dtype=bool)
        targets_ok[1 : stream.size] = True
        docs_p = np.full(padded, doc_ids[-1] + 1, dtype=np.int64)
        docs_p[: stream.size] = doc_ids
        idx = np.arange(n)[:, None] * T + np.arange(T + 1)[None, :]
        rows, ok, rdocs = tokens[idx], targets_ok[idx], docs_p[idx]
        self.input_ids = rows[:, :-1]
        self.targets = np.where(ok[:, 1:], rows[:, 1:], IGNORE).astype(np.int64)
        self.document_ids = rdocs[:, :-1].astype(np.int32)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batches(self, rows_per_batch: int, world: int = 1, rank: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This rank's batches of `rows_per_batch` rows. Every rank gets the same number of
        batches (missing rows are fully masked), so collective ops inside the forward
        (FSDP) line up."""
        per_round = rows_per_batch * world
        n = len(self)
        rounds = -(-n // per_round)
        for r in range(rounds):
            start = r * per_round + rank * rows_per_batch
            sel = np.arange(start, start + rows_per_batch)
            real = sel < n
            sel = np.where(real, sel, 0)
            targets = self.targets[sel].copy()
            targets[~real] = IGNORE
            yield {"input_ids": self.input_ids[sel], "targets": targets, "document_ids": self.document_ids[sel]}



def strided_batches(arrays: dict[str, np.ndarray], rows: int, world: int, rank: int) -> Iterator[dict[str, np.ndarray]]:
    """This rank's batches of a fixed validation set (arrays of equal length): rows
    [rank*rows, (rank+1)*rows), then every rows*world further. The last batch may be short;
    unlike ValidationRows.batches, ranks may get different numbers of batches (DDP only)."""
    n = len(next(iter(arrays.values())))
    for start in range(rank * rows, n, rows * world):
        yield {k: v[start:start + rows] for k, v in arrays.items()}


# --------------------------------------------------------------------------- a step's rows on this rank


def split_rows(batch: dict[str, np.ndarray], micro_batch: int, accum: int, world: int, rank: int) -> list[dict[str, np.ndarray]]:
    """The global batch's rows -> this rank's `accum` micro-batches (micro-step a, rank r
    gets rows [(a*world + r)*micro_batch, ... + micro_batch))."""
    out = []
    for a in range(accum):
        start = (a * world + rank) * micro_batch
        out.append({k: v[start : start + micro_batch] for k, v in batch.items()})
    return out


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        out[k] = t
    return out
