"""Objective plug-ins: what the engine minimises on a batch.

An objective is an object with

    count(batch: dict[str, np.ndarray]) -> int
        how many loss terms this host batch holds (targets that are not -100 for
        token losses, pairs for DPO). The engine sums these over the
        micro-batches and ranks of a step and divides by the total, so a step's
        loss is the mean over the whole global batch, whatever the split.
    loss(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]
        "sum": fp32 scalar, the SUM of the per-term losses of this micro-batch
               (not the mean), in nats;
        "aux" (optional): a regulariser already weighted (e.g. MoE load
               balancing), averaged by the engine over the step's micro-batches;
        "stats" (optional): {name: scalar tensor}, statistics of this micro-batch
               (means, detached or not), averaged by the engine over the
               micro-batches of a logging interval and written into its train
               record (RL: reward, KL, entropy, clip fraction). Not all-reduced
               across ranks: rank 0's view.

`loss` runs under the engine's autocast and may be torch.compile'd as a whole
(model call + loss), so it must not sync with the host (.item(), Python
branching on tensor values). The training stages add their own objectives next
to `CausalLM`: SFT, DPO, RewardBT (reward model), GRPO and PPO (on-policy
batches from tasks/train/rollout.py).

Optional per-token weights: a token batch may carry "weights" (B, T) float32; SFT and
Distill then sum weight * loss per target token (count stays the number of targets, so a
weight above 1 adds to a token's share of the step loss; tasks/sft.py PackedChats makes them
from a {token id: weight} map, e.g. the reasoning template's <think> / </think>).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from model import load_hf_dir
from tasks.train.data import IGNORE


class CausalLM:
    """Next-token cross entropy over packed rows (attention kept inside each document).

    batch: input_ids (B, T) int, targets (B, T) int64 (-100 = no loss), document_ids (B, T) int.
    The logits' upcast to fp32 happens inside cross_entropy (one fused pass when compiled).
    """

    name = "causal_lm"

    def __init__(self, aux_loss_coef: float | None = None):
        self.aux_loss_coef = aux_loss_coef  # None -> the model's config.router_aux_loss_coef for MoE, else 0

    def count(self, batch: dict[str, np.ndarray]) -> int:
        return int(np.count_nonzero(batch["targets"] != IGNORE))

    def loss(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(batch["input_ids"], document_ids=batch["document_ids"])
        return self.with_aux(model, {"sum": nll_sum(logits, batch["targets"], batch.get("weights"))})

    def with_aux(self, model, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the MoE load-balancing term ("aux") when the model has one."""
        inner = _unwrap(model)
        coef = self.aux_loss_coef
        if coef is None:
            config = getattr(inner, "config", None)
            coef = config.router_aux_loss_coef if getattr(config, "is_moe", False) else 0.0
        if coef:
            out["aux"] = coef * inner.aux_loss
        return out


def nll_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 scalar: the next-token cross entropy summed over the targets that are not -100, each
    times its weight when `weights` (B, T) is given. The logits' upcast to fp32 happens inside
    cross_entropy (one fused pass when compiled)."""
    flat, tgt = logits.flatten(0, 1).float(), targets.flatten()
    if weights is None:
        return F.cross_entropy(flat, tgt, ignore_index=IGNORE, reduction="sum")
    return (F.cross_entropy(flat, tgt, ignore_index=IGNORE, reduction="none") * weights.flatten().float()).sum()


def _unwrap(model):
    """The Transformer inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


class SFT(CausalLM):
    """Supervised fine-tuning: the same next-token cross entropy, on packed conversations whose
    targets are -100 everywhere but on the assistant's tokens (tasks/chat_data.py makes the mask
    from the tokenizer's chat template), so only the replies are learnt.

    batch: input_ids, targets, document_ids (B, T), as CausalLM (tasks/sft.py PackedChats), and
    optionally weights (B, T) (see the module docstring).
    """

    name = "sft"


def token_logps(logits: torch.Tensor, targets: torch.Tensor, entropy: bool = False):
    """logits (B, T, V), targets (B, T) -> (B, T) fp32 log p(target), 0 where target == -100;
    with entropy=True also the (B, T) entropy of each position's distribution (nats)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = targets != IGNORE
    picked = torch.gather(logp, -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    if not entropy:
        return picked
    return picked, -(logp.exp() * logp).sum(-1)


def sequence_logps(model, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) fp32: the sum over each row of log p(target) where target != -100 (one reply per row;
    rows are right-padded, so no document ids are needed)."""
    return token_logps(model(input_ids), targets).sum(-1)


def reply_end(targets: torch.Tensor) -> torch.Tensor:
    """(B,) long: the input position of each row's last reply token (one past the last target that
    is not -100: that target token is the input there), clamped to the row; 0 for a row without
    targets. Where a scalar head reads a reply's score."""
    T = targets.shape[-1]
    pos = torch.arange(T, device=targets.device)
    last = torch.where(targets != IGNORE, pos, torch.full_like(pos, -1)).amax(-1)
    return (last + 1).clamp(min=0, max=T - 1)


