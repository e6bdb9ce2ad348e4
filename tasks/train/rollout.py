"""Rollouts for the RL stages (grpo, ppo): on-policy batches for the training engine.

The engine's loop is the RL loop: its data plug-in is `RolloutBatches`, which the engine hands the
model being trained (`attach_model`) and which, whenever its current rollout is used up, samples a
new one from that model. So the optimizer, schedule, gradient clipping, checkpoints (with this
plug-in's cursor in them), stop signals and the metrics log are the engine's, written once.

A rollout (`_rollout`):
  1. the next `prompts_per_rollout` prompts (a seeded per-epoch order over the prompt set, the
     cursor of every data plug-in here) x `group_size` replies each, sampled as one batch by the
     KV-cache generation Engine (model/generate.py) from the current policy, `max_new_tokens` at
     most, seeded by (seed, rollout index); a reply ends with the end-of-turn token it stopped on;
  2. rows: prompt + reply right-padded to seq_len (reply_rows): input_ids, and targets = the reply's
     tokens (-100 elsewhere), as the SFT / DPO rows, so the same log-prob code reads them;
  3. old_logp / ref_logp (B, T): per-token log-probs of the reply under the sampling policy and
     under the frozen reference (token_logps_of: full forwards, no grad, under the engine's
     autocast; sampling is at temperature 1 with no top-k / top-p by default, so old_logp is the
     probability the reply was drawn with);
  4. scores (B,): tasks/rewards.py Scorer (rules and/or the reward model);
  5. advantages: GRPO group_advantages (per reply, broadcast over its tokens); PPO: per-token
     rewards = -kl_coef * (old_logp - ref_logp) + the score on the last reply token, then gae()
     over the policy's value head (old_values) -> advantages (whitened over the rollout's tokens)
     and returns.
The rollout's rows are then served `epochs` times, each pass in a fresh seeded order, `rows` at a
time (one optimizer step each): epochs * rollout_rows / global_batch steps per rollout.

Resume: the cursor (state_dict, in every engine checkpoint) holds the prompt order, the number of
rollouts made, the current rollout's rows and how many minibatches of it were served. A resumed run
continues inside the same rollout with the same rows, and later rollouts use the seeds an
uninterrupted run would use. Where the arithmetic is deterministic (CPU, `deterministic`) the
resumed run is bitwise the uninterrupted one (tests/test_grpo.py: losses and final weights after a
kill -9); on a GPU it is the same run up to floating-point noise (sampling from slightly different
probabilities can then pick other tokens), never a restart.
Single process (DDP would sample the same rollout on every rank; FSDP cannot generate): the RL
stages run with nproc 1.
Memory: the policy, the reference (same size) and the reward model when one is used; one rollout.
The stage harness (its tokenizer loader) and the reward rules import pydantic and the profiles, which
a builder module does not import (tasks/train/builders.py): they are imported where a rollout run
builds its plug-in.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from model import load_hf_dir
from model.generate import Engine, SamplingParams
from tasks.train.data import IGNORE, ArrayDocuments
from tasks.train.engine import autocast_context
from tasks.train.objectives import token_logps


# --------------------------------------------------------------------------- the maths (hand-checked in tests)


def group_advantages(scores: np.ndarray, group: int, eps: float = 1e-4) -> np.ndarray:
    """GRPO: scores (n,) of n / group consecutive groups -> (score - group mean) / (group std + eps),
    std with Bessel's correction (as TRL); float32 (n,). A group of equal scores gets 0."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1, group)
    if group < 2:
        raise ValueError("group advantages need at least 2 replies per prompt (group_size >= 2)")
    adv = (s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + eps)
    return adv.reshape(-1).astype(np.float32)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over each row's reply tokens (mask, contiguous per row).

    rewards, values (B, T) at the reply's positions (values[t] = V of the state before token t);
    after the last reply token the value is 0 (the episode ends). delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lam A_{t+1}; returns R_t = A_t + V_t. Both 0 off the mask. fp32.
    """
    B, T = rewards.shape
    m = mask.float()
    adv = torch.zeros(B, T, dtype=torch.float32)
    next_value = torch.zeros(B)
    running = torch.zeros(B)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
        next_value = values[:, t] * m[:, t]
    return adv, (adv + values) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (0 elsewhere)."""
    m = mask.float()
    n = m.sum().clamp(min=1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) / torch.sqrt(var + eps) * m


