"""Rewards for the RL stages (grpo, ppo): rules on the reply's text and/or the reward model.

A profile lists the terms of the reward (`rewards:` of stages.grpo / stages.ppo); a reply's score is
the weighted sum of its terms:

  think_format   1 if the reply is `<think>...</think>` followed by a non-empty answer, else 0
                 (the reasoning-format rule of R1-style training)
  exact_match    1 if the reply's answer (the text after </think> when there is one), stripped of
                 white space and final punctuation, equals the data's answer (the conversation's
                 last assistant turn, a preference pair's chosen reply), else 0; 0 where the data
                 has no answer
  length         1 - min(2, |characters - target_chars| / target_chars), in [-1, 1]: a shaping
                 rule a tiny demo policy learns in a few dozen steps (it moves its end-of-turn token)
  reward_model   the reward stage's score of prompt + reply (model/reward.py), rendered with the
                 reward model's own tokenizer and chat template, so it need not share the policy's

    scorer = Scorer([{"rule": "length", "weight": 1.0, "target_chars": 12}], reward_model_dir=None)
    scores, parts = scorer(prompts, replies, answers)   # scores (n,) float32; parts: rule -> (n,)

Memory: the reward model when one is named (scored in batches of `batch` rows).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from profiles.schema import Strict

RULES = ("think_format", "exact_match", "length", "reward_model")
_THINK = re.compile(r"\s*<think>(.+?)</think>\s*(\S.*)", re.S)
_END_PUNCT = "。．.！!？?～~…"


class RewardRule(Strict):
    """One term of the reward: a rule and its weight (target_chars: the `length` rule's target)."""

    rule: Literal["think_format", "exact_match", "length", "reward_model"]
    weight: float = 1.0
    target_chars: int = Field(16, ge=1)


def think_format(reply: str) -> float:
    return 1.0 if _THINK.fullmatch(reply) else 0.0


def final_answer(reply: str) -> str:
    """The answer part of a reply: after </think> when the reply has a think block, else all of it."""
    m = _THINK.fullmatch(reply)
    return m.group(2) if m else reply


def _normal(text: str) -> str:
    return re.sub(r"\s+", "", text).rstrip(_END_PUNCT)


def exact_match(reply: str, answer: str | None) -> float:
    if not answer:
        return 0.0
    return 1.0 if _normal(final_answer(reply)) == _normal(answer) else 0.0


def length(reply: str, target_chars: int) -> float:
    return 1.0 - min(2.0, abs(len(reply.strip()) - target_chars) / target_chars)


class Scorer:
    """rules: RewardRule dicts; reward_model_dir: a reward artifact directory (needed by the
    `reward_model` rule, else unused). __call__(prompts [messages], replies [str], answers
    [str | None]) -> (scores float32 (n,), {rule: float32 (n,) unweighted values}; a rule listed
    twice is reported once, by its last entry)."""

    def __init__(self, rules: list[dict], reward_model_dir: str | Path | None = None, device=None, batch: int = 16):
        self.rules = [RewardRule(**r) if isinstance(r, dict) else r for r in rules]
        if not self.rules:
            raise ValueError("no reward rule: list at least one of " + ", ".join(RULES))
        self.model = self.tokenizer = None
        if any(r.rule == "reward_model" for r in self.rules):
            if reward_model_dir is None:
                raise ValueError("the reward_model rule needs the reward stage's model (reward_model_dir)")
            from model.reward import BACKBONE_DIR, load_reward_model
            from tasks.train.stage import load_tokenizer

            self.model = load_reward_model(reward_model_dir)
            if device is not None:
                self.model.to(device)
            self.tokenizer = load_tokenizer(Path(reward_model_dir) / BACKBONE_DIR)
        self.batch = batch

    def _model_scores(self, prompts: list[list[dict]], replies: list[str]) -> np.ndarray:
        """The reward model's score of each prompt + reply, read where the reward stage reads it
        (rows as tasks/train/pairs.py encode_pairs makes them: objectives.reply_end)."""
        import torch

        from tasks.chat_data import encode_conversation
        from tasks.train.data import IGNORE
        from tasks.train.objectives import reply_end

        device = next(self.model.parameters()).device
        limit = self.model.config.max_seq_len
        out = []
        for s in range(0, len(replies), self.batch):
            encoded = [encode_conversation(self.tokenizer, p + [{"role": "assistant", "content": r}])
                       for p, r in zip(prompts[s:s + self.batch], replies[s:s + self.batch])]
            width = min(limit, max(len(ids) - 1 for ids, _ in encoded))
            inp = torch.zeros(len(encoded), width, dtype=torch.long)
            tgt = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
            for i, (ids, mask) in enumerate(encoded):
                ids, mask = torch.from_numpy(ids[:width + 1].astype(np.int64)), torch.from_numpy(mask[:width + 1])
                inp[i, :len(ids) - 1] = ids[:-1]
                tgt[i, :len(ids) - 1] = torch.where(mask[1:], ids[1:], IGNORE)
            with torch.no_grad():
                scores = self.model.scores(inp.to(device))
            out.append(scores.gather(1, reply_end(tgt).to(device)[:, None]).squeeze(1).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def __call__(self, prompts: list[list[dict]], replies: list[str], answers: list[str | None]):
        n = len(replies)
        parts: dict[str, np.ndarray] = {}
        total = np.zeros(n, dtype=np.float32)
        cached: np.ndarray | None = None
        for rule in self.rules:
            if rule.rule == "think_format":
                value = np.array([think_format(r) for r in replies], np.float32)
            elif rule.rule == "exact_match":
                value = np.array([exact_match(r, a) for r, a in zip(replies, answers)], np.float32)
            elif rule.rule == "length":
                value = np.array([length(r, rule.target_chars) for r in replies], np.float32)
            else:
                cached = self._model_scores(prompts, replies) if cached is None else cached
                value = cached
            parts[rule.rule] = value
            total += rule.weight * value
        return total, parts
