"""A causal LM with a scalar head: the reward model (tasks/reward.py) and PPO's policy + value head.

    model = RewardModel.from_backbone(load_hf_dir(sft_dir)[0])       # fresh (zero) head
    save_reward_model(model, tokenizer_dir, out)                      # out/model/ (HF dir) + out/head.safetensors
    model = load_reward_model(out)                                    # what other stages use
    r = model.scores(input_ids)                                       # (B, T) fp32, one scalar per position

The HF directory stays a stock causal LM (transformers loads it; the head is a separate safetensors
file beside it, so no loader mistakes it for LM weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .hf import load_hf_dir, save_hf_dir
from .transformer import Transformer

HEAD_FILE = "head.safetensors"
BACKBONE_DIR = "model"


class RewardModelError(ValueError):
    pass


class RewardModel(Transformer):
    """A Transformer with a scalar head `score` (Linear hidden -> 1, bias) on its final hidden states.

    scores(input_ids) -> (B, T) fp32: the head at every position (reward at the reply's last token;
    PPO's value of each state). logits_and_values(input_ids) -> (logits, values) from one forward.
    `forward` stays the LM's logits, so generation (model/generate.py) runs on it unchanged.
    The head starts at zero unless `head_std` > 0 (then N(0, head_std), from the global torch seed).
    """

    def __init__(self, cfg, head_std: float = 0.0):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=True)
        with torch.no_grad():
            nn.init.zeros_(self.score.bias)
            if head_std > 0:
                nn.init.normal_(self.score.weight, 0.0, head_std)
            else:
                nn.init.zeros_(self.score.weight)

    def scores(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.score(self.hidden_states(input_ids)).squeeze(-1).float()

    def logits_and_values(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden_states(input_ids)
        return self.lm_head(h), self.score(h).squeeze(-1).float()

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.score.state_dict().items()}

    def backbone(self) -> Transformer:
        """A plain Transformer holding copies of this model's backbone weights (for export)."""
        plain = Transformer(self.config)
        plain.load_state_dict({k: v for k, v in self.state_dict().items() if not k.startswith("score.")}, strict=True)
        return plain

    @classmethod
    def from_backbone(cls, backbone: Transformer, head: dict[str, torch.Tensor] | None = None,
                      head_std: float = 0.0) -> "RewardModel":
        model = cls(backbone.config, head_std)
        state = dict(backbone.state_dict())
        if head is not None:
            state.update({f"score.{k}": v for k, v in head.items()})
        else:
            state.update({f"score.{k}": v for k, v in model.score.state_dict().items()})
        model.load_state_dict(state, strict=True)
        return model


def engine_model(spec: dict) -> RewardModel:
    """The engine's model builder (run.json "model": {"builder": "reward_head" (tasks/train/builders.py),
    "init_from": HF dir, "head": head.safetensors path | None, "head_std": float}): the backbone of
    `init_from` with the given head, or a fresh one (zero, or N(0, head_std) from the engine's seed)."""
    backbone = load_hf_dir(spec["init_from"])[0]
    head = load_file(spec["head"]) if spec.get("head") else None
    return RewardModel.from_backbone(backbone, head, float(spec.get("head_std", 0.0)))


def save_reward_model(model: RewardModel, tokenizer_dir: Path | None, out_dir: Path) -> Path:
    """model -> out_dir/model (HF directory + tokenizer files), out_dir/head.safetensors, reward.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_hf_dir(model.backbone(), tokenizer_dir, out_dir / BACKBONE_DIR)
    save_file(model.head_state(), str(out_dir / HEAD_FILE), metadata={"format": "pt"})
    (out_dir / "reward.json").write_text(json.dumps({
        "backbone": BACKBONE_DIR, "head": HEAD_FILE, "hidden_size": model.config.hidden_size,
        "read_at": "the last reply token of prompt + reply (its end-of-turn token), chat template applied"}, indent=2))
    return out_dir


def load_reward_model(path: str | Path) -> RewardModel:
    """A directory written by save_reward_model (a reward artifact) -> RewardModel in eval mode."""
    path = Path(path)
    if not (path / HEAD_FILE).is_file() or not (path / BACKBONE_DIR / "config.json").is_file():
        raise RewardModelError(f"{path} is not a reward model directory (expected {BACKBONE_DIR}/config.json and "
                          f"{HEAD_FILE}); point at the reward stage's artifact")
    head = load_file(str(path / HEAD_FILE))
    backbone = load_hf_dir(path / BACKBONE_DIR)[0]
    width = tuple(head["weight"].shape) if "weight" in head else None
    if width != (1, backbone.config.hidden_size) or "bias" not in head:
        raise RewardModelError(f"{path / HEAD_FILE}: expected weight (1, {backbone.config.hidden_size}) and bias, "
                               f"got {width}; the head does not belong to this backbone")
    model = RewardModel.from_backbone(backbone, head)
    return model.eval()
