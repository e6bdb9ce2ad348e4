"""Did each training stage improve what it trains? The eval stage's answer, from held-out data of each
stage's own kind, plus a check of chat replies for degenerate repetition.

Every training stage already measures itself before and after training on data it held out (its
manifest's `extra`): SFT the negative log-likelihood of held-out assistant tokens, DPO how often its
implicit reward ranks a held-out pair's chosen reply first, the reward model how often it scores the chosen
reply higher, PPO and GRPO the mean reward of replies to held-out prompts, distillation the KL to
its teacher. `stage_gains` gathers those numbers into one table, each with the direction that counts
as better; pretraining's row comes from the eval stage's own held-out bits per byte against a uniform
guess over the vocabulary (what an untrained model scores, give or take its random start).

`reply_quality` judges greedy replies by their token ids: the longest run of one token repeated
("我我我我" is a run of 4) and distinct-2, the share of distinct token bigrams among all bigrams of
the sample (1.0: no bigram repeats anywhere; a model that answers everything alike scores low).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from itertools import pairwise

# A reply is called degenerate from this many repeats of one token in a row (issue 18's bar).
MAX_RUN = 3
MIN_DISTINCT_2 = 0.6


@dataclass(frozen=True)
class Measure:
    """How one stage's manifest reports what it trains: `read(extra, when)` -> the number before
    ("before") or after ("after") training, or None when the stage held nothing out."""

    trains: str  # what the stage trains the model to do
    measure: str  # the number, and on which held-out data ({n}: how many items, from `count`)
    count: str  # the manifest count that says how many held-out items
    read: Callable[[dict, str], float | None]
    higher_is_better: bool


def _key(name: str) -> Callable[[dict, str], float | None]:
    return lambda extra, when: extra.get(f"{name}_{when}")


def _field(name: str) -> Callable[[dict, str], float | None]:
    return lambda extra, when: (extra.get(f"heldout_{when}") or {}).get(name)


MEASURES: dict[str, Measure] = {
    "sft": Measure("answer as the assistant", "NLL per assistant token, {n} held-out conversations", "val",
                   _key("heldout_loss"), higher_is_better=False),
    "dpo": Measure("prefer the chosen reply", "share of {n} held-out pairs whose chosen reply it raised above the "
                   "rejected against its reference (DPO's implicit reward; ties half)", "val_pairs",
                   _field("reward_accuracy"), higher_is_better=True),
    "reward": Measure("score chosen above rejected", "share of {n} held-out pairs scored the right way round",
                      "val_pairs", _field("accuracy"), higher_is_better=True),
    "ppo": Measure("earn the profile's rewards", "mean reward of replies to {n} held-out prompts", "heldout_prompts",
                   _field("reward"), higher_is_better=True),
    "grpo": Measure("earn the profile's rewards", "mean reward of replies to {n} held-out prompts", "heldout_prompts",
                    _field("reward"), higher_is_better=True),
    "distill": Measure("match the teacher", "KL to the teacher per assistant token, {n} held-out conversations", "val",
                       _field("kl"), higher_is_better=False),
    "distill_sft": Measure("answer as the teacher did", "NLL per assistant token, {n} held-out teacher answers", "val",
                           _key("heldout_loss"), higher_is_better=False),
}


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def stage_gains(manifests: dict, pretrain: dict | None, vocab_size: int) -> list[dict]:
    """One row per training stage present: {stage, trains, measure, before, after, higher_is_better,
    improved}. manifests: stage name -> its Manifest (stages without a Measure are skipped);
    pretrain: the eval stage's held-out result for the pretrained model ({val_loss, val_bpb}), whose
    "before" is a uniform guess over `vocab_size` tokens in the same bits per byte."""
    rows = []
    if pretrain and pretrain.get("val_loss"):
        bits_per_nat_byte = pretrain["val_bpb"] / pretrain["val_loss"]  # bpb per nat/token on this text
        rows.append(_row("pretrain", "predict the next token of text",
                         "bits per byte of the held-out shard text (before: a uniform guess)",
                         math.log(vocab_size) * bits_per_nat_byte, pretrain["val_bpb"], higher_is_better=False))
    for stage, m in MEASURES.items():
        if stage not in manifests:
            continue
        extra, counts = manifests[stage].extra, manifests[stage].counts
        before, after = _number(m.read(extra, "before")), _number(m.read(extra, "after"))
        if before is None or after is None:
            continue
        rows.append(_row(stage, m.trains, m.measure.format(n=counts.get(m.count, "?")), before, after,
                         m.higher_is_better))
    return rows


def _row(stage: str, trains: str, measure: str, before: float, after: float, higher_is_better: bool) -> dict:
    improved = after > before if higher_is_better else after < before
    return {"stage": stage, "trains": trains, "measure": measure, "before": before, "after": after,
            "higher_is_better": higher_is_better, "improved": improved}


def longest_run(ids: list[int]) -> int:
    """The longest stretch of one token id repeated back to back (0 for an empty reply)."""
    best, run = 0, 0
    for i, t in enumerate(ids):
        run = run + 1 if i and t == ids[i - 1] else 1
        best = max(best, run)
    return best


def reply_quality(replies: list[list[int]]) -> dict:
    """{replies, longest_run (over all replies), degenerate (replies with a run > MAX_RUN), distinct_2,
    empty, ok}: distinct_2 = distinct bigrams / bigrams over the whole sample (None without any)."""
    bigrams = [(a, b) for ids in replies for a, b in pairwise(ids)]
    runs = [longest_run(ids) for ids in replies]
    distinct = len(set(bigrams)) / len(bigrams) if bigrams else None
    quality = {"replies": len(replies), "longest_run": max(runs, default=0),
               "degenerate": sum(r > MAX_RUN for r in runs), "distinct_2": distinct,
               "empty": sum(not ids for ids in replies)}
    quality["ok"] = bool(replies) and quality["longest_run"] <= MAX_RUN and (distinct or 0) >= MIN_DISTINCT_2
    return quality
