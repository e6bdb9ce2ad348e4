"""dpo: direct preference optimisation of the SFT model on (prompt, chosen, rejected) pairs.

Reads   the sft stage's hf/ model (or any Qwen2/Qwen3 HF directory named by `init_from`), which
        is both the starting policy and the frozen reference; its tokenizer (chat template with
        {% generation %} markers). Pairs: the files of `data:` entries, each a local path / glob
        or files inside an installed package, with a `format`:
          preference  records with chosen / rejected as strings or message objects
                      (tasks/chat_data.py: ShareGPT / OpenAI / Alpaca / plain prompts)
          chatterbot  Q/A conversations made into pairs: chosen = the real answer, rejected =
                      the last answer of another conversation (a seeded shuffle). This is how
                      the demo gets honest pairs from real data shipped in a package: the
                      rejected reply is a real, fluent answer that does not answer the question.
Writes  hf/, checkpoint/ (as sft); pairs/train.npz, pairs/val.npz: the tokenized pairs with the
        reference model's sequence log-probs (computed once, before training, kept with the
        stage: a resumed run reads them instead of recomputing); quarantine.jsonl.
        manifest: counts (pairs, truncations), dropped by reason, and on the held-out pairs
        before (the reference) and after training:
          reward_accuracy / reward_margin   DPO's implicit reward, beta * (log pi - log ref),
                                            chosen minus rejected (0 / 0.0 for the reference)
          logp_accuracy / logp_margin       share of pairs where the model gives the chosen
                                            reply the higher log-prob, mean log-prob gap
Rows    prompt + reply rendered by the chat template, one pair per row pair, right-padded to
        `seq_len`; the loss covers the reply tokens (the template's assistant mask). A reply
        that does not fit is cut (counted); a pair whose prompt leaves no room is dropped
        (counted as "prompt longer than seq_len").
Runs    the engine child process, objective `dpo` (tasks/train/objectives.py, `beta`); `lora:`
        as in sft (adapters trained, merged into hf/).
Resume  as sft: engine checkpoints in the working dir; exact continuation.
Memory  one model (no reference model while training: its log-probs are cached).
"""
from __future__ import annotations

import json
import os
from typing import Literal

import numpy as np
from pydantic import Field

from profiles.schema import Strict
from storage.errors import SlmError
from tasks.chat_data import write_quarantine
from tasks.registry import Stage, StageResult
from tasks.sft import (TrainSettings, data_files, engine_spec, export, held_out, keyed_config, load_tokenizer,
                       model_dir, run_training, tokenizer_dir)

STAGE_VERSION = 1


class DpoError(SlmError):
    pass


class PreferenceData(Strict):
    path: str
    package: str | None = None
    format: Literal["preference", "chatterbot"]


class DpoSettings(TrainSettings):
    data: list[PreferenceData] = []
    beta: float = Field(0.1, gt=0)
    lr: float = Field(5e-6, gt=0)


class DpoConfig(DpoSettings):
    init_digest: str | None = None
    data_digests: list[list[str]] = []


# --------------------------------------------------------------------------- pairs


def mismatched_pairs(convs: list[list[dict]], seed: int):
    """Conversations -> PreferencePairs: chosen = its own last reply, rejected = the last reply of
    another conversation (a seeded permutation shifted by one, so never its own)."""
    from tasks.chat_data import PreferencePair

    n = len(convs)
    if n < 2:
        return []
    perm = np.random.default_rng(seed).permutation(n)
    other = np.empty(n, dtype=np.int64)
    other[perm] = np.roll(perm, 1)
    pairs = []
    for i, conv in enumerate(convs):
        chosen, rejected = conv[-1]["content"], convs[other[i]][-1]["content"]
        if chosen != rejected:
            pairs.append(PreferencePair(conv[:-1], chosen, rejected))
    return pairs


