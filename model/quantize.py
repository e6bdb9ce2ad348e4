"""Int8 weight-only quantization for CPU inference: per-output-channel, symmetric.

    from model.quantize import save_int8_dir, load_int8_dir
    stats = save_int8_dir("out/hf", "out/int8")     # an HF directory (model.save_hf_dir) -> an int8 directory
    model, cfg = load_int8_dir("out/int8")          # a Transformer whose projections hold int8 weights

Scheme. Each quantized weight W (out, in) gets one scale per output row,
s = max|W_row| / 127, and q = round(W / s) clipped to [-127, 127] (int8). The
error of any weight is at most s / 2. Quantized: every 2-D `*.weight` of the
decoder (q/k/v/o projections, the SwiGLU gate/up/down, MoE experts, the token
embedding and an untied lm_head). Kept in their float dtype: norms, biases and
MoE routers (`mlp.gate`, `shared_expert_gate`: small, and a flipped top-k choice
costs more than the bytes saved).

The int8 directory:
    config.json + tokenizer files     copied from the HF directory
    model.int8.safetensors            HF tensor names; a quantized `<name>` is int8 (out, in) and has
                                      `<name>_scale` fp32 (out,) beside it; other tensors as they were.
                                      (Not `model.safetensors`, so a stock loader does not silently read
                                      int8 values as weights: AutoModelForCausalLM refuses the directory.)
    quantization.json                 {"method": "int8-weight-only", "granularity": "per-output-channel", ...}

Inference. `load_int8_dir` builds the Transformer, then swaps every quantized
nn.Linear for `Int8Linear` (int8 weight + scale held as buffers) and the token
embedding for `Int8Embedding`; with tied embeddings the lm_head shares the
embedding's int8 table. Int8Linear computes y = (x @ q^T) * s, exact for a
per-row scale, with one of two kernels: "dequant" (default: q cast to x's dtype
for the matmul, any device, exactly the quantized weights) or "int8mm" (torch's
CPU int8 weight kernel `aten._weight_int8pack_mm` on bf16 activations: measured
here faster than an fp32 Linear, where its fp32-activation variant is ~50x
slower; it needs in_features % 32 == 0 and falls back to "dequant" otherwise).
MoE expert weights are stored as int8 but dequantized at load (the expert
kernels are batched 3-D matmuls): an MoE model saves disk, not memory, in its
experts.

Memory: saving holds the float state dict and its int8 copy; loading holds one
float copy of the model while the int8 modules are swapped in, then int8
weights (1 byte each + 4 bytes per row) and the float norms/routers.
Fails: FileNotFoundError naming the directory when config.json or the weights
file is missing; ValueError when a scale is missing for an int8 tensor.
transformers is imported inside load_int8_dir only, as in model/hf.py (its start-up time; the
generation engine imports this module).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .hf import TOKENIZER_FILES, _read_safetensors, config_from_hf, from_hf_state_dict
from .transformer import Transformer

WEIGHTS = "model.int8.safetensors"
META = "quantization.json"
SCALE_SUFFIX = "_scale"
_ROUTERS = (".mlp.gate.weight", ".shared_expert_gate.weight")
KERNELS = ("dequant", "int8mm")


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    """Which HF tensors the scheme quantizes (see the module docstring)."""
    return tensor.dim() == 2 and name.endswith(".weight") and not name.endswith(_ROUTERS)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (q int8 (out, in), scale fp32 (out,)), symmetric per row. A zero row gets scale 1."""
    w = w.float()
    amax = w.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def quantize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict -> the int8 file's tensors (quantized `<name>` + `<name>_scale`, the rest unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if is_quantized(name, t):
            q, s = quantize_rows(t)
            out[name], out[name + SCALE_SUFFIX] = q.contiguous(), s.contiguous()
        else:
            out[name] = t.contiguous()
    return out


