"""Checkpoints: atomic directories of weights, optimizer, trainer state and RNG states.

Layout under a checkpoints root:

    step_00000120/
        model.safetensors   full (unsharded) weights, fp32, our parameter names
                            (a tied lm_head is stored once, as embed_tokens)
        model_config.json   ModelConfig.to_dict()
        optimizer.pt        full optimizer state keyed by parameter name
                            (torch.distributed.checkpoint.state_dict format)
        trainer.pt          {"step", "tokens", "schedule", "data" cursor, "world_size", "extra"}
        rng_rank0.pt ...    python, numpy, torch CPU and CUDA generator states, one file per rank

`.pt` files hold only tensors and plain containers and are read back with
torch.load(weights_only=True): nothing pickled executes on load.

Atomic: everything is written into `step_N.tmp/`, fsynced, then renamed to
`step_N/` (one rename on one filesystem), so a directory named `step_N` is
always complete; a kill leaves at most a `.tmp` that the next save removes.
After a save only the newest `keep_last` checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model import ModelConfig, Transformer, save_hf_dir

_NAME = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    m = _NAME.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint directory (step_NNNNNNNN)")
    return int(m.group(1))


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every generator the training touches, as tensors / plain values (weights_only-safe)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(i) for i in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------- save / load


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def weights_for_file(model_state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; a tied lm_head.weight is left out (safetensors stores no aliases)."""
    out = {}
    for name, t in model_state.items():
        if tied and name == "lm_head.weight":
            continue
        out[name] = t.detach().to("cpu").contiguous()
    return out


def tmp_dir(root: Path, step: int) -> Path:
    return step_dir(root, step).with_name(step_dir(root, step).name + ".tmp")


def begin_save(root: Path, step: int) -> Path:
    """Create a fresh `step_N.tmp/` (removing leftovers of killed saves) and return it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tmp_dir(root, step)
    tmp.mkdir()
    return tmp


def write_main(
    tmp: Path,
    model_state: dict[str, torch.Tensor],
    model_config: dict,
    optimizer_state: dict,
    trainer_state: dict,
) -> None:
    """Rank 0's part of a save: weights, config, optimizer, trainer state."""
    tied = bool(model_config.get("tie_embeddings", False))
    save_file(weights_for_file(model_state, tied), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "model_config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer.pt")


def write_rng(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")


def finish_save(root: Path, step: int, keep_last: int) -> Path:
    """fsync the tmp dir's files, rename it into place, drop old checkpoints. Rank 0 only."""
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():  # a save of the same step (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(Path(root))
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(root, step, model_state, model_config, optimizer_state, trainer_state, keep_last=2) -> Path:
    """The single-process save in one call (tests, tools)."""
    tmp = begin_save(root, step)
    write_main(tmp, model_state, model_config, optimizer_state, trainer_state)
    write_rng(tmp, 0)
    return finish_save(root, step, keep_last)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors of a checkpoint, with lm_head.weight restored for tied models."""
    path = Path(path)
    state = load_file(str(path / "model.safetensors"))
    cfg = json.loads((path / "model_config.json").read_text())
    if cfg.get("tie_embeddings") and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def load_model_config(path: Path) -> dict:
    return json.loads((Path(path) / "model_config.json").read_text())


def load_optimizer(path: Path) -> dict:
    return torch.load(Path(path) / "optimizer.pt", map_location="cpu", weights_only=True)


def load_trainer(path: Path) -> dict:
    return torch.load(Path(path) / "trainer.pt", map_location="cpu", weights_only=True)


def load_rng(path: Path, rank: int) -> dict | None:
    """This rank's RNG states, else rank 0's (a resume on a different world size), else None."""
    for name in (f"rng_rank{rank}.pt", "rng_rank0.pt"):
        f = Path(path) / name
        if f.exists():
            return torch.load(f, map_location="cpu", weights_only=True)
    return None


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with parameter names instead of indices, tensors on the CPU.

    The same layout as torch.distributed.checkpoint.state_dict.get_optimizer_state_dict
    with full_state_dict=True (what FSDP runs save), without importing it (it pulls
    in the compiler stack: seconds at every start). For unsharded models only.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    raw = optimizer.state_dict()
    index_to_name = {}
    groups = []
    for group, raw_group in zip(optimizer.param_groups, raw["param_groups"]):
        fqns = [names[id(p)] for p in group["params"]]
        index_to_name.update(zip(raw_group["params"], fqns))
        groups.append({**{k: v for k, v in raw_group.items() if k != "params"}, "params": fqns})
    state = {
        index_to_name[i]: {k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v) for k, v in st.items()}
        for i, st in raw["state"].items()
    }
    return {"state": state, "param_groups": groups}


def load_optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """The inverse of optimizer_state_by_name (also reads what FSDP runs saved)."""
    names = {id(p): n for n, p in model.named_parameters()}
    index, groups, name_to_index = 0, [], {}
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        fqns = [names[id(p)] for p in group["params"]]
        if fqns != list(saved_group["params"]):
            raise ValueError("the checkpoint's optimizer groups do not match the model's parameters")
        ids = list(range(index, index + len(fqns)))
        name_to_index.update(zip(fqns, ids))
        groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": ids})
        index += len(fqns)
    state = {name_to_index[n]: st for n, st in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def export_hf(checkpoint: Path, tokenizer_dir: Path | None, out_dir: Path, dtype: torch.dtype | None = None) -> Path:
    """A checkpoint -> a Hugging Face directory (model/hf.save_hf_dir) with the tokenizer files."""
    cfg = ModelConfig.from_dict(load_model_config(checkpoint))
    model = Transformer(cfg)
    model.load_state_dict(load_weights(checkpoint), strict=True)
    return save_hf_dir(model, tokenizer_dir, out_dir, dtype=dtype)
