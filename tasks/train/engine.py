"""The training engine shared by every training stage (pretrain, SFT, DPO, reward, PPO, GRPO, distill;
the RL stages through an on-policy data plug-in, tasks/train/rollout.py).

    from tasks.train import TrainConfig, train, CausalLM, PackedBatches, ValidationRows
    result = train(cfg, model_fn, CausalLM(), PackedBatches(source, cfg.seq_len), val)

`train` runs in one process, or in each of the processes torchrun starts
(RANK / WORLD_SIZE / LOCAL_RANK in the environment -> DDP or FSDP2). It needs
only torch, numpy, safetensors (+ pyarrow and tokenizers for the CLI's data):
no prefect or mlflow, so it runs on a bare GPU box. The CLI

    python -m tasks.train.engine --config run.json       (or under torchrun)

reads a JSON file (see `run_from_config`) and is what tasks/train/launch.py starts.

A step: the data plug-in packs the whole global batch (`global_batch` rows) on
every rank; rank r takes its own `micro_batch` rows for each of the
`grad_accum` micro-steps (data.split_rows), so the data order, the cursor and the
loss do not depend on the number of processes. The objective returns the
SUM of its per-term losses; the engine divides by the global term count of
the step (known on the host, no sync), so the step loss is the mean over the
global batch whatever the split. bf16 autocast on CUDA, fp32 on CPU;
gradient clipping; fused AdamW (decay for matrices, none for norms and
biases); LR from `Schedule`. Nothing syncs with the host inside a step: the
loss and grad norm stay on the device; at each `log_every` step they are copied
to the host asynchronously and read one step later, while the GPU runs that
step (so logging never idles the GPU).

Outputs in `out_dir`:
  metrics.jsonl        rank 0 only, one JSON object per line, written at log steps:
                       {"kind": "train", "step", "loss", "lr", "grad_norm", "tokens",
                        "tokens_per_s", "mfu", "peak_mem_gib", + the objective's "stats", ...}
                       {"kind": "eval", "step", "val_loss", "val_bpb"}
                       {"kind": "checkpoint", "step", "path"}, {"kind": "resume", "step"},
                       {"kind": "start" | "end", ...}
  checkpoints/step_N/  see checkpoint.py; every `ckpt_every` steps, before every evaluation, at the
                       end (before the final evaluation), and on SIGTERM / SIGINT / parent death
                       (then exit status 143). So an evaluation that fails never costs training:
                       the error names the step, and a run started again resumes from that
                       checkpoint and only evaluates (the final evaluation, if its record is missing).

Resume: if `out_dir/checkpoints` holds a checkpoint, `train` continues from the
newest one: weights, optimizer, schedule step, data cursor, RNG states.
On CPU with deterministic=True the continued run is bitwise identical to an
uninterrupted one.

The parts, each on one screen: `train` sets up the processes, the model, the optimizer and the resume,
then hands them to a `Trainer` (the step loop), which uses a `MetricsInterval` (the train records,
tasks/train/metrics.py), a `Checkpointer` (when to save, what a checkpoint holds, the resume) and an
`Evaluator` (validation loss and eval records, tasks/train/evaluator.py).

Imports: FSDP's modules (torch.distributed.fsdp, torch.distributed.checkpoint) are imported where an
FSDP run uses them: they add over a second to every start of this module (the stage processes import
it for TrainConfig), and only FSDP runs need them.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch.nn.parallel import DistributedDataParallel as DDP

from model import ModelConfig, Transformer, load_hf_dir
from model.transformer import COMPILE_OPTIONS
from tasks.shard_reader import ShardReader
from tasks.train import checkpoint as ckpt
from tasks.train.builders import data_builder, model_builder
from tasks.train.data import PackedBatches, ValidationRows, split_rows, to_device
from tasks.train.evaluator import Evaluator
from tasks.train.lora import apply_lora
from tasks.train.metrics import MetricsInterval, MetricsLog
from tasks.train.objectives import OBJECTIVES
from tasks.train.schedule import Schedule

EXIT_STOPPED = 143  # exit status after a checkpoint on SIGTERM / SIGINT / parent death


@dataclass
class TrainConfig:
    """How to train; plain data (JSON in, JSON in the checkpoint)."""

    out_dir: str
    steps: int  # optimizer updates in total
    seq_len: int = 512
    micro_batch: int = 8  # rows per process per forward/backward
    global_batch: int = 0  # rows per optimizer step; 0 -> micro_batch * processes (no accumulation)
    lr: float = 3e-4  # peak learning rate
    schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # wsd: last share of the steps spent decaying
    decay_shape: str = "linear"  # wsd: linear | sqrt
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 -> no clipping (the norm is still logged)
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool | None = None  # torch.compile the objective's loss (model + loss in one graph); None -> on CUDA only
    parallel: str = "ddp"  # with several processes: ddp | fsdp (FSDP2, one unit per layer)
    log_every: int = 10
    eval_every: int = 0  # 0 -> only at the end; every evaluation step is also a checkpoint step
    ckpt_every: int = 0  # 0 -> only at the end (and on a stop signal)
    keep_last: int = 2
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise resume on CPU)
    threads: int = 0  # torch CPU threads; 0 -> torch's default
    peak_flops: float = 0.0  # per device for MFU; 0 -> from the device name (bf16 dense peak)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.seq_len < 1 or self.micro_batch < 1:
            raise ValueError("steps, seq_len and micro_batch must be >= 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision {self.precision!r}: expected auto, bf16 or fp32")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel {self.parallel!r}: expected ddp or fsdp")
        self.schedule_obj()  # validates the schedule fields

    def schedule_obj(self) -> Schedule:
        return Schedule(self.schedule, self.steps, self.warmup_steps, self.decay_fraction, self.decay_shape, self.min_lr_ratio)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown train config keys: {sorted(unknown)} (known: {sorted(names)})")
        return cls(**d)


# --------------------------------------------------------------------------- processes


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    flag_group: Any = None  # a gloo group for the stop flag (no GPU sync)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Read torchrun's environment; init the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    d = Dist(rank, world, local, device)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        d.flag_group = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    return d


# --------------------------------------------------------------------------- stop signals


class StopFlag:
    """SIGTERM / SIGINT, or the death of the launching process, ask the loop to stop.

    The loop checks `should_stop()` after every step; all ranks agree (a MAX
    all-reduce on a CPU group), checkpoint the same step and exit. The parent
    watch covers a stage process that crashed or was killed: the child saves
    and exits instead of training on as an orphan (SLM_PARENT_PID, and the
    direct parent, e.g. torchrun's agent), checked 5 times a second.
    close() stops and joins the watch thread: left running, it would drop its reference
    to this flag (and so to the process group) on its own after the main thread had begun
    interpreter shutdown; destroying a process group there aborts the process ("terminate
    called without an active exception").
    """

    def __init__(self, d: Dist):
        self.d = d
        self.reason: str | None = None
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        watched = {os.getppid()}
        if os.environ.get("SLM_PARENT_PID"):
            watched.add(int(os.environ["SLM_PARENT_PID"]))
        self._watched = watched
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="parent-watch")
        self._watcher.start()

    def close(self) -> None:
        """Give the signals back to whoever had them (train() called in-process), stop watching
        and wait for the watch thread to end (see the class docstring)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        self._closed.set()
        self._watcher.join()

    def _on_signal(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def _watch(self) -> None:
        parent = os.getppid()
        while self.reason is None and not self._closed.wait(0.2):
            gone = os.getppid() != parent
            for pid in self._watched:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    gone = True
                except PermissionError:
                    pass
            if gone:
                self.reason = "parent exited"

    def should_stop(self) -> bool:
        flag = self.reason is not None
        if self.d.world > 1:
            t = torch.tensor([int(flag)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.d.flag_group)
            flag = bool(t.item())
            if flag and self.reason is None:
                self.reason = "another rank stopped"
        return flag


# --------------------------------------------------------------------------- model, optimizer


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay for matrices (dim >= 2: projections, embeddings, experts), none for norms and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, d: Dist) -> torch.nn.Module:
    """DDP or FSDP2 (fully_shard per decoder layer, then the root) when world > 1."""
    if d.world == 1:
        return model
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(model, "layers", []):
            fully_shard(layer)
        fully_shard(model)
        return model
    # gradient_as_bucket_view: the grads are views into DDP's all-reduce buckets (no copy in or out)
    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, gradient_as_bucket_view=True)


def _sync_context(model: torch.nn.Module, cfg: TrainConfig, d: Dist, last: bool):
    """No gradient all-reduce on the micro-steps before the last one."""
    if d.world == 1:
        return contextlib.nullcontext()
    if cfg.parallel == "fsdp":
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else model.no_sync()


# --------------------------------------------------------------------------- the loop


def autocast_context(cfg: TrainConfig, device: torch.device):
    """bf16 autocast when cfg.precision asks for it (auto: on CUDA), else a no-op context. Anything
    that must see the numbers the training forward sees (RL rollouts' log-probs) uses this too."""
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Checkpointer:
    """When the run is saved, what a checkpoint holds, and the resume from one (file format: checkpoint.py).

    A checkpoint holds the weights, the optimizer state by parameter name, the trainer state (step,
    tokens, schedule, data cursor, world size, the reason, `extra_state`) and every rank's RNG states.
    `due`: every `ckpt_every` steps, the last step, a stop, and every evaluation step. `save` is collective
    (all ranks call it; FSDP gathers the full state to rank 0, which writes it). `last`: the newest
    checkpoint this run wrote or resumed from (None before the first).
    """

    def __init__(self, cfg: TrainConfig, d: Dist, root: Path, base: torch.nn.Module, optimizer, data, log: MetricsLog,
                 model_config: dict, extra_state: dict | None, resume: Path | None):
        self.cfg, self.d, self.root, self.base, self.optimizer, self.data, self.log = cfg, d, root, base, optimizer, data, log
        self.model_config, self.extra_state, self.last = model_config, extra_state, resume
        self.schedule = cfg.schedule_obj()
        self.sharded = d.world > 1 and cfg.parallel == "fsdp"

    def due(self, step: int, last: bool, stopping: bool, eval_due: bool) -> bool:
        return bool((self.cfg.ckpt_every and step % self.cfg.ckpt_every == 0) or last or stopping or eval_due)

    def restore(self, resume: Path, trainer_state: dict) -> tuple[int, int]:
        """Optimizer, data cursor and RNG states from `resume` (its weights are loaded before the model is
        wrapped); writes the resume record. Returns (step, tokens)."""
        d = self.d
        saved = ckpt.load_optimizer(resume)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.base, self.optimizer, saved, options=StateDictOptions(full_state_dict=True))
        else:
            ckpt.load_optimizer_state_by_name(self.base, self.optimizer, saved)
        step, tokens = int(trainer_state["step"]), int(trainer_state["tokens"])
        self.data.load_state_dict(trainer_state["data"])
        rng = ckpt.load_rng(resume, d.rank)
        if rng is not None:
            ckpt.set_rng_state(rng)
        notes = []
        if trainer_state.get("schedule") != self.schedule.state_dict():
            notes.append("the schedule changed since the checkpoint")
        if int(trainer_state.get("world_size", d.world)) != d.world:
            notes.append(f"world size {trainer_state['world_size']} -> {d.world} (same data order, other float sums)")
        self.log.write({"kind": "resume", "step": step, "checkpoint": str(resume), "notes": notes})
        return step, tokens

    def save(self, step: int, tokens: int, reason: str) -> Path:
        d, base, optimizer = self.d, self.base, self.optimizer
        trainer = {"step": step, "tokens": tokens, "schedule": self.schedule.state_dict(),
                   "data": _plain(self.data.state_dict()), "world_size": d.world, "reason": reason,
                   "extra": _plain(self.extra_state or {})}
        if self.sharded:  # gathered to rank 0 (the others get empty dicts)
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd, optim_sd = get_model_state_dict(base, options=full), get_optimizer_state_dict(base, optimizer, options=full)
        elif d.main:
            model_sd, optim_sd = base.state_dict(), ckpt.optimizer_state_by_name(base, optimizer)
        else:
            model_sd, optim_sd = {}, {}
        tmp = ckpt.begin_save(self.root, step) if d.main else ckpt.tmp_dir(self.root, step)
        if d.world > 1:
            dist.barrier()
        if d.main:
            ckpt.write_main(tmp, model_sd, self.model_config, optim_sd, trainer)
        ckpt.write_rng(tmp, d.rank)
        if d.world > 1:
            dist.barrier()
        path = ckpt.step_dir(self.root, step)
        if d.main:
            path = ckpt.finish_save(self.root, step, self.cfg.keep_last)
            self.log.write({"kind": "checkpoint", "step": step, "path": str(path), "reason": reason})
        if d.world > 1:
            dist.barrier()
        self.last = path
        return path


class Trainer:
    """The step loop: from `step` to cfg.steps, one optimizer update per step (see the module docstring),
    a train record at every log step, a checkpoint when `checkpointer.due`, an evaluation when
    `evaluator.due`, and a checkpoint then a stop on SIGTERM / SIGINT / parent death (StopFlag).
    `run()` returns {"step", "tokens", "stopped", "checkpoint", "val"}.
    """

    def __init__(self, cfg: TrainConfig, d: Dist, model: torch.nn.Module, base: torch.nn.Module, optimizer,
                 objective, loss_fn, data, checkpointer: Checkpointer, evaluator: Evaluator, metrics: MetricsInterval,
                 step: int, tokens: int):
        self.cfg, self.d, self.model, self.optimizer, self.objective, self.loss_fn = cfg, d, model, optimizer, objective, loss_fn
        self.data, self.checkpointer, self.evaluator, self.metrics = data, checkpointer, evaluator, metrics
        self.step, self.tokens = step, tokens
        self.schedule = cfg.schedule_obj()
        self.params = [p for p in base.parameters() if p.requires_grad]
        self.per_step = cfg.global_batch or cfg.micro_batch * d.world
        self.accum = self.per_step // (cfg.micro_batch * d.world)

    def train_step(self) -> float:
        """One optimizer update on the next global batch; returns its learning rate."""
        cfg, d, model = self.cfg, self.d, self.model
        lr = cfg.lr * self.schedule(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batch = self.data.next_batch(self.per_step)
        global_count = self.objective.count(batch)
        scale = d.world / max(global_count, 1)
        for i, micro in enumerate(split_rows(batch, cfg.micro_batch, self.accum, d.world, d.rank)):
            tensors = to_device(micro, d.device)
            with _sync_context(model, cfg, d, last=i == self.accum - 1):
                with autocast_context(cfg, d.device):
                    out = self.loss_fn(model, tensors)
                loss = out["sum"] * scale
                if "aux" in out:
                    loss = loss + out["aux"] / self.accum
                loss.backward()
            self.metrics.add_micro(out)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.per_step * cfg.seq_len
        self.metrics.end_step(global_count, grad_norm)
        return lr

    def save(self, reason: str) -> None:
        """A checkpoint never comes ahead of its step's train record, nor after a non-finite gradient norm
        or loss, logged or not. Its time is left out of the train rates."""
        with self.metrics.paused():
            self.metrics.finish_record()
            self.metrics.check_finite(self.step, self.optimizer.param_groups[0]["lr"])
            self.checkpointer.save(self.step, self.tokens, reason)

    def run(self) -> dict:
        cfg, metrics = self.cfg, self.metrics
        val_result: dict = {}
        stopped: str | None = None
        stop = StopFlag(self.d)
        try:
            while self.step < cfg.steps:
                lr = self.train_step()
                if metrics.pending is not None:  # the previous log step's numbers: ready once the GPU finished that step
                    metrics.finish_record()
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    metrics.start_record(self.step, lr, self.tokens)
                eval_due = self.evaluator.due(self.step, last)
                stopping = stop.should_stop()
                # An evaluation step is a checkpoint step: the checkpoint is durable before the evaluation runs, so an
                # evaluation that fails (its no-grad graph is compiled anew; it can run out of memory or hit a CUDA
                # fault that leaves the process unusable) never costs a training step. A retry resumes from it.
                if self.checkpointer.due(self.step, last, stopping, eval_due):
                    self.save("stop: " + stop.reason if stopping else ("final" if last else "periodic"))
                if eval_due:
                    val_result = self.evaluator.evaluate_at(self.step, self.checkpointer.last)
                if stopping and not last:
                    stopped = stop.reason
                    break
            if self.evaluator.val is not None and self.step == cfg.steps and not val_result:
                val_result = self.evaluator.final(self.step, self.checkpointer.last)
            metrics.finish_record()
            metrics.log.write({"kind": "end", "step": self.step, "tokens": self.tokens, "stopped": stopped})
        except BaseException:
            with contextlib.suppress(Exception):
                metrics.finish_record()  # the last logged step's record (it finished) before the error goes up
            raise
        finally:
            stop.close()
        last_ckpt = self.checkpointer.last
        return {"step": self.step, "tokens": self.tokens, "stopped": stopped,
                "checkpoint": str(last_ckpt) if last_ckpt else None, "val": val_result}


def train(
    cfg: TrainConfig,
    model_fn: Callable[[], torch.nn.Module],
    objective,
    data,
    val=None,
    *,
    dist_ctx: Dist | None = None,
    extra_state: dict | None = None,
) -> dict:
    """Train; see the module docstring. Returns {"step", "tokens", "stopped", "checkpoint", "val"}.

    model_fn: builds the fp32 model on the CPU (called after seeding, on every rank);
              the model should have `.config` (ModelConfig) for checkpoints and MFU.
    objective: see objectives.py. data: `next_batch(rows)`, `state_dict()`, `load_state_dict()`, and
              optionally `attach_model(model)`: called once with the unwrapped model after its weights
              (and the data cursor) are restored, before the first batch, for on-policy data that
              samples from the model being trained (RL rollouts, tasks/train/rollout.py).
    val: `batches(rows, world, rank)`, `num_bytes` (0 -> no bits per byte); None -> no eval.
    extra_state: plain data stored in every checkpoint's trainer.pt (e.g. what the run was made from).
    """
    d = dist_ctx or init_distributed()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    cuda = d.device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    per_step = cfg.global_batch or cfg.micro_batch * d.world
    if per_step % (cfg.micro_batch * d.world):
        raise ValueError(
            f"global_batch {per_step} is not a multiple of micro_batch {cfg.micro_batch} x {d.world} processes; "
            "change micro_batch or global_batch"
        )

    seed_everything(cfg.seed)
    model = model_fn()
    model_config = model.config.to_dict() if hasattr(model, "config") else {}
    resume = ckpt.latest_checkpoint(ckpt_root)
    trainer_state: dict = {}
    if resume is not None:
        model.load_state_dict(ckpt.load_weights(resume), strict=True)
        trainer_state = ckpt.load_trainer(resume)
    model.to(d.device)
    base = model
    model = wrap_model(model, cfg, d)
    optimizer = make_optimizer(base, cfg, d.device)
    log = MetricsLog(out / "metrics.jsonl", d.main)
    checkpointer = Checkpointer(cfg, d, ckpt_root, base, optimizer, data, log, model_config, extra_state, resume)
    step, tokens = 0, 0
    if resume is not None:
        step, tokens = checkpointer.restore(resume, trainer_state)
    else:
        log.write({"kind": "start", "step": 0, "config": asdict(cfg), "world_size": d.world,
                   "params": sum(p.numel() for p in base.parameters()), "device": str(d.device)})

    if hasattr(data, "attach_model"):  # on-policy data (RL rollouts) samples from the model being trained
        data.attach_model(base)
    compile = cfg.compile if cfg.compile is not None else cuda
    # COMPILE_OPTIONS: what the model's document-masked flex attention needs (see model/transformer.py)
    # dynamic=False: training shapes are fixed (micro_batch rows of seq_len) and flex attention's pinned kernels
    # need a static sequence length; a new shape (a short last evaluation batch of chats or pairs, a shape this
    # process compiled in an earlier train() call) compiles anew instead of turning the length symbolic.
    loss_fn = torch.compile(objective.loss, dynamic=False, options=COMPILE_OPTIONS) if compile else objective.loss
    flops_per_token = base.config.flops_per_token(cfg.seq_len) if hasattr(getattr(base, "config", None), "flops_per_token") else 0

    model.train()
    metrics = MetricsInterval(cfg, d, log, per_step * cfg.seq_len, flops_per_token)
    evaluator = Evaluator(cfg, d, model, objective, loss_fn, compile, lambda: autocast_context(cfg, d.device), val, log, metrics)
    try:
        return Trainer(cfg, d, model, base, optimizer, objective, loss_fn, data, checkpointer, evaluator, metrics,
                       step, tokens).run()
    finally:
        log.close()


def _plain(x):
    """numpy scalars/arrays -> Python numbers / tensors, so torch.load(weights_only=True) reads them."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.copy())
    if isinstance(x, np.generic):
        return x.item()
    return x


# --------------------------------------------------------------------------- CLI


def run_from_config(spec: dict) -> dict:
    """The CLI's job description (JSON) -> model, data, objective -> train().

    {
      "train": {TrainConfig fields},
      "model": {"config": {ModelConfig fields}}          # from scratch
             | {"init_from": "/path/to/hf_dir"}          # continued pretraining (Qwen2/Qwen3 HF dir)
             | {"builder": NAME, ...}                    # a model builder of tasks/train/builders.py
                                                         # (e.g. a backbone with a scalar head)
               (either may add "lora": {rank, alpha, dropout, target_modules}: train LoRA adapters only)
      "data": {"builder": NAME, ...}  (a data builder of tasks/train/builders.py: chats, pairs, rollouts)
            | {"train": [shard paths], "validation": [shard paths] (optional),
               "eos_id": int, "seed": int (reading order, default 0),
               "tokenizer": "/path/tokenizer.json" (optional: bits per byte),
               "eval_tokens": int (validation tokens used, default 1_000_000)},
      "objective": {"name": "causal_lm", ...its keyword arguments},
      "extra": {...}                                     # stored in every checkpoint
    }
    Training documents come from tasks.shard_reader.ShardReader (one global stream,
    row groups and rows shuffled per epoch with `seed`); validation documents in file
    order, once.
    """
    cfg = TrainConfig.from_dict(spec["train"])
    m = spec["model"]
    if m.get("builder"):  # a model builder by name: e.g. a backbone with a scalar head
        build = model_builder(m["builder"])
        model_fn = lambda: build(m)  # noqa: E731
    elif "init_from" in m:
        model_fn = lambda: load_hf_dir(m["init_from"])[0]  # noqa: E731
    else:
        ModelConfig.from_dict(m["config"])  # fail early on a bad shape
        model_fn = lambda: Transformer(ModelConfig.from_dict(m["config"]))  # noqa: E731
    if m.get("lora"):  # {rank, alpha, dropout, target_modules}: adapters only (tasks/train/lora.py)
        plain_fn = model_fn
        model_fn = lambda: apply_lora(plain_fn(), **m["lora"])  # noqa: E731
    obj_spec = dict(spec.get("objective") or {"name": "causal_lm"})
    name = obj_spec.pop("name")
    if name not in OBJECTIVES:
        raise ValueError(f"objective {name!r}: known objectives are {sorted(OBJECTIVES)}")
    objective = OBJECTIVES[name](**obj_spec)
    dspec = spec["data"]
    if dspec.get("builder"):  # a data builder by name: (dspec, cfg) -> (data, val): chats, pairs, rollouts
        data, val = data_builder(dspec["builder"])(dspec, cfg)
        return train(cfg, model_fn, objective, data, val, extra_state=spec.get("extra"))
    source = ShardReader(dspec["train"], seed=int(dspec.get("seed", 0)), shuffle=True, loop=True)
    data = PackedBatches(source, cfg.seq_len)
    val = None
    if dspec.get("validation"):
        decode = None
        if dspec.get("tokenizer"):
            tok = Tokenizer.from_file(dspec["tokenizer"])
            decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        val_docs = ShardReader(dspec["validation"], shuffle=False, loop=False)
        val = ValidationRows(val_docs, cfg.seq_len, int(dspec["eos_id"]), int(dspec.get("eval_tokens", 1_000_000)), decode)
    return train(cfg, model_fn, objective, data, val, extra_state=spec.get("extra"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.train.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's JSON file (see run_from_config)")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.config).read_text(encoding="utf-8"))
    result = run_from_config(spec)
    if dist.is_initialized():
        # The DDP/FSDP model outlives train() in reference cycles, and with it the process group. Left to
        # interpreter exit, gloo's worker threads are torn down unjoined and the process aborts ("terminate
        # called without an active exception", SIGABRT: about 1 run in 50 of the 2-process CPU test). So the
        # ranks finish their collectives together, the cycles are freed, then the group goes.
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
    if result["stopped"]:
        print(f"stopped ({result['stopped']}) at step {result['step']}; checkpoint {result['checkpoint']}", file=sys.stderr)
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
