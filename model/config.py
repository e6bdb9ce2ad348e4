"""Model configuration: one dataclass for the dense and the MoE decoder.

`ModelConfig` is plain data (no torch import needed to build one), so run
profiles can validate it and checkpoints can store it as a dict
(`to_dict()` / `from_dict()`).

Shapes follow Qwen3: pre-norm decoder, RMSNorm, SwiGLU, RoPE, grouped-query
attention, optional per-head QK RMSNorm, optional tied embeddings.
MobileLLM-style deep-and-thin models are just configs (many layers, small
hidden size, GQA, tied embeddings).

MoE (num_experts > 0): every layer's feed-forward is a routed mixture of
`num_experts` SwiGLU experts of width `moe_intermediate_size`, `experts_per_token`
of them chosen per token (softmax router, top-k, optional renormalisation),
plus optionally `num_shared_experts` always-on experts (fused into one SwiGLU
of width num_shared_experts * moe_intermediate_size, scaled by a sigmoid gate,
as in Qwen1.5/Qwen2-MoE).

RoPE scaling (`rope_scaling`) uses Hugging Face's `rope_parameters` vocabulary
so that it is carried verbatim into config.json:
  {"rope_type": "linear",  "factor": 4.0}
  {"rope_type": "dynamic", "factor": 4.0}                       # NTK-aware (dynamic)
  {"rope_type": "yarn",    "factor": 4.0, "original_max_position_embeddings": 4096,
   optional "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"}
`rope_theta` is kept in its own field, never in the dict. The old key "type"
is accepted for "rope_type".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    intermediate_size: int = 1408  # dense SwiGLU width
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    qk_norm: bool = True  # Qwen3 per-head RMSNorm on q and k
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2 style)
    rope_scaling: dict[str, Any] | None = None
    # MoE (num_experts == 0 -> dense)
    num_experts: int = 0
    experts_per_token: int = 2
    moe_intermediate_size: int = 0  # 0 -> intermediate_size
    num_shared_experts: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    router_aux_loss_coef: float = 0.01
    # init
    init_std: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # free-form (e.g. bos/eos ids for export)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError("hidden_size must be divisible by num_heads when head_dim is not set")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not divisible by num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        if self.num_experts:
            if self.moe_intermediate_size == 0:
                self.moe_intermediate_size = self.intermediate_size
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise ValueError("need 1 <= experts_per_token <= num_experts")
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rs["rope_type"] = rs.pop("type", rs.get("rope_type", "default"))
            rs.pop("rope_theta", None)
            if rs["rope_type"] not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rs['rope_type']!r} not in {ROPE_TYPES}")
            if rs["rope_type"] == "default":
                rs = None
            elif "factor" not in rs:
                raise ValueError("rope_scaling needs a 'factor'")
            elif rs["rope_type"] == "yarn":
                rs.setdefault("original_max_position_embeddings", self.max_seq_len)
            self.rope_scaling = rs

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    # ------------------------------------------------------------------ counts
    def num_params(self, active: bool = False, embeddings: bool = True) -> int:
        """Number of parameters of `Transformer(self)` (tied embeddings counted once).

        active=True counts what one token touches: only `experts_per_token` of
        the routed experts (shared experts, router and attention always).
        embeddings=False leaves out the input embedding table (and the output
        head when it is untied, since it is a separate table of the same size).
        """
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * hd * h
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        if self.is_moe:
            e = self.experts_per_token if active else self.num_experts
            ffn = h * self.num_experts + e * 3 * h * self.moe_intermediate_size  # router + experts
            if self.num_shared_experts:
                ffn += 3 * h * self.num_shared_experts * self.moe_intermediate_size + h  # + sigmoid gate
        else:
            ffn = 3 * h * self.intermediate_size
        per_layer = attn + ffn + 2 * h  # + two RMSNorms
        n = self.num_layers * per_layer + h  # + final norm
        if embeddings:
            n += self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), PaLM / nanoGPT convention.

            6 * N  +  12 * num_layers * num_heads * head_dim * seq_len

        N is the number of parameters one token multiplies with: the active
        parameters (MoE: top-k routed experts only), without the input
        embedding lookup (a gather, not a matmul) but with the output head
        (counted once even when tied). 6 = 2 FLOPs per multiply-add x (1
        forward + 2 backward). The second term is the attention score and
        value products (QK^T and AV, 2 matmuls x 2 FLOPs x 3 for fwd+bwd) over a
        full seq_len context, not halved for causality, as PaLM appendix B and
        nanoGPT's estimate_mfu do. Norm, softmax and activation FLOPs are ignored.
        """
        n = self.num_params(active=True, embeddings=False) + self.vocab_size * self.hidden_size
        return 6 * n + 12 * self.num_layers * self.num_heads * self.head_dim * seq_len

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)
