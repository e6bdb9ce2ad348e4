"""Hugging Face directory export / import.

save_hf_dir(model, tokenizer_dir, out_dir) writes config.json + model.safetensors
(+ the tokenizer files) that stock `transformers.AutoModelForCausalLM.from_pretrained`
loads without trust_remote_code, giving the same logits. The architecture is
chosen from the config:

  dense, qk_norm                         -> Qwen3ForCausalLM     (model_type qwen3)
  dense, no qk_norm                      -> Qwen2ForCausalLM     (qwen2; zero q/k/v biases if we have none)
  MoE, qk_norm, no shared experts        -> Qwen3MoeForCausalLM  (qwen3_moe)
  MoE, no qk_norm, shared experts        -> Qwen2MoeForCausalLM  (qwen2_moe)
  MoE, qk_norm + shared experts          -> ValueError (no stock HF architecture has both)

All four are architectures llama.cpp's convert_hf_to_gguf.py handles. MoE
experts are written one tensor per expert
(`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`), the layout of the
Qwen MoE checkpoints on the Hub: transformers 5 fuses them on load into its
3-D `experts.gate_up_proj` / `experts.down_proj`, and llama.cpp and older
transformers read them as they are. Tied embeddings: no lm_head.weight is
written and tie_word_embeddings is true. rope_scaling goes into
`rope_parameters` (transformers 5) together with rope_theta.

load_hf_dir(path) reads such a directory back, or a stock Qwen2 / Qwen2.5 /
Qwen3 / Qwen3-MoE / Qwen2-MoE directory (sharded safetensors, either expert
layout) for continued pretraining, and returns (Transformer, ModelConfig).

transformers (its AutoConfig reads and checks config.json) is imported inside the two functions
that use it: every user of `model` imports this module, and transformers adds seconds of start-up
that the training engine and the generation engine do not otherwise pay.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .transformer import Transformer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _architecture(cfg: ModelConfig) -> tuple[str, str]:
    if not cfg.is_moe:
        return ("qwen3", "Qwen3ForCausalLM") if cfg.qk_norm else ("qwen2", "Qwen2ForCausalLM")
    if cfg.num_shared_experts == 0:
        if not cfg.qk_norm:
            raise ValueError("MoE without qk_norm and without shared experts has no stock HF architecture")
        return "qwen3_moe", "Qwen3MoeForCausalLM"
    if cfg.qk_norm:
        raise ValueError("MoE with shared experts exports as Qwen2-MoE, which has no qk_norm: set qk_norm=False")
    return "qwen2_moe", "Qwen2MoeForCausalLM"


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """ModelConfig -> the keyword arguments of the matching transformers config class."""
    model_type, arch = _architecture(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    d = dict(
        architectures=[arch],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope,
        use_sliding_window=False,
        dtype=str(dtype).removeprefix("torch."),
    )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in cfg.extra:
            d[key] = cfg.extra[key]
    if model_type == "qwen3":
        d["attention_bias"] = cfg.attention_bias  # (Qwen3 also biases o_proj: we write zeros)
    if cfg.is_moe:
        d.update(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_token,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if model_type == "qwen3_moe":
        d["attention_bias"] = cfg.attention_bias
    if model_type == "qwen2_moe":
        d["qkv_bias"] = cfg.attention_bias
        d["shared_expert_intermediate_size"] = cfg.num_shared_experts * cfg.moe_intermediate_size
    return d


def to_hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our parameter names -> HF names (see module docstring). Tensors are fresh, contiguous copies."""
    cfg = model.config
    model_type, _ = _architecture(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().to(dtype or t.dtype).contiguous().clone()
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = t
        elif name.endswith("mlp.experts.gate_up_proj"):
            prefix, inner = "model." + name.removesuffix("gate_up_proj"), cfg.moe_intermediate_size
            for e in range(cfg.num_experts):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inner].clone()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inner:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = "model." + name.removesuffix("down_proj")
            for e in range(cfg.num_experts):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        else:
            out["model." + name] = t
    if not cfg.attention_bias and model_type == "qwen2":  # Qwen2 always has q/k/v biases
        for name in [k for k in out if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]:
            out[name.replace(".weight", ".bias")] = torch.zeros(out[name].shape[0], dtype=out[name].dtype)
    if cfg.attention_bias and model_type in ("qwen3", "qwen3_moe"):  # Qwen3's attention_bias includes o_proj
        for name in [k for k in out if k.endswith("o_proj.weight")]:
            out[name.replace(".weight", ".bias")] = torch.zeros(out[name].shape[0], dtype=out[name].dtype)
    return out