def dequantize_state_dict(qstate: dict[str, torch.Tensor],
                          dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The int8 file's tensors -> a float HF state dict (what the int8 model computes with)."""
    out = {}
    for name, t in qstate.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype == torch.int8:
            if name + SCALE_SUFFIX not in qstate:
                raise ValueError(f"int8 tensor {name} has no {name + SCALE_SUFFIX}: the file is not from save_int8_dir")
            out[name] = dequantize_rows(t, qstate[name + SCALE_SUFFIX], dtype)
        else:
            out[name] = t.to(dtype)
    return out


def save_int8_dir(hf_dir: str | Path, out_dir: str | Path) -> dict:
    """Quantize an HF directory into `out_dir` (layout in the module docstring).

    Returns {"quantized_tensors", "float_tensors", "float_bytes", "int8_bytes", "max_abs_error"}:
    float_bytes is the source weights' size on disk, int8_bytes the new file's size.
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json: pass a directory written by model.save_hf_dir")
    state = _read_safetensors(hf_dir)
    qstate = quantize_state_dict(state)
    out.mkdir(parents=True, exist_ok=True)
    save_file(qstate, str(out / WEIGHTS), metadata={"format": "pt", "quantization": "int8-weight-only"})
    shutil.copy2(hf_dir / "config.json", out / "config.json")
    for fname in TOKENIZER_FILES:
        if (hf_dir / fname).exists():
            shutil.copy2(hf_dir / fname, out / fname)
    names = [n for n, t in state.items() if is_quantized(n, t)]
    max_err = 0.0
    for n in names:
        err = (dequantize_rows(qstate[n], qstate[n + SCALE_SUFFIX]) - state[n].float()).abs().max()
        max_err = max(max_err, float(err))
    meta = {"method": "int8-weight-only", "granularity": "per-output-channel", "symmetric": True,
            "bits": 8, "weights": WEIGHTS, "scale_suffix": SCALE_SUFFIX, "quantized": names}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return {"quantized_tensors": len(names), "float_tensors": len(state) - len(names),
            "float_bytes": sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")),
            "int8_bytes": (out / WEIGHTS).stat().st_size, "max_abs_error": max_err}


# --------------------------------------------------------------------------- inference modules


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when its data starts on a 64-byte boundary, else a fresh copy (torch's CPU allocator
    aligns to 64 bytes)."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


class Int8Linear(nn.Module):
    """y = x @ (q * s)^T + b with q int8 (out, in) and s (out,): the weight is never stored in float.

    kernel "dequant": q is cast to x's dtype for the one matmul (exact weight-only int8, any device).
    kernel "int8mm": torch's CPU int8 weight kernel (aten._weight_int8pack_mm) on bf16 activations,
    fast on CPUs (faster than an fp32 Linear here); activations are rounded to bf16 for the matmul.
    The kernel is private to torch and crashes the process (SIGSEGV, measured with torch 2.13) on
    in_features not a multiple of 32 and on operands not aligned to 16 bytes (a tensor read from
    safetensors can start anywhere): such layers use "dequant", and every operand is passed in
    freshly allocated (64-byte aligned) memory.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 kernel: str = "dequant"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel {kernel!r}: choose one of {KERNELS}")
        self.out_features, self.in_features = qweight.shape
        self.kernel = kernel
        self.int8mm = kernel == "int8mm" and self.in_features % 32 == 0
        self.register_buffer("qweight", _aligned(qweight.contiguous()))
        self.register_buffer("scale", scale.float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # the kernel's bf16 scales, made at the first call rather than at every one (not a buffer:
        # Module.to(float32) would convert it); remade when `scale` is another tensor (moved, re-tied)
        self._scale_bf16: torch.Tensor | None = None
        self._scale_src: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8mm and x.device.type == "cpu" and self.qweight.data_ptr() % 64 == 0:
            if self._scale_src is not self.scale:
                self._scale_bf16, self._scale_src = _aligned(self.scale.to(torch.bfloat16).contiguous()), self.scale
            flat = _aligned(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous())
            y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self._scale_bf16)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int8Embedding(nn.Module):
    """Rows of an int8 table times their scale; the same buffers serve a tied Int8Linear lm_head."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("qweight", _aligned(qweight.contiguous()))  # aligned: a tied lm_head's int8mm reads it
        self.register_buffer("scale", scale.float().contiguous())
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.qweight[ids].to(self.dtype) * self.scale[ids].to(self.dtype)[..., None])


def _read_int8(path: Path) -> dict[str, torch.Tensor]:
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} has no {WEIGHTS}: write it with model.quantize.save_int8_dir")
    with safe_open(str(path / WEIGHTS), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def load_int8_dir(path: str | Path, dtype: torch.dtype = torch.float32,
                  kernel: str = "dequant") -> tuple[Transformer, "object"]:
    """An int8 directory -> (Transformer with Int8Linear / Int8Embedding modules, ModelConfig), in eval mode.

    dtype: the activations' (and the float parameters') dtype. kernel: Int8Linear's ("dequant" or "int8mm").
    """
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: pass a directory written by save_int8_dir")
    cfg = config_from_hf(AutoConfig.from_pretrained(path))
    qstate = _read_int8(path)
    model = Transformer(cfg)
    state = from_hf_state_dict(dequantize_state_dict(qstate, dtype), cfg)
    model.load_state_dict(state, strict=True)
    model.to(dtype)
    for name, q in qstate.items():
        if q.dtype != torch.int8:
            continue
        scale = qstate[name + SCALE_SUFFIX]
        module_path = name.removeprefix("model.").removesuffix(".weight")
        if ".mlp.experts." in module_path:
            continue  # dequantized at load (module docstring)
        if module_path == "embed_tokens":
            model.embed_tokens = Int8Embedding(q, scale, dtype)
            if cfg.tie_embeddings:
                model.lm_head = Int8Linear(model.embed_tokens.qweight, model.embed_tokens.scale, kernel=kernel)
                model.lm_head.qweight = model.embed_tokens.qweight  # one table, not two
                model.lm_head.scale = model.embed_tokens.scale
            continue
        parent_path, _, attr = module_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, attr)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{name}: {module_path} is a {type(old).__name__}, not a Linear layer")
        setattr(parent, attr, Int8Linear(q, scale, old.bias, kernel=kernel))
    return model.eval(), cfg
