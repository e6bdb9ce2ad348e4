"""Chat data for the engine: tokenized conversations packed into rows, loss on the assistant's tokens.

A conversation is (ids, assistant mask), at most seq_len + 1 tokens (chat_data.fit_length cuts
it). PackedChats packs them greedily into rows of seq_len tokens (document ids keep attention
inside a conversation; the rest of a row is padding with no loss), ChatValidation packs the
held-out ones once in file order. `engine_data` is the data builder "chats" the engine child
calls (tasks/train/builders.py); this module imports neither pydantic nor the profiles.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model import load_hf_dir
from model.generate import inference_autocast, resolve_device
from tasks.train.data import IGNORE, ArrayDocuments, strided_batches
from tasks.train.objectives import SFT


def save_conversations(path: Path, docs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Tokenized conversations -> one .npz (ids, mask concatenated; offsets)."""
    offsets = np.cumsum([0] + [len(ids) for ids, _ in docs]).astype(np.int64)
    ids = np.concatenate([d[0] for d in docs]).astype(np.int32) if docs else np.zeros(0, np.int32)
    mask = np.concatenate([d[1] for d in docs]).astype(bool) if docs else np.zeros(0, bool)
    np.savez(path, ids=ids, mask=mask, offsets=offsets)


def load_conversations_npz(path: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    z = np.load(path)
    ids, mask, off = z["ids"], z["mask"], z["offsets"]
    return [(ids[a:b], mask[a:b]) for a, b in zip(off[:-1], off[1:])]


def _row(docs, order, seq_len: int, pad_id: int):
    """Conversations (in `order`, each <= seq_len + 1 tokens) -> one row's (inputs, targets, doc ids)."""
    inp = np.full(seq_len, pad_id, dtype=np.int32)
    tgt = np.full(seq_len, IGNORE, dtype=np.int64)
    doc = np.zeros(seq_len, dtype=np.int32)
    at = 0
    for k, i in enumerate(order):
        ids, mask = docs[i]
        n = len(ids) - 1
        inp[at:at + n] = ids[:-1]
        tgt[at:at + n] = np.where(mask[1:], ids[1:], IGNORE)
        doc[at:at + n] = k
        at += n
    doc[at:] = len(order)  # padding: its own document
    return inp, tgt, doc


def with_weights(batch: dict[str, np.ndarray], token_weights: dict[int, float] | None) -> dict[str, np.ndarray]:
    """Add "weights" (float32, like targets): token_weights[t] where the target is t, else 1."""
    if not token_weights:
        return batch
    weights = np.ones(batch["targets"].shape, dtype=np.float32)
    for token, w in token_weights.items():
        weights[batch["targets"] == token] = w
    return {**batch, "weights": weights}


class PackedChats:
    """Training batches of packed conversations, for the engine (next_batch / state_dict).

    docs: [(ids, assistant mask)], each at most seq_len + 1 tokens. Conversations are taken in a
    per-epoch permutation of (seed, epoch) and packed greedily: one that does not fit in what is
    left of a row starts the next row. Cursor = the order's (epoch, index) + the pending one.
    next_batch(rows) -> input_ids int32, targets int64 (-100 off the assistant tokens and on
    padding), document_ids int32, all (rows, seq_len); with `token_weights` ({token id: weight})
    also weights float32 (rows, seq_len): that weight where the target is such a token, else 1
    (objectives.py: the loss of a target counts `weight` times).
    """

    def __init__(self, docs, seq_len: int, pad_id: int, seed: int, token_weights: dict[int, float] | None = None):
        if not docs:
            raise ValueError("PackedChats needs at least one conversation")
        too_long = [i for i, (ids, _) in enumerate(docs) if len(ids) - 1 > seq_len]
        if too_long:
            raise ValueError(f"conversation {too_long[0]} is longer than seq_len + 1; cut it first (chat_data.fit_length)")
        self.docs, self.seq_len, self.pad_id, self.token_weights = docs, seq_len, pad_id, token_weights
        self.order = ArrayDocuments([np.array([i]) for i in range(len(docs))], loop=True, shuffle_seed=seed)
        self.pending = -1

    def _next(self) -> int:
        if self.pending >= 0:
            i, self.pending = self.pending, -1
            return i
        return int(next(self.order)[0])

    def next_batch(self, rows: int) -> dict[str, np.ndarray]:
        out = [[], [], []]
        for _ in range(rows):
            chosen, room = [], self.seq_len
            while True:
                i = self._next()
                n = len(self.docs[i][0]) - 1
                if n > room:
                    self.pending = i
                    break
                chosen.append(i)
                room -= n
            for part, arr in zip(out, _row(self.docs, chosen, self.seq_len, self.pad_id)):
                part.append(arr)
        batch = {"input_ids": np.stack(out[0]), "targets": np.stack(out[1]), "document_ids": np.stack(out[2])}
        return with_weights(batch, self.token_weights)

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict(), "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        self.pending = int(state["pending"])


class ChatValidation:
    """Held-out conversations packed once in file order; `batches(rows, world, rank)` for the engine."""

    num_bytes = 0  # no bits per byte: the loss is per assistant token

    def __init__(self, docs, seq_len: int, pad_id: int, token_weights: dict[int, float] | None = None):
        rows, current, room = [], [], seq_len
        for i, (ids, _) in enumerate(docs):
            n = len(ids) - 1
            if n > room:
                rows.append(current)
                current, room = [], seq_len
            current.append(i)
            room -= n
        if current:
            rows.append(current)
        parts = [_row(docs, r, seq_len, pad_id) for r in rows]
        batch = {k: np.stack([p[j] for p in parts]) for j, k in enumerate(("input_ids", "targets", "document_ids"))}
        self.batch = with_weights(batch, token_weights)

    def batches(self, rows: int, world: int, rank: int):
        return strided_batches(self.batch, rows, world, rank)


def engine_data(dspec: dict, cfg) -> tuple[PackedChats, ChatValidation | None]:
    """The engine's data builder "chats" (tasks/train/builders.py): run.json "data": {"builder": "chats",
    "train": train.npz, "validation": val.npz or null, "pad_id", "seed", "token_weights" (optional)}."""
    train_docs = load_conversations_npz(dspec["train"])
    weights = {int(k): float(v) for k, v in (dspec.get("token_weights") or {}).items()} or None  # {"id": weight}
    data = PackedChats(train_docs, cfg.seq_len, int(dspec["pad_id"]), int(dspec.get("seed", 0)), weights)
    val = None
    if dspec.get("validation"):
        val_docs = load_conversations_npz(dspec["validation"])
        val = ChatValidation(val_docs, cfg.seq_len, int(dspec["pad_id"]), weights) if val_docs else None
    return data, val


def heldout_assistant_loss(model_path: Path, docs, seq_len: int, pad_id: int) -> float:
    """Mean NLL per held-out assistant token of the HF model at model_path (nats)."""
    device = resolve_device(None)  # on the GPU when there is one: a 64M model over the held-out set is minutes on CPUs
    model = load_hf_dir(model_path)[0].to(device).eval()
    val, obj = ChatValidation(docs, seq_len, pad_id), SFT()
    nats, count = 0.0, 0
    with torch.no_grad(), inference_autocast(device):
        for b in val.batches(8, 1, 0):
            count += obj.count(b)
            nats += float(obj.loss(model, {k: torch.from_numpy(v).to(device) for k, v in b.items()})["sum"])
    return nats / max(count, 1)
