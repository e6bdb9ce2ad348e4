"""Profile settings every training stage shares (pretrain, SFT, DPO, ...).

A pydantic model for the profile's `stages.<name>` section; each stage subclasses it,
adds what is its own and restates the defaults that suit it. The engine never imports
this module (its own config is the plain dataclass TrainConfig). Fields marked
exclude=True are runtime knobs (where and how fast, not what is trained): they stay
out of the stage key, so changing them never reruns a stage.

One source: every TrainConfig field but out_dir is a field here, with TrainConfig's
default unless a stage restates it; the engine's "train" section is built from
TrainConfig's field list (tasks/train/stage.py train_section), so a setting can reach
the engine only through this model, and then it is in the key or marked a runtime knob
(tests/test_train_settings.py checks both).
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
    decay_fraction: float = Field(0.2, ge=0, le=1)  # wsd: last share of the steps spent decaying
    decay_shape: Literal["linear", "sqrt"] = "linear"  # wsd
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)  # AdamW
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
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
    parallel: Literal["ddp", "fsdp"] = Field("ddp", exclude=True)  # with several processes
    deterministic: bool = Field(False, exclude=True)  # bitwise-reproducible resume on CPU
    peak_flops: float = Field(0.0, ge=0, exclude=True)  # per device for MFU; 0 -> from the device name

    @model_validator(mode="after")
    def _batches(self):
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch {self.global_batch} must be a multiple of micro_batch {self.micro_batch}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} is more than steps {self.steps}")
        return self


class ChatData(Strict):
    """One entry of `data:`: files and their format."""

    path: str  # a file or glob; inside `package` when that is set
    package: str | None = None  # an installed package shipping the files (e.g. chatterbot_corpus)
    format: Literal["alpaca", "sharegpt", "openai", "chatterbot"]


class LoraSettings(Strict):
    """LoRA adapters (peft, tasks/train/lora.py), merged into the weights at export."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]  # Linear names (or regexes)


class TrainSettings(EngineSettings):
    """What the fine-tuning stages share (SFT, DPO): the engine's knobs at chat-data scale."""

    lora: LoraSettings | None = None  # None -> full fine-tuning
    seq_len: int = Field(256, ge=8)  # tokens per row (and the longest conversation kept, + 1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    val_fraction: float = Field(0.05, gt=0, lt=1)  # share of records held out
    # runtime knobs, kept out of the key
    nproc: int = Field(1, ge=1, exclude=True)


class PreferenceData(Strict):
    path: str
    package: str | None = None
    format: Literal["preference", "chatterbot"]
    # chatterbot conversations carry no rejected reply; it is made (tasks/train/preference.py):
    # "another_answer" takes another conversation's reply, "looped" the chosen reply collapsing into
    # one repeated character, the failure of a small model's greedy decoding.
    rejected: Literal["another_answer", "looped"] = "another_answer"

    @model_validator(mode="after")
    def _rejected_is_made_for_chatterbot_only(self):
        if self.format == "preference" and self.rejected != "another_answer":
            raise ValueError("rejected: preference files carry their own rejected replies; it applies to "
                             "format: chatterbot only")
        return self


class ChatSettings(TrainSettings):
    """A fine-tuning stage on chat data (sft, distill)."""

    data: list[ChatData] = []  # empty -> the stage fails with a message saying to add data
    system_prompt: str | None = None  # put first in every conversation that has no system message


class ModelShape(Strict):
    """The network for training from scratch (model/config.py ModelConfig; vocab from the tokenizer)."""

    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    head_dim: int = Field(0, ge=0)  # 0 -> hidden_size // num_heads
    intermediate_size: int = Field(384, ge=1)
    rope_theta: float = Field(1_000_000.0, gt=0)
    tie_embeddings: bool = True
    qk_norm: bool = True
    num_experts: int = Field(0, ge=0)  # > 0: MoE feed-forward
    experts_per_token: int = Field(2, ge=1)
    moe_intermediate_size: int = Field(0, ge=0)
    num_shared_experts: int = Field(0, ge=0)
    router_aux_loss_coef: float = Field(0.01, ge=0)
    init_std: float = Field(0.02, gt=0)
