"""reward: a reward model (the SFT model's backbone + a scalar head) trained on preference pairs.

Reads   the sft stage's hf/ model (or any Qwen2/Qwen3 HF directory named by `init_from`) and its
        tokenizer; preference pairs from `data:` exactly as the dpo stage reads them (tasks/train/preference.py
        read_pairs, tasks/train/pairs.py encode_pairs: `preference` files, or chatterbot Q/A made into pairs).
Model   RewardModel (model/reward.py) = model.Transformer + `score`, a Linear(hidden -> 1) on the final-norm hidden
        states (Transformer.hidden_states), read at the last reply token of prompt + reply (its
        end-of-turn token: objectives.reply_end). The LM head stays (unused by the reward) so the
        backbone remains a loadable causal LM; PPO reuses the class as policy + value head.
Loss    Bradley-Terry: -log sigmoid(r_chosen - r_rejected), the engine's objective `reward_bt`.
Writes  model/             the backbone as an HF directory (model/hf.py format) + tokenizer files
        head.safetensors   the head: score.weight (1, hidden), score.bias (1,)
        reward.json        what the two are and where the score is read
        checkpoint/        the final engine checkpoint (backbone + head, one file)
        quarantine.jsonl   records that could not become pairs
        manifest           counts (pairs, truncations), dropped by reason, held-out accuracy (share
                           of pairs scored chosen > rejected) and mean margin before (the initial
                           head) and after training; the same in MLflow.
Load    model.reward.load_reward_model(dir) -> RewardModel (eval mode, fp32) from a directory holding model/ and
        head.safetensors (this stage's artifact); tasks/train/rl.py reward_dir(manifest, out) gives that
        directory to a downstream stage (fetching the files from a remote store).
Resume  engine checkpoints in the stage's working dir; exact continuation, as sft/dpo.
Fails   when no pair is read or fits seq_len, with LoRA settings (not supported for a reward model),
        or when training fails (the end of its log).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from pydantic import Field

from storage.errors import SlmError
from tasks.registry import Stage, StageResult
from tasks.train.settings import PreferenceData, TrainSettings

STAGE_VERSION = 1
HEAD_FILE, BACKBONE_DIR = "head.safetensors", "model"  # model/reward.py's layout


class RewardError(SlmError):
    pass


def export_checkpoint(checkpoint: Path, tokenizer_dir: Path | None, out_dir: Path) -> Path:
    """An engine checkpoint of a RewardModel -> save_reward_model's layout."""
    from model import ModelConfig
    from model.reward import RewardModel, save_reward_model
    from tasks.train.checkpoint import load_model_config, load_weights

    model = RewardModel(ModelConfig.from_dict(load_model_config(checkpoint)))
    model.load_state_dict(load_weights(checkpoint), strict=True)
    return save_reward_model(model, tokenizer_dir, out_dir)


# --------------------------------------------------------------------------- metrics