def encode_pairs(pairs, tok, seq_len: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """PreferencePairs -> arrays (n, seq_len): chosen_ids/targets, rejected_ids/targets, and counts."""
    from tasks.chat_data import encode_conversation
    from tasks.train.data import IGNORE

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
    import torch

    from model.generate import resolve_device
    from tasks.train.engine import inference_autocast
    from tasks.train.objectives import sequence_logps

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
    return {"reward_accuracy": float((reward > 0).mean()), "reward_margin": float(reward.mean()),
            "logp_accuracy": float((c > r).mean()), "logp_margin": float((c - r).mean())}


class PairBatches:
    """Training batches of pairs for the engine: a per-epoch permutation of (seed, epoch);
    cursor = (epoch, index)."""

    def __init__(self, arrays: dict[str, np.ndarray], seed: int):
        from tasks.train.data import ArrayDocuments

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
        n = len(self.arrays["chosen_ids"])
        for start in range(rank * rows, n, rows * world):
            yield {k: v[start:start + rows] for k, v in self.arrays.items()}


def load_arrays(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def engine_data(dspec: dict, cfg):
    """The engine's data builder (run.json "data": {"builder": "tasks.dpo:engine_data", ...})."""
    val = PairValidation(load_arrays(dspec["validation"])) if dspec.get("validation") else None
    return PairBatches(load_arrays(dspec["train"]), int(dspec.get("seed", 0))), val


# --------------------------------------------------------------------------- the stage


def config(profile) -> DpoConfig:
    return keyed_config("dpo", profile.stages.dpo, DpoConfig)


def read_pairs(cfg: DpoConfig, stage: str = "dpo") -> tuple[list, list[dict]]:
    """The pairs of cfg.data (any config with `data` and `seed`; `stage` names it in errors) + quarantine."""
    from tasks.chat_data import load_conversations, load_pairs

    pairs, bad = [], []
    for n, entry in enumerate(cfg.data):
        files = [str(p) for p in data_files(entry, f"stages.{stage}.data[{n}]")]
        if entry.format == "preference":
            p, b = load_pairs(files)
        else:
            convs, b = load_conversations([(f, "chatterbot") for f in files])
            p = mismatched_pairs(convs, cfg.seed)
        pairs += p
        bad += b
    return pairs, bad


def preference_inputs(cfg, inputs: dict, out, stage: str, error, hint: str = ""):
    """What a preference stage (dpo, reward) starts from: the pairs of cfg.data (the quarantine
    written to quarantine.jsonl), the model to train (the sft stage's hf/, or cfg.init_from), its
    tokenizer dir and tokenizer. Fails, naming stages.<stage>.data, without data or usable pairs.
    Returns (pairs, quarantine, model dir, tokenizer dir, tokenizer)."""
    if not cfg.data:
        raise error(f"stages.{stage}.data is empty: add preference data, e.g. "
                    f"[{{path: pairs.jsonl, format: preference}}]{hint}")
    pairs, bad = read_pairs(cfg, stage)
    write_quarantine(out.path / "quarantine.jsonl", bad)
    if not pairs:
        raise error(f"no preference pair in the data ({len(bad)} records quarantined: see quarantine.jsonl)")
    init_dir = model_dir(cfg.init_from, inputs.get("sft"), out, stage)
    tok_dir = tokenizer_dir(init_dir, None, out)
    return pairs, bad, init_dir, tok_dir, load_tokenizer(tok_dir)


def preference_dropped(bad: list[dict], counts: dict[str, int]) -> dict[str, int]:
    """The `dropped` of a preference stage (dpo, reward): quarantine reasons, plus the pairs whose
    prompt alone filled seq_len (encode_pairs' prompt_too_long, train and val)."""
    from tasks.chat_data import reason_counts

    dropped = reason_counts(bad)
    too_long = counts.get("train_prompt_too_long", 0) + counts.get("val_prompt_too_long", 0)
    if too_long:
        dropped["prompt longer than seq_len"] = too_long
    return dropped


def run(cfg: DpoConfig, inputs: dict, out) -> StageResult:
    from model import load_hf_dir

    pairs, bad, init_dir, tok_dir, tok = preference_inputs(cfg, inputs, out, "dpo", DpoError)

    pair_dir = out.path / "pairs"
    pair_dir.mkdir(exist_ok=True)
    cache = out.scratch / "pairs"  # the reference log-probs, computed once per key (kept across restarts)
    held = held_out(len(pairs), cfg.val_fraction, cfg.seed)
    counts: dict[str, int] = {}
    if not (cache / "val.npz").exists():
        reference = load_hf_dir(init_dir)[0]
        cache.mkdir(parents=True, exist_ok=True)
        for split, chosen in (("train", ~held), ("val", held)):
            arrays, c = encode_pairs([p for p, h in zip(pairs, chosen) if h], tok, cfg.seq_len)
            arrays["ref_chosen"], arrays["ref_rejected"] = sequence_logps_np(reference, arrays)
            np.savez(cache / f"{split}.tmp.npz", **arrays)
            (cache / f"{split}.json").write_text(json.dumps(c))
            os.replace(cache / f"{split}.tmp.npz", cache / f"{split}.npz")  # val.npz last: the cache is complete
        del reference
    for split in ("train", "val"):
        for k, v in json.loads((cache / f"{split}.json").read_text()).items():
            counts[f"{split}_{k}"] = v
        (pair_dir / f"{split}.npz").write_bytes((cache / f"{split}.npz").read_bytes())
    train_arrays, val_arrays = load_arrays(cache / "train.npz"), load_arrays(cache / "val.npz")
    if len(train_arrays["chosen_ids"]) == 0:
        raise DpoError(f"no training pair fits seq_len {cfg.seq_len}")

    work = out.scratch / "engine"
    has_val = len(val_arrays["chosen_ids"]) > 0
    data = {"builder": "tasks.dpo:engine_data", "train": str(cache / "train.npz"),
            "validation": str(cache / "val.npz") if has_val else None, "seed": cfg.seed}
    spec = engine_spec(cfg, work, init_dir, data, {"name": "dpo", "beta": cfg.beta}, {"stage": "dpo", "key": out.key})
    before = preference_metrics(load_hf_dir(init_dir)[0], val_arrays, cfg.beta) if has_val else {}
    final, records, resumed = run_training(spec, cfg, work, out, error=DpoError)
    export(final, tok_dir, out, cfg.lora)
    after = preference_metrics(load_hf_dir(out.path / "hf")[0], val_arrays, cfg.beta) if has_val else {}
    out.log_metrics({f"heldout_{k}": v for k, v in after.items()}, step=cfg.steps)

    dropped = preference_dropped(bad, counts)
    fmt = lambda m: (f"accuracy {m['logp_accuracy']:.2f}, log-prob margin {m['logp_margin']:.2f}"  # noqa: E731
                     if m else "no held-out pairs")
    return StageResult(
        counts={"pairs": len(pairs), **counts, "quarantined": len(bad), "steps": cfg.steps},
        dropped=dropped,
        summary=(f"{counts['train_pairs']} train / {counts['val_pairs']} held-out pairs, beta {cfg.beta}, "
                 f"{cfg.steps} steps; held-out {fmt(before)} -> {fmt(after)}; reward accuracy "
                 f"{after.get('reward_accuracy', float('nan')):.2f}, margin {after.get('reward_margin', float('nan')):.3f}"),
        extra={"hf_dir": "hf", "checkpoint": "checkpoint", "init_from": cfg.init_from or "sft", "beta": cfg.beta,
               "heldout_before": before, "heldout_after": after, "resumed_from": resumed,
               "reference_logps": ["pairs/train.npz", "pairs/val.npz"]},
    )


STAGE = Stage(
    name="dpo",
    version=STAGE_VERSION,
    upstream=("sft",),
    settings=DpoSettings,
    config=config,
    run=run,
    group="train",
)