def reply_rows(prompts: list[list[int]], replies: list[list[int]], seq_len: int, pad_id: int):
    """prompt + reply -> input_ids (n, seq_len) int64 (right-padded), targets (n, seq_len) int64 =
    the reply's tokens at the positions that predict them, -100 elsewhere. ValueError if a row is
    longer than seq_len + 1 tokens."""
    n = len(prompts)
    inp = np.full((n, seq_len), pad_id, dtype=np.int64)
    tgt = np.full((n, seq_len), IGNORE, dtype=np.int64)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        full = list(p) + list(r)
        if len(full) - 1 > seq_len:
            raise ValueError(f"prompt ({len(p)}) + reply ({len(r)}) tokens do not fit seq_len {seq_len} + 1")
        inp[i, :len(full) - 1] = full[:-1]
        tgt[i, len(p) - 1:len(full) - 1] = r
    return inp, tgt


@torch.no_grad()
def token_logps_of(model, input_ids: np.ndarray, targets: np.ndarray, autocast, batch: int = 16,
                   values: bool = False):
    """Per-token log-probs (n, T) fp32 numpy of the targets under `model` (0 off the targets); with
    values=True also the value head's (n, T) values (model.logits_and_values)."""
    device = next(model.parameters()).device
    logps, vals = [], []
    for s in range(0, len(input_ids), batch):
        ids = torch.from_numpy(input_ids[s:s + batch]).to(device)
        tgt = torch.from_numpy(targets[s:s + batch]).to(device)
        with autocast():
            if values:
                logits, v = model.logits_and_values(ids)
                vals.append(v.float().cpu())
            else:
                logits = model(ids)
        logps.append(token_logps(logits, tgt).cpu())
    lp = torch.cat(logps).numpy()
    return (lp, torch.cat(vals).numpy()) if values else lp


# --------------------------------------------------------------------------- sampling


def sample_replies(engine, prompt_ids: list[list[int]], group: int, max_new_tokens: int, temperature: float,
                   seed: int) -> list[list[int]]:
    """Each prompt `group` times (rows i*group .. i*group+group-1), one batch; replies as token ids,
    each ending with its stop token when it stopped before max_new_tokens. Leaves the model in
    train mode (the Engine sets eval; this model has no dropout, so the modes compute the same).
    On a CPU the decoding runs on one thread: a decode step's matmuls are too small to split and
    the threads' synchronisation costs more than it saves (demo model, 16 rows x 24 tokens on a
    busy 2-core machine: 0.17 s on one thread, 3.5 s on two)."""
    rows = [list(p) for p in prompt_ids for _ in range(group)]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    threads = torch.get_num_threads()
    if engine.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return engine.generate_tokens_list(rows, params)
    finally:
        torch.set_num_threads(threads)
        engine.model.train()


def make_engine(model, tokenizer):
    """A generation Engine over `model` itself (no copy, the model's own device and dtype, the
    dynamic cache path: the weights change between rollouts)."""
    p = next(model.parameters())
    return Engine(model, tokenizer, device=p.device, dtype=p.dtype, static=False, cuda_graph=False)


def reply_text(tokenizer, reply: list[int], stop_ids) -> str:
    ids = reply[:-1] if reply and reply[-1] in stop_ids else reply
    return tokenizer.decode(ids, skip_special_tokens=True)


