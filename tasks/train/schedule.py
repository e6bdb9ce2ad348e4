"""Learning-rate schedules: linear warmup, then WSD, cosine or constant.

`Schedule` is plain data and a pure function of the step, so resuming needs
nothing but the step number (the checkpoint stores the schedule too, to
catch a resume under a changed one).

    sched = Schedule("wsd", total_steps=1000, warmup_steps=50, decay_fraction=0.2, min_ratio=0.0)
    for group in optimizer.param_groups:
        group["lr"] = peak_lr * sched(step)        # step = updates done so far (0-based)

Shapes (multiplier of the peak learning rate; s = step, W = warmup, N = total):
  warmup    s < W: (s + 1) / W                     (never 0: the first update moves)
  constant  1
  cosine    min + (1 - min) * (1 + cos(pi * p)) / 2,  p = (s - W) / (N - W)
  wsd       warmup-stable-decay (MiniCPM; Hägele et al. 2024): 1 until the last
            decay_fraction * N steps, then down to `min_ratio`, either linearly or
            as 1 - sqrt (decay_shape="sqrt", which Hägele et al. found better).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

KINDS = ("wsd", "cosine", "constant")


@dataclass(frozen=True)
class Schedule:
    kind: str
    total_steps: int
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # wsd only: share of total_steps spent decaying
    decay_shape: str = "linear"  # wsd only: "linear" | "sqrt" (1 - sqrt)
    min_ratio: float = 0.0  # final lr / peak lr

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schedule {self.kind!r}: expected one of {KINDS}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}), total >= 1")
        if not 0.0 <= self.decay_fraction <= 1.0 or not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError("decay_fraction and min_ratio must lie in [0, 1]")
        if self.decay_shape not in ("linear", "sqrt"):
            raise ValueError(f"decay_shape {self.decay_shape!r}: expected 'linear' or 'sqrt'")

    def __call__(self, step: int) -> float:
        """Multiplier for the update that follows `step` completed updates."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        lo = self.min_ratio
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            p = min(1.0, (step - self.warmup_steps) / span)
            return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))
        decay_steps = int(round(self.decay_fraction * self.total_steps))
        decay_start = max(self.warmup_steps, self.total_steps - decay_steps)
        if step < decay_start or decay_steps == 0:
            return 1.0
        p = min(1.0, (step - decay_start) / max(1, self.total_steps - decay_start))
        drop = p if self.decay_shape == "linear" else math.sqrt(p)
        return lo + (1.0 - lo) * (1.0 - drop)

    def state_dict(self) -> dict:
        return asdict(self)