def masked_row_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) values, (B, T) bool -> (B,) mean over each row's masked positions (0 for an empty row)."""
    m = mask.to(x.dtype)
    return (x * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and reward margin (Rafailov et al. 2023, sigmoid loss):

        margin = beta * ((pi_c - ref_c) - (pi_r - ref_r)),  loss = -log sigmoid(margin)
    """
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


class DPO:
    """Direct preference optimisation on (prompt, chosen, rejected) pairs, one pair a row.

    batch: chosen_ids, chosen_targets, rejected_ids, rejected_targets (B, T) (targets -100 off the
    reply), ref_chosen, ref_rejected (B,) fp32: the reference model's sequence log-probs, computed
    once before training (tasks/dpo.py) so no reference model sits in memory while training.
    count = pairs; loss "sum" = the sum of the per-pair DPO losses. One forward over chosen and
    rejected together (2B rows).
    """

    name = "dpo"

    def __init__(self, beta: float = 0.1):
        if beta <= 0:
            raise ValueError(f"DPO beta must be > 0, got {beta}")
        self.beta = beta

    def count(self, batch: dict[str, np.ndarray]) -> int:
        return int(len(batch["chosen_ids"]))

    def loss(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]])
        logps = sequence_logps(model, ids, targets)
        chosen, rejected = logps.chunk(2)
        losses, _ = dpo_losses(chosen, rejected, batch["ref_chosen"].float(), batch["ref_rejected"].float(), self.beta)
        return {"sum": losses.sum()}


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair reward-model loss and margin: margin = r_chosen - r_rejected, loss = -log sigmoid(margin)."""
    margin = chosen - rejected
    return -F.logsigmoid(margin), margin


class RewardBT:
    """Reward model training (Bradley-Terry) on the DPO stage's pair rows (tasks/dpo.py encode_pairs).

    model: a backbone with a scalar head (tasks/reward.py RewardModel: `scores(input_ids)` -> (B, T)),
    read at the last reply token of each row (reply_end). batch: chosen_ids, chosen_targets,
    rejected_ids, rejected_targets (B, T); count = pairs; "sum" = the sum of -log sigmoid(r_c - r_r).
    stats: accuracy (share of pairs with r_c > r_r) and the mean margin.
    """

    name = "reward_bt"

    def count(self, batch: dict[str, np.ndarray]) -> int:
        return int(len(batch["chosen_ids"]))

    def rewards(self, model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        scores = model.scores(ids)
        return scores.gather(1, reply_end(targets)[:, None]).squeeze(1)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]])
        chosen, rejected = self.rewards(model, ids, targets).chunk(2)
        losses, margin = bradley_terry_losses(chosen, rejected)
        return {"sum": losses.sum(), "stats": {"accuracy": (margin > 0).float().mean().detach(),
                                               "margin": margin.mean().detach()}}


# --------------------------------------------------------------------------- RL (tasks/train/rollout.py makes the batches)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate (Schulman's k3): exp(ref - logp) - (ref - logp) - 1;
    >= 0, unbiased for samples drawn from the policy."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate loss -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), ratio =
    exp(logp - old_logp); and the (B, T) bool of tokens where the clipped term is the one taken."""
    ratio = torch.exp(logp - old_logp)
    plain, clipped = ratio * advantages, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.minimum(plain, clipped), clipped < plain


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """Per-token value loss 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def _rl_stats(batch, mask, logp, entropy, clipped, kl) -> dict[str, torch.Tensor]:
    m = mask.float()
    n = m.sum().clamp(min=1.0)
    return {"reward": batch["scores"].float().mean(), "kl": ((kl * m).sum() / n).detach(),
            "entropy": ((entropy * m).sum() / n).detach(), "clip_frac": ((clipped.float() * m).sum() / n).detach(),
            "reply_tokens": m.sum(-1).mean()}


