"""Evaluation during training: the validation loss of the model being trained and its eval records."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from tasks.train import checkpoint as ckpt
from tasks.train.data import to_device
from tasks.train.metrics import MetricsInterval, MetricsLog, read_metrics

if TYPE_CHECKING:  # types only: this module is imported by the engine
    from tasks.train.engine import Dist, TrainConfig


class Evaluator:
    """The validation loss (and bits per byte, when `val.num_bytes`) of the model on `val`'s rows, and the
    eval records. `due`: every `eval_every` steps and the last step, when there is a validation set.
    loss_fn: the objective's loss, compiled or not (`compiled`); autocast(): the training's precision.

    Every evaluation step is a checkpoint step, saved before the evaluation runs, so an evaluation that
    fails never costs training: `evaluate_at` raises an error naming the step and the checkpoint a run
    started again resumes from; that run, resumed at the final step, reuses the final eval record if it
    was written, else only evaluates (`final`). Evaluation time is left out of the train rates.
    """

    def __init__(self, cfg: TrainConfig, d: Dist, model: torch.nn.Module, objective, loss_fn, compiled: bool,
                 autocast: Callable, val, log: MetricsLog, metrics: MetricsInterval):
        self.cfg, self.d, self.model, self.objective, self.loss_fn = cfg, d, model, objective, loss_fn
        self.autocast, self.val, self.log, self.metrics = autocast, val, log, metrics
        # Compiled, evaluation runs the loss with autograd on; nothing calls backward, and what the forward keeps
        # for it is freed with each output, so memory stays one training forward's. Not no_grad: with torch 2.11
        # and triton 3.6 (H200, 2026-12) inductor's no-grad graph of this model faults in the flex attention
        # kernel it builds for that graph ("operation not supported on global/shared address space", or an
        # illegal address; the CUDA context is lost), with prologue fusion on or off, while the graph with
        # autograd, the one training runs, scores the same rows within 2e-5 of eager. tests/test_train_cuda.py.
        self.eval_grad_mode = torch.enable_grad if compiled else torch.no_grad

    def due(self, step: int, last: bool) -> bool:
        return self.val is not None and bool((self.cfg.eval_every and step % self.cfg.eval_every == 0) or last)

    def evaluate(self) -> dict:
        """{"val_loss": mean nats per scored token over all ranks, "val_bpb": bits per byte (if known)}."""
        d, model, val = self.d, self.model, self.val
        if val is None:
            return {}
        self.metrics.finish_record()
        model.eval()
        nats = torch.zeros((), dtype=torch.float64, device=d.device)
        count = 0
        with self.eval_grad_mode():
            for batch in val.batches(self.cfg.micro_batch, d.world, d.rank):
                count += self.objective.count(batch)
                with self.autocast():
                    nats += self.loss_fn(model, to_device(batch, d.device))["sum"].detach().double()
        model.train()
        total = torch.stack([nats, torch.tensor(float(count), dtype=torch.float64, device=d.device)])
        if d.world > 1:
            dist.all_reduce(total)
        nats_v, count_v = total.tolist()
        result = {"val_loss": nats_v / max(count_v, 1.0)}
        if getattr(val, "num_bytes", 0):
            result["val_bpb"] = nats_v / math.log(2) / val.num_bytes
        return result

    def evaluate_at(self, step: int, checkpoint: Path | None) -> dict:
        """Evaluate, write the eval record; a failure names the step and the checkpoint a retry resumes from."""
        try:
            with self.metrics.paused():
                result = self.evaluate()
        except Exception as e:
            raise RuntimeError(
                f"evaluation at step {step} failed ({type(e).__name__}: {e}); training is checkpointed at step "
                f"{ckpt.checkpoint_step(checkpoint) if checkpoint else 0}: run the stage again to retry the evaluation "
                "without retraining") from e
        self.log.write({"kind": "eval", "step": step, **result})
        if self.d.main:
            print(f"step {step} eval " + " ".join(f"{k} {v:.4f}" for k, v in result.items()), flush=True)
        return result

    def final(self, step: int, checkpoint: Path | None) -> dict:
        """A run resumed from its final checkpoint: that step's evaluation ran before (its record is kept:
        reuse it) or failed (evaluate now)."""
        done = [r for r in read_metrics(self.log.path) if r.get("kind") == "eval" and r.get("step") == step]
        return {k: v for k, v in done[-1].items() if k.startswith("val_")} if done else self.evaluate_at(step, checkpoint)
