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
               balancing), averaged by the engine over the step's micro-batches.

`loss` runs under the engine's autocast and may be torch.compile'd as a whole
(model call + loss), so it must not sync with the host (.item(), Python
branching on tensor values). Later stages (SFT, DPO, distillation) add their
own objectives next to `CausalLM`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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
        nats = F.cross_entropy(
            logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE, reduction="sum"
        )
        out = {"sum": nats}
        inner = _unwrap(model)
        coef = self.aux_loss_coef
        if coef is None:
            config = getattr(inner, "config", None)
            coef = config.router_aux_loss_coef if getattr(config, "is_moe", False) else 0.0
        if coef:
            out["aux"] = coef * inner.aux_loss
        return out


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

    batch: input_ids, targets, document_ids (B, T), as CausalLM (tasks/sft.py PackedChats).
    """

    name = "sft"


def sequence_logps(model, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) fp32: the sum over each row of log p(target) where target != -100 (one reply per row;
    rows are right-padded, so no document ids are needed)."""
    logits = model(input_ids).float()
    logp = torch.log_softmax(logits, dim=-1)
    keep = targets != IGNORE
    picked = torch.gather(logp, -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1)


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


OBJECTIVES = {"causal_lm": CausalLM, "sft": SFT, "dpo": DPO}
