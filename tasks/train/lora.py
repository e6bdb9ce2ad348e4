"""LoRA adapters (peft) on our Transformer's Linear modules, trained by the same engine, merged back.

    model = apply_lora(model, rank=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    ... train (only the adapters have requires_grad; the engine optimizes only those) ...
    model = merge_lora(model)          # a plain Transformer again: save_hf_dir / export as usual

`target_modules` are module names as peft matches them: the last part of a Linear's name
(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or a regex over full names.
peft injects in place, so the model keeps its class and `.config`; the checkpoints hold the
frozen base weights (`...q_proj.base_layer.weight`) and the adapters (`...lora_A.default.weight`),
so a resume restores both exactly. Fails (ValueError from peft) when no module matches.
peft is imported inside the functions that use it: the engine imports this module, and only LoRA
runs need peft (several seconds of start-up: it imports transformers).
"""
from __future__ import annotations

from pathlib import Path

import torch

from model import ModelConfig, Transformer, save_hf_dir
from tasks.train.checkpoint import load_model_config, load_weights

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def apply_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               target_modules=DEFAULT_TARGETS) -> torch.nn.Module:
    """Inject LoRA adapters into `model` in place (B = 0 at start, so the function is unchanged)
    and freeze everything else. Returns the same model."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base Linear (W + B A * alpha / r) and put the plain Linear back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad = True
    return model


def export_lora_hf(checkpoint: Path, lora: dict, tokenizer_dir: Path | None, out_dir: Path) -> Path:
    """An engine checkpoint of a LoRA run -> a merged Hugging Face directory (model/hf.py format)."""
    model = apply_lora(Transformer(ModelConfig.from_dict(load_model_config(checkpoint))), **lora)
    model.load_state_dict(load_weights(checkpoint), strict=True)
    return save_hf_dir(merge_lora(model).eval(), tokenizer_dir, out_dir)