def load_prompts(path: str | Path) -> list[dict]:
    """The stage's prompt file: [{"messages": [...], "answer": str | None, "ids": [int]}]."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- the engine's data plug-in


class RolloutBatches:
    """On-policy batches for the engine (see the module docstring). spec: the run.json data section:

    {"builder": "rollouts", "algo": "grpo" | "ppo", "prompts": prompt file,
     "tokenizer": dir, "reference": HF dir, "rewards": [RewardRule dicts], "reward_model": dir | None,
     "prompts_per_rollout", "group_size", "epochs", "max_new_tokens", "temperature", "seed", "pad_id",
     ppo: "kl_coef", "gamma", "lam", "whiten"}
    """

    def __init__(self, spec: dict, cfg):
        from tasks.train.stage import load_tokenizer

        self.spec, self.cfg = spec, cfg
        self.algo = spec["algo"]
        if self.algo not in ("grpo", "ppo"):
            raise ValueError(f"rollout algo {self.algo!r}: expected grpo or ppo")
        self.prompts = load_prompts(spec["prompts"])
        if not self.prompts:
            raise ValueError(f"{spec['prompts']} holds no prompt")
        self.group = int(spec["group_size"])
        self.per_rollout = int(spec["prompts_per_rollout"])
        self.rows_per_rollout = self.per_rollout * self.group
        self.epochs = int(spec.get("epochs", 1))
        self.max_new = int(spec["max_new_tokens"])
        self.temperature = float(spec.get("temperature", 1.0))
        self.seed = int(spec.get("seed", 0))
        self.pad_id = int(spec["pad_id"])
        if self.algo == "grpo" and self.group < 2:
            raise ValueError("GRPO needs group_size >= 2 (advantages are relative to the group)")
        too_long = [i for i, p in enumerate(self.prompts) if len(p["ids"]) + self.max_new - 1 > cfg.seq_len]
        if too_long:
            raise ValueError(f"prompt {too_long[0]} + max_new_tokens {self.max_new} does not fit seq_len {cfg.seq_len}")
        self.tokenizer = load_tokenizer(spec["tokenizer"])
        self.reference = load_hf_dir(spec["reference"])[0].eval().requires_grad_(False)
        self.autocast = lambda: autocast_context(cfg, next(self.reference.parameters()).device)  # noqa: E731
        self.order = ArrayDocuments([np.array([i]) for i in range(len(self.prompts))], loop=True, shuffle_seed=self.seed)
        self.rollouts, self.served = 0, 0
        self.buffer: dict[str, np.ndarray] | None = None
        self.policy = self.engine = self.scorer = None

    # ------------------------------------------------------------------ engine hooks

    def attach_model(self, model) -> None:
        from tasks.rewards import Scorer

        device = next(model.parameters()).device
        self.policy = model
        self.reference.to(device)
        self.engine = make_engine(model, self.tokenizer)
        self.engine.model.train()
        self.scorer = Scorer(self.spec["rewards"], self.spec.get("reward_model"), device=device)

    def _steps_per_rollout(self, rows: int) -> int:
        if self.rows_per_rollout % rows:
            raise ValueError(f"prompts_per_rollout x group_size = {self.rows_per_rollout} rows per rollout is not a "
                             f"multiple of global_batch {rows}; change one of them")
        return self.epochs * self.rows_per_rollout // rows

    def next_batch(self, rows: int) -> dict[str, np.ndarray]:
        per = self._steps_per_rollout(rows)
        if self.buffer is None or self.served >= per:
            self.buffer = self._rollout()
            self.rollouts += 1
            self.served = 0
        per_epoch = self.rows_per_rollout // rows
        epoch, k = divmod(self.served, per_epoch)
        perm = np.random.default_rng([self.seed, self.rollouts, epoch]).permutation(self.rows_per_rollout)
        idx = perm[k * rows:(k + 1) * rows]
        self.served += 1
        return {name: v[idx] for name, v in self.buffer.items()}

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict(), "rollouts": self.rollouts, "served": self.served,
                "buffer": dict(self.buffer) if self.buffer is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        self.rollouts, self.served = int(state["rollouts"]), int(state["served"])
        buf = state.get("buffer") or {}
        self.buffer = {k: (v.numpy() if torch.is_tensor(v) else np.asarray(v)) for k, v in buf.items()} or None

    # ------------------------------------------------------------------ one rollout

    def _rollout(self) -> dict[str, np.ndarray]:
        if self.policy is None:
            raise RuntimeError("RolloutBatches.next_batch before attach_model: the engine attaches the policy")
        chosen = [self.prompts[int(next(self.order)[0])] for _ in range(self.per_rollout)]
        seed = self.seed * 1_000_003 + self.rollouts
        replies = sample_replies(self.engine, [p["ids"] for p in chosen], self.group, self.max_new, self.temperature, seed)
        expanded = [p for p in chosen for _ in range(self.group)]
        inp, tgt = reply_rows([p["ids"] for p in expanded], replies, self.cfg.seq_len, self.pad_id)
        stop = set(self.engine.stop_token_ids)
        texts = [reply_text(self.tokenizer, r, stop) for r in replies]
        scores, _ = self.scorer([p["messages"] for p in expanded], texts, [p.get("answer") for p in expanded])
        batch = {"input_ids": inp, "targets": tgt, "scores": scores.astype(np.float32)}
        micro = max(1, self.cfg.micro_batch)
        batch["ref_logp"] = token_logps_of(self.reference, inp, tgt, self.autocast, micro)
        mask = torch.from_numpy(tgt != IGNORE)
        if self.algo == "grpo":
            batch["old_logp"] = token_logps_of(self.policy, inp, tgt, self.autocast, micro)
            adv = group_advantages(scores, self.group)
            batch["advantages"] = (adv[:, None] * mask.numpy()).astype(np.float32)
        else:
            old, values = token_logps_of(self.policy, inp, tgt, self.autocast, micro, values=True)
            batch["old_logp"], batch["old_values"] = old, (values * mask.numpy()).astype(np.float32)
            rewards = -float(self.spec["kl_coef"]) * (torch.from_numpy(old) - torch.from_numpy(batch["ref_logp"])) * mask
            last = torch.where(mask, torch.arange(mask.shape[1]), torch.full_like(mask, -1, dtype=torch.long)).amax(1)
            rewards[torch.arange(len(last)), last] += torch.from_numpy(scores)
            adv, returns = gae(rewards, torch.from_numpy(batch["old_values"]), mask,
                               float(self.spec.get("gamma", 1.0)), float(self.spec.get("lam", 0.95)))
            if self.spec.get("whiten", True):
                adv = whiten(adv, mask)
            batch["advantages"], batch["returns"] = adv.numpy(), returns.numpy()
        return batch


def engine_data(dspec: dict, cfg):
    """The engine's data builder "rollouts" (tasks/train/builders.py)."""
    return RolloutBatches(dspec, cfg), None


# --------------------------------------------------------------------------- held-out evaluation


def heldout_rewards(model, tokenizer, prompts: list[dict], scorer, max_new_tokens: int, samples: int,
                    temperature: float, seed: int) -> dict[str, float]:
    """Mean reward (and each rule's mean, the mean reply length in tokens) of `samples` sampled
    replies per held-out prompt; the same seed before and after training, so the two compare."""
    if not prompts:
        return {}
    engine = make_engine(model, tokenizer)
    replies = sample_replies(engine, [p["ids"] for p in prompts], samples, max_new_tokens, temperature, seed)
    model.eval()
    expanded = [p for p in prompts for _ in range(samples)]
    stop = set(engine.stop_token_ids)
    texts = [reply_text(tokenizer, r, stop) for r in replies]
    scores, parts = scorer([p["messages"] for p in expanded], texts, [p.get("answer") for p in expanded])
    out = {"reward": float(scores.mean()), "reply_tokens": float(np.mean([len(r) for r in replies]))}
    out.update({f"rule_{k}": float(v.mean()) for k, v in parts.items()})
    return out