def save_hf_dir(
    model: Transformer,
    tokenizer_dir: str | Path | None,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `out_dir` (config.json, model.safetensors, tokenizer files if tokenizer_dir).

    dtype: weight dtype in the file (default: the model's parameter dtype).
    Returns out_dir as a Path.
    """
    from transformers import AutoConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = to_hf_state_dict(model, dtype)
    file_dtype = next(iter(state.values())).dtype
    kwargs = hf_config_dict(cfg, file_dtype)
    model_type, _ = _architecture(cfg)
    hf_cfg = AutoConfig.for_model(model_type, **kwargs)
    hf_cfg.save_pretrained(out)
    _add_legacy_keys(out / "config.json", cfg)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if src.exists():
                shutil.copy2(src, out / fname)
    return out


def _add_legacy_keys(path: Path, cfg: ModelConfig) -> None:
    """Also write the pre-transformers-5 spellings, for llama.cpp's converter, vLLM and transformers 4.

    transformers 5 writes RoPE only as `rope_parameters` and Qwen3-MoE's expert
    count only as `num_local_experts` (its attribute_map alias); older readers
    look for `rope_theta` / `rope_scaling` and `num_experts`. transformers 5
    reads the extra keys back to the same values.
    """
    d = json.loads(path.read_text())
    d["rope_theta"] = cfg.rope_theta
    d["rope_scaling"] = None if not cfg.rope_scaling else dict(cfg.rope_scaling)
    if cfg.is_moe:
        d["num_experts"] = cfg.num_experts
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- import


def config_from_hf(hf) -> ModelConfig:
    """A transformers config object (qwen2, qwen3, qwen2_moe, qwen3_moe) -> ModelConfig."""
    mt = hf.model_type
    if mt not in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        raise ValueError(f"unsupported model_type {mt!r} (qwen2, qwen3, qwen2_moe, qwen3_moe)")
    if getattr(hf, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported")
    if mt.endswith("_moe") and (getattr(hf, "mlp_only_layers", None) or getattr(hf, "decoder_sparse_step", 1) != 1):
        raise ValueError("MoE with dense layers (mlp_only_layers / decoder_sparse_step) is not supported")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if mt == "qwen2":
        bias = True
    elif mt == "qwen2_moe":
        bias = hf.qkv_bias
    else:
        bias = hf.attention_bias
    d = dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=hf.intermediate_size,
        rope_theta=float(theta),
        rms_norm_eps=hf.rms_norm_eps,
        max_seq_len=hf.max_position_embeddings,
        tie_embeddings=bool(hf.tie_word_embeddings),
        qk_norm=mt in ("qwen3", "qwen3_moe"),
        attention_bias=bool(bias),
        rope_scaling=None if rope_type == "default" else rope,
        extra={k: getattr(hf, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(hf, k, None) is not None},
    )
    if mt.endswith("_moe"):
        d.update(
            num_experts=hf.num_experts,
            experts_per_token=hf.num_experts_per_tok,
            moe_intermediate_size=hf.moe_intermediate_size,
            norm_topk_prob=bool(hf.norm_topk_prob),
            router_aux_loss_coef=hf.router_aux_loss_coef,
        )
    if mt == "qwen2_moe":
        shared = hf.shared_expert_intermediate_size
        if shared % hf.moe_intermediate_size:
            raise ValueError("shared_expert_intermediate_size must be a multiple of moe_intermediate_size")
        d["num_shared_experts"] = shared // hf.moe_intermediate_size
    return ModelConfig(**d)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                state[k] = fh.get_tensor(k)
    return state


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names (either expert layout) -> our state dict names."""
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, list]] = {}
    for name, t in hf_state.items():
        if name == "lm_head.weight":
            state[name] = t
            continue
        name = name.removeprefix("model.")
        if ".mlp.experts." in name and not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # legacy per-expert: layers.N.mlp.experts.E.{gate,up,down}_proj.weight
            head, rest = name.split(".mlp.experts.")
            e, proj = rest.split(".")[:2]
            slot = experts.setdefault(head, {}).setdefault(proj, [None] * cfg.num_experts)
            slot[int(e)] = t
        elif name.endswith("o_proj.bias"):
            if t.abs().max() > 0:
                raise ValueError(f"{name} is non-zero; o_proj biases are not supported")
        else:
            state[name] = t
    for head, projs in experts.items():
        gate, up, down = (torch.stack(projs[p]) for p in ("gate_proj", "up_proj", "down_proj"))
        state[f"{head}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        state[f"{head}.mlp.experts.down_proj"] = down
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def load_hf_dir(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, ModelConfig]:
    """Load an HF directory (ours or a stock Qwen2/Qwen3 one) -> (Transformer in `dtype`, ModelConfig)."""
    from transformers import AutoConfig

    path = Path(path)
    cfg = config_from_hf(AutoConfig.from_pretrained(path))
    model = Transformer(cfg)
    state = from_hf_state_dict(_read_safetensors(path), cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model.to(dtype), cfg


def read_config_json(path: str | Path) -> dict:
    """The raw config.json of an HF directory."""
    return json.loads((Path(path) / "config.json").read_text())