def pair_scores(model, arrays: dict[str, np.ndarray], batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Rewards (chosen, rejected), float32 (n,), of encode_pairs rows, by a model.reward.RewardModel (moved
    to the GPU when there is one, scored under bf16 autocast there as in training)."""
    import torch

    from model.generate import inference_autocast, resolve_device
    from tasks.train.objectives import RewardBT

    device = resolve_device(None)
    model.to(device).eval()
    obj, out = RewardBT(), {"chosen": [], "rejected": []}
    for side in out:
        ids, tgt = arrays[f"{side}_ids"], arrays[f"{side}_targets"]
        for s in range(0, len(ids), batch):
            with torch.no_grad(), inference_autocast(device):
                out[side].append(obj.rewards(model, torch.from_numpy(ids[s:s + batch]).long().to(device),
                                             torch.from_numpy(tgt[s:s + batch]).to(device)).float().cpu().numpy())
    cat = lambda xs: np.concatenate(xs).astype(np.float32) if xs else np.zeros(0, np.float32)  # noqa: E731
    return cat(out["chosen"]), cat(out["rejected"])


def pair_metrics(model, arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """accuracy: share of pairs with r_chosen > r_rejected (a tie counts half: chance); margin: mean
    r_chosen - r_rejected. {} without pairs."""
    c, r = pair_scores(model, arrays)
    if len(c) == 0:
        return {}
    return {"accuracy": float((c > r).mean() + 0.5 * (c == r).mean()), "margin": float((c - r).mean())}



# --------------------------------------------------------------------------- the stage


class RewardSettings(TrainSettings):
    data: list[PreferenceData] = []  # the same entries as dpo's (a profile usually repeats them)
    lr: float = Field(1e-4, gt=0)
    head_std: float = Field(0.0, ge=0)  # initial head: 0 -> zeros (every reward 0 at the start)


class RewardConfig(RewardSettings):
    init_digest: str | None = None
    data_digests: list[list[str]] = []


def config(profile) -> RewardConfig:
    from tasks.train.stage import keyed_config

    return keyed_config("reward", profile.stages.reward, RewardConfig)


def run(cfg: RewardConfig, inputs: dict, out) -> StageResult:
    import torch

    from model.reward import engine_model, load_reward_model
    from tasks.train.pairs import encode_pairs
    from tasks.train.preference import preference_dropped, preference_inputs
    from tasks.train.stage import engine_spec, held_out, model_section, run_training

    if cfg.lora:
        raise RewardError("stages.reward.lora: LoRA is not supported for the reward model; remove it")
    pairs, bad, init_dir, tok_dir, tok = preference_inputs(cfg, inputs, out, "reward", RewardError,
                                                           " (the dpo stage's entries work as they are)")

    work = out.scratch / "engine"
    work.mkdir(parents=True, exist_ok=True)
    held = held_out(len(pairs), cfg.val_fraction, cfg.seed)
    counts: dict[str, int] = {}
    arrays = {}
    for split, chosen in (("train", ~held), ("val", held)):
        arrays[split], c = encode_pairs([p for p, h in zip(pairs, chosen) if h], tok, cfg.seq_len)
        counts.update({f"{split}_{k}": v for k, v in c.items()})
        np.savez(work / f"{split}.npz", **arrays[split])
    if counts["train_pairs"] == 0:
        raise RewardError(f"no training pair fits seq_len {cfg.seq_len}")
    has_val = counts["val_pairs"] > 0

    data = {"builder": "pairs", "train": str(work / "train.npz"),
            "validation": str(work / "val.npz") if has_val else None, "seed": cfg.seed}
    spec = engine_spec(cfg, work, model_section(cfg, init_dir), data, {"name": "reward_bt"}, {"stage": "reward", "key": out.key})
    spec["model"] = {"builder": "reward_head", "init_from": str(init_dir), "head_std": cfg.head_std}
    torch.manual_seed(cfg.seed)  # the engine seeds the same way before building the model
    before = pair_metrics(engine_model(spec["model"]), arrays["val"]) if has_val else {}
    final, records, resumed = run_training(spec, cfg, work, out, error=RewardError, extra_metrics=("accuracy", "margin"))
    for name in (BACKBONE_DIR, "checkpoint"):
        if (out.path / name).exists():
            shutil.rmtree(out.path / name)
    shutil.copytree(final, out.path / "checkpoint")
    export_checkpoint(final, tok_dir, out.path)
    after = pair_metrics(load_reward_model(out.path), arrays["val"]) if has_val else {}
    out.log_metrics({f"heldout_{k}": v for k, v in after.items()}, step=cfg.steps)

    dropped = preference_dropped(bad, counts)
    fmt = lambda m: f"accuracy {m['accuracy']:.2f}, margin {m['margin']:.3f}" if m else "no held-out pairs"  # noqa: E731
    return StageResult(
        counts={"pairs": len(pairs), **counts, "quarantined": len(bad), "steps": cfg.steps},
        dropped=dropped,
        summary=(f"{counts['train_pairs']} train / {counts['val_pairs']} held-out pairs, {cfg.steps} steps; "
                 f"held-out {fmt(before)} -> {fmt(after)}"),
        extra={"reward_dir": ".", "backbone": BACKBONE_DIR, "head": HEAD_FILE, "checkpoint": "checkpoint",
               "init_from": cfg.init_from or "sft", "heldout_before": before, "heldout_after": after,
               "heldout_accuracy": after.get("accuracy"), "heldout_margin": after.get("margin"),
               "resumed_from": resumed},
    )


STAGE = Stage(
    name="reward",
    version=STAGE_VERSION,
    upstream=("sft",),
    settings=RewardSettings,
    config=config,
    run=run,
    group="train",
)
