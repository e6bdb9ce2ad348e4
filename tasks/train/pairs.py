"""Preference pairs for the engine (dpo, reward): chosen and rejected replies to one prompt,
each a row of seq_len tokens with loss targets on the reply only.

`encode_pairs` makes the arrays, PairBatches / PairValidation serve them, `engine_data` is the
data builder "pairs" the engine child calls (tasks/train/builders.py); `preference_metrics`
measures a model on held-out pairs. Imports neither pydantic nor the profiles.
"""
from __future__ import annotations

import numpy as np
import torch

from model.generate import inference_autocast, resolve_device
from tasks.chat_data import encode_conversation
from tasks.train.data import IGNORE, ArrayDocuments, strided_batches
from tasks.train.objectives import sequence_logps


def encode_pairs(pairs, tok, seq_len: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """PreferencePairs -> arrays (n, seq_len): chosen_ids/targets, rejected_ids/targets, and counts."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows: dict[str, list] = {k: [] for k in ("chosen_ids", "chosen_targets", "rejected_ids", "rejected_targets")}
    counts = {"pairs": 0, "replies_cut": 0, "reply_tokens_cut": 0, "prompt_too_long": 0}
    for pair in pairs:
        encoded = {}
        for side in ("chosen", "rejected"):
            ids, mask = encode_conversation(tok, pair.prompt + [{"role": "assistant", "content": getattr(pair, side)}])
            if len(ids) > seq_len + 1:
                counts["replies_cut"] += 1
                counts["reply_tokens_cut"] += int(mask[seq_len + 1:].sum())
                ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            encoded[side] = (ids, mask)
        if not all(m[1:].any() for _, m in encoded.values()):
            counts["prompt_too_long"] += 1
            continue
        for side, (ids, mask) in encoded.items():
            inp = np.full(seq_len, pad, dtype=np.int32)
            tgt = np.full(seq_len, IGNORE, dtype=np.int64)
            inp[:len(ids) - 1] = ids[:-1]
            tgt[:len(ids) - 1] = np.where(mask[1:], ids[1:], IGNORE)
            rows[f"{side}_ids"].append(inp)
            rows[f"{side}_targets"].append(tgt)
        counts["pairs"] += 1
    arrays = {k: (np.stack(v) if v else np.zeros((0, seq_len), np.int64)) for k, v in rows.items()}
    return arrays, counts


def sequence_logps_np(model, arrays: dict[str, np.ndarray], batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The model's summed reply log-probs (chosen, rejected), float32 (n,), in eval mode, no grad; the model
    is moved to the GPU when there is one (with bf16 autocast, as the engine computes the policy's)."""
    device = resolve_device(None)
    model.to(device).eval()
    out = {"chosen": [], "rejected": []}
    with torch.no_grad(), inference_autocast(device):
        for side in out:
            ids, tgt = arrays[f"{side}_ids"], arrays[f"{side}_targets"]
            for s in range(0, len(ids), batch):
                out[side].append(sequence_logps(model, torch.from_numpy(ids[s:s + batch]).to(device),
                                                torch.from_numpy(tgt[s:s + batch]).to(device)).float().cpu().numpy())
    cat = lambda xs: np.concatenate(xs).astype(np.float32) if xs else np.zeros(0, np.float32)  # noqa: E731
    return cat(out["chosen"]), cat(out["rejected"])


def preference_metrics(model, arrays: dict[str, np.ndarray], beta: float) -> dict[str, float]:
    """Held-out preference metrics of `model` (see the module docstring); arrays hold ref_* log-probs."""
    c, r = sequence_logps_np(model, arrays)
    reward = beta * ((c - arrays["ref_chosen"]) - (r - arrays["ref_rejected"]))
    # ties count half: the reference itself (every reward 0) scores chance, 0.5, not 0
    return {"reward_accuracy": float((reward > 0).mean() + 0.5 * (reward == 0).mean()), "reward_margin": float(reward.mean()),
            "logp_accuracy": float((c > r).mean()), "logp_margin": float((c - r).mean())}


class PairBatches:
    """Training batches of pairs for the engine: a per-epoch permutation of (seed, epoch);
    cursor = (epoch, index)."""

    def __init__(self, arrays: dict[str, np.ndarray], seed: int):
        if len(arrays["chosen_ids"]) == 0:
            raise ValueError("PairBatches needs at least one pair")
        self.arrays = arrays
        self.order = ArrayDocuments([np.array([i]) for i in range(len(arrays["chosen_ids"]))], loop=True, shuffle_seed=seed)

    def next_batch(self, rows: int) -> dict[str, np.ndarray]:
        idx = np.array([int(next(self.order)[0]) for _ in range(rows)])
        return {k: v[idx] for k, v in self.arrays.items()}

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


class PairValidation:
    num_bytes = 0

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def batches(self, rows: int, world: int, rank: int):
        return strided_batches(self.arrays, rows, world, rank)


def load_arrays(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def engine_data(dspec: dict, cfg):
    """The engine's data builder "pairs" (tasks/train/builders.py): run.json "data": {"builder": "pairs",
    "train": pairs .npz, "validation": .npz or null, "seed"}."""
    val = PairValidation(load_arrays(dspec["validation"])) if dspec.get("validation") else None
    return PairBatches(load_arrays(dspec["train"]), int(dspec.get("seed", 0))), val