class GRPO:
    """Group relative policy optimisation (Shao et al. 2024, DeepSeekMath), per token:

        l_t = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A) + beta * k3(pi_t, ref_t)

    A = the reply's group-normalised reward (tasks/train/rollout.py group_advantages), the same for
    every token of the reply. A reply's loss is the mean of l_t over its tokens; "sum" sums replies
    and count = replies, so a step's loss is the mean over the replies of the global batch.
    batch (tasks/train/rollout.py): input_ids, targets (B, T) (targets -100 off the reply),
    old_logp, ref_logp (B, T) fp32, advantages (B, T) fp32, scores (B,) fp32.
    """

    name = "grpo"

    def __init__(self, clip_eps: float = 0.2, beta: float = 0.04):
        if clip_eps <= 0 or beta < 0:
            raise ValueError(f"GRPO needs clip_eps > 0 and beta >= 0 (got {clip_eps}, {beta})")
        self.clip_eps, self.beta = clip_eps, beta

    def count(self, batch: dict[str, np.ndarray]) -> int:
        return int(len(batch["input_ids"]))

    def token_losses(self, logp, batch):
        mask = batch["targets"] != IGNORE
        pg, clipped = clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], self.clip_eps)
        kl = k3_kl(logp, batch["ref_logp"])
        return pg + self.beta * kl, mask, clipped, kl

    def loss(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logp, entropy = token_logps(model(batch["input_ids"]), batch["targets"], entropy=True)
        per_token, mask, clipped, kl = self.token_losses(logp, batch)
        return {"sum": masked_row_mean(per_token, mask).sum(),
                "stats": _rl_stats(batch, mask, logp, entropy, clipped, kl)}


class PPO:
    """PPO with a value head on the policy's backbone (tasks/reward.py RewardModel as policy + critic):

        l_t = -min(ratio_t * A_t, clip(ratio_t) * A_t) + vf_coef * clipped_value_loss(V_t, V_old_t, R_t)

    A_t, R_t: GAE advantages and returns from the rollout (tasks/train/rollout.py gae), whose
    per-token rewards already carry the KL penalty to the reference. Normalised like GRPO: mean over
    each reply's tokens, summed over replies, count = replies. batch: as GRPO plus old_values,
    returns (B, T) fp32.
    """

    name = "ppo"

    def __init__(self, clip_eps: float = 0.2, vf_coef: float = 0.1, value_clip: float = 0.2):
        if clip_eps <= 0 or vf_coef < 0 or value_clip <= 0:
            raise ValueError("PPO needs clip_eps > 0, vf_coef >= 0, value_clip > 0")
        self.clip_eps, self.vf_coef, self.value_clip = clip_eps, vf_coef, value_clip

    def count(self, batch: dict[str, np.ndarray]) -> int:
        return int(len(batch["input_ids"]))

    def loss(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, values = model.logits_and_values(batch["input_ids"])
        logp, entropy = token_logps(logits, batch["targets"], entropy=True)
        mask = batch["targets"] != IGNORE
        pg, clipped = clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], self.clip_eps)
        vf = clipped_value_loss(values, batch["old_values"], batch["returns"], self.value_clip)
        stats = _rl_stats(batch, mask, logp, entropy, clipped, k3_kl(logp, batch["ref_logp"]))
        stats["value_loss"] = masked_row_mean(vf, mask).mean().detach()
        return {"sum": masked_row_mean(pg + self.vf_coef * vf, mask).sum(), "stats": stats}


def distill_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (B, T) fp32: the student's cross entropy on the targets, and
    KL(teacher_T || student_T) between the two next-token distributions softened by `temperature`;
    both 0 where the target is -100."""
    keep = (targets != IGNORE).float()
    s, t = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(s.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none").view_as(keep)
    log_s = torch.log_softmax(s / temperature, dim=-1)
    log_t = torch.log_softmax(t / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return ce, kl * keep


def _engine_device() -> torch.device:
    """The device the engine trains on in this process (tasks/train/engine.py init_distributed)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class Distill(CausalLM):
    """White-box knowledge distillation (Hinton et al. 2015) on packed conversations:

        per assistant token: alpha * CE(student, label)
                             + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

    T^2 keeps the soft term's gradients on the hard term's scale whatever the temperature.
    batch: as SFT (input_ids, targets, document_ids, optional weights applied to both terms);
    count = assistant tokens; "sum" = the sum of the per-token losses; "stats": the micro-batch's
    mean KL at T and mean CE per assistant token (the engine writes them into its train records).

    teacher: an HF directory (model/hf.py) sharing the student's tokenizer (tasks/distill.py checks
    that). It is loaded here, once, onto the device the engine trains on (bf16 on CUDA, fp32 on
    CPU), frozen (requires_grad False), in eval mode and run under no_grad: it costs its weights and
    one forward's activations, never gradients or optimizer state. Each process holds a full copy
    (DDP / FSDP shard only the student).
    Memory, beyond the student's training: teacher weights (2 bytes a parameter on CUDA) + about
    six fp32 (micro_batch, seq_len, vocab) tensors for the two distributions (zh-64m at micro_batch
    16 x 512 x 6400: ~1.3 GB; lower micro_batch to fit).
    """

    name = "distill"

    def __init__(self, teacher: str, temperature: float = 2.0, alpha: float = 0.5, aux_loss_coef: float | None = None):
        if not temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
        super().__init__(aux_loss_coef)
        self.temperature, self.alpha = float(temperature), float(alpha)
        device = _engine_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.teacher = load_hf_dir(teacher, dtype)[0].to(device).eval().requires_grad_(False)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(batch["input_ids"], document_ids=batch["document_ids"])
        with torch.no_grad():
            teacher_logits = self.teacher(batch["input_ids"], document_ids=batch["document_ids"])
        ce, kl = distill_terms(logits, teacher_logits, batch["targets"], self.temperature)
        per_token = self.alpha * ce + (1 - self.alpha) * self.temperature**2 * kl
        if "weights" in batch:
            per_token = per_token * batch["weights"].float()
        tokens = (batch["targets"] != IGNORE).sum().clamp(min=1).float()
        stats = {"kl": kl.detach().sum() / tokens, "ce": ce.detach().sum() / tokens}
        return self.with_aux(model, {"sum": per_token.sum(), "stats": stats})


OBJECTIVES = {"causal_lm": CausalLM, "sft": SFT, "dpo": DPO, "reward_bt": RewardBT, "grpo": GRPO, "ppo": PPO, "distill": Distill}
