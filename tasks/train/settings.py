"""Profile settings every training stage shares (pretrain, SFT, DPO, ...).

A pydantic model for the profile's `stages.<name>` section; each stage subclasses it,
adds what is its own and restates the defaults that suit it. The engine never imports
this module (its own config is the plain dataclass TrainConfig). Fields marked
exclude=True are runtime knobs (where and how fast, not what is trained): they stay
out of the stage key, so changing them never reruns a stage.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from profiles.schema import Strict


class EngineSettings(Strict):
    # Start from this HF Qwen2/Qwen3 directory instead of the upstream stage's model
    # (for pretrain: instead of a freshly initialised one).
    init_from: str | None = None
    seq_len: int = Field(128, ge=8)  # tokens per row
    global_batch: int = Field(16, ge=1)  # rows per optimizer step
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-4, gt=0)  # peak learning rate
    schedule: Literal["wsd", "cosine", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0  # initialisation and data order
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    eval_every: int = Field(0, ge=0)  # 0 -> only at the end
    # runtime knobs
    micro_batch: int = Field(8, ge=1, exclude=True)  # rows per device per forward (accumulation)
    compile: bool | None = Field(None, exclude=True)  # torch.compile; None -> on CUDA only
    log_every: int = Field(10, ge=1, exclude=True)
    ckpt_every: int = Field(50, ge=0, exclude=True)  # 0 -> only at the end and on a stop signal
    keep_last: int = Field(2, ge=1, exclude=True)
    threads: int = Field(0, ge=0, exclude=True)  # CPU threads of the engine; 0 -> torch's default
    grace_seconds: float = Field(120.0, gt=0, exclude=True)  # for the final checkpoint after SIGTERM

    @model_validator(mode="after")
    def _batches(self):
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch {self.global_batch} must be a multiple of micro_batch {self.micro_batch}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} is more than steps {self.steps}")
        return self
