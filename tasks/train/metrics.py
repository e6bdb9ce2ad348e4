"""The training metrics: metrics.jsonl (MetricsLog, read_metrics) and the train records the engine
writes at its log steps (MetricsInterval). The record kinds are listed in tasks/train/engine.py.
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # types only: this module is imported by the engine
    from tasks.train.engine import Dist, TrainConfig

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "4090": 165e12}


class MetricsLog:
    """Append-only JSONL (rank 0). One write + flush per record batch."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        self._fh = open(self.path, "a", encoding="utf-8") if enabled else None

    def write(self, *records: dict) -> None:
        if not self.enabled:
            return
        now = time.time()
        self._fh.write("".join(json.dumps({"time": round(now, 3), **r}, ensure_ascii=False) + "\n" for r in records))
        self._fh.flush()

    def close(self) -> None:
        if self._fh:
            self._fh.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, as a resumed run sees its history: records of an
    interrupted attempt past the step it resumed from are dropped; a torn last line
    (kill -9 mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records: list[dict] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "resume":
            records = [r for r in records if r.get("step", 0) <= rec["step"] or r.get("kind") in ("start", "end")]
        records.append(rec)
    return records


def device_peak_flops(device: torch.device) -> float:
    """bf16 dense peak of a known GPU (for MFU); 0 for CPUs and unknown devices."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)


def peak_flops_per_device(cfg: TrainConfig, device: torch.device) -> float:
    return cfg.peak_flops or device_peak_flops(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def raise_not_finite(what: str, step: int, lr: float):
    raise FloatingPointError(f"training {what} by step {step}: lower lr (now {lr:g}) or check the data; "
                             "no checkpoint was written from this point")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's sharded grad norm) gathered whole; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class MetricsInterval:
    """The training numbers of the steps since the last log step, and the train record they become.

    Per micro-step `add_micro(out)` adds the objective's loss sum and stats (on the device, no sync); per
    step `end_step(count, grad_norm)`. At a log step `start_record` queues the interval's numbers for a
    copy to the host and starts a new interval; `finish_record` writes the record once they are there.
    Rates (tokens/s, MFU) are over the interval the record describes: from the GPU finishing one logged
    step to finishing the next, less the time spent inside `paused()` (evaluation, checkpoints).
    """

    def __init__(self, cfg: TrainConfig, d: Dist, log: MetricsLog, tokens_per_step: int, flops_per_token: float):
        self.cfg, self.d, self.log = cfg, d, log
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak = peak_flops_per_device(cfg, d.device)
        self.nats = torch.zeros((), dtype=torch.float32, device=d.device)
        self.count, self.steps, self.micro = 0, 0, 0
        self.stats: dict[str, torch.Tensor] = {}
        self.grad_norm = torch.zeros((), device=d.device)
        self.pending: dict | None = None  # the last log step's train record, its numbers still on the way
        self.clock, self.paused_s = time.perf_counter(), 0.0

    def add_micro(self, out: dict) -> None:
        self.nats += out["sum"].detach().float()
        for name, value in out.get("stats", {}).items():
            self.stats[name] = self.stats.get(name, 0.0) + value.detach().float()
        self.micro += 1

    def end_step(self, count: int, grad_norm: torch.Tensor) -> None:
        self.count += count
        self.steps += 1
        self.grad_norm = grad_norm

    def check_finite(self, step: int, lr: float) -> None:
        """Raise when the last gradient norm, or (in a single process) the interval's loss, is not finite.
        Every rank decides alike without a collective: the grad norm is of the all-reduced gradients (a NaN
        loss on any rank makes them NaN), and the per-rank loss is checked only in a single process."""
        if not math.isfinite(float(full_tensor(self.grad_norm))) or (self.d.world == 1 and not math.isfinite(float(self.nats))):
            raise_not_finite("loss or gradient norm is not finite", step, lr)

    def start_record(self, step: int, lr: float, tokens: int) -> None:
        """At a log step: queue the interval's numbers (loss sum, grad norm, the objective's stats) for
        a copy to the host and reset the interval. Nothing waits here: `finish_record`, called after
        the next step is queued, waits for them while the GPU runs that step. Reading them at once
        instead left the GPU idle while the host packed the next batch (2.5% of zh-64m's step time
        on an H100 with log_every 10)."""
        d = self.d
        names = list(self.stats)
        values = torch.stack([self.nats.float(), full_tensor(self.grad_norm).float().to(d.device)]
                             + [torch.as_tensor(self.stats[k], device=d.device).float() for k in names])
        if d.world > 1:
            dist.all_reduce(values[:1])
        if d.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = values, None
        self.pending = {"step": step, "lr": lr, "tokens": tokens, "count": self.count, "steps": self.steps,
                        "micro": self.micro, "names": names, "values": host, "ready": ready,
                        "peak_mem_gib": peak_memory_gib(d.device)}
        self.nats.zero_()
        self.count, self.steps = 0, 0
        self.stats, self.micro = {}, 0

    @contextlib.contextmanager
    def paused(self):
        """Eval and checkpoints: their time is left out of the tokens/s of the interval they fall in
        (timed from the GPU having finished the queued training work)."""
        if self.d.device.type == "cuda":
            torch.cuda.synchronize(self.d.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def finish_record(self) -> None:
        """Write the queued train record (no-op if none). Tokens/s spans this wait's end to the previous
        one's, i.e. the GPU finishing one logged step to finishing the next, less the `paused` time."""
        if self.pending is None:
            return
        p, self.pending = self.pending, None
        if p["ready"] is not None:
            p["ready"].synchronize()
        now = time.perf_counter()
        elapsed, self.clock, self.paused_s = now - self.clock - self.paused_s, now, 0.0
        nats_v, gnorm, *stat_values = p["values"].tolist()
        loss_v = nats_v / max(p["count"], 1)
        if not math.isfinite(loss_v):
            raise_not_finite(f"loss is {loss_v}", p["step"], p["lr"])
        tps = p["steps"] * self.tokens_per_step / max(elapsed, 1e-9)
        rec = {"kind": "train", "step": p["step"], "loss": loss_v, "lr": p["lr"], "grad_norm": gnorm,
               "tokens": p["tokens"], "tokens_per_s": tps, "peak_mem_gib": p["peak_mem_gib"]}
        if self.flops_per_token and self.peak:
            rec["mfu"] = tps * self.flops_per_token / (self.peak * self.d.world)
        # the objective's own statistics: means over the interval's micro-batches
        rec.update({k: v / max(p["micro"], 1) for k, v in zip(p["names"], stat_values)})
        self.log.write(rec)
        if self.d.main:
            mfu = f" mfu {rec['mfu']:.1%}" if "mfu" in rec else ""
            print(f"step {p['step']}/{self.cfg.steps} loss {loss_v:.4f} lr {p['lr']:.3g} grad norm {gnorm:.3f} "
                  f"{tps:,.0f} tok/s{mfu} mem {rec['peak_mem_gib']:.2f} GiB", flush=True)
