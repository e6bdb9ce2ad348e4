"""ppo: proximal policy optimisation of the chat policy against the reward model (and/or rules).

Reads   as grpo (tasks/stages/grpo.py): the dpo stage's hf/ (or `init_from`) as the starting policy and
        the frozen reference; prompts from `data:`; the reward stage's model for the
        `reward_model` rule (the default reward).
Model   the policy with a value head on its own backbone (model/reward.py RewardModel: the same
        scalar head class as the reward model, started at zero, so every value is 0 at first):
        one network, one optimizer; the value loss reaches the backbone through `vf_coef`.
Runs    the engine child, objective `ppo`, data = tasks/train/rollout.py RolloutBatches (algo
        ppo): per rollout `prompts_per_rollout` prompts x `group_size` replies; per-token rewards
        -kl_coef * (log pi_old - log ref) plus the reply's score on its last token; GAE (`gamma`,
        `lam`) over the value head's values, advantages whitened over the rollout; loss = clipped
        policy gradient + vf_coef * clipped value loss (`clip_eps`, `value_clip`); `epochs`
        passes over each rollout, `global_batch` replies per optimizer step.
Writes  hf/ (the policy, model/hf.py format, + tokenizer), value_head.safetensors (the critic's
        head on hf/'s backbone), checkpoint/, prompts.json, quarantine.jsonl; manifest and MLflow
        as grpo (+ value_loss per step).
Resume  as grpo: the rollout cursor (current rollout included) is in every checkpoint.
Memory  policy (+ head) + reference + reward model, one rollout's rows.
Fails   as grpo; also when the reward_model rule is listed and no reward artifact is given.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import Field

from tasks.registry import Stage, StageResult
from tasks.rewards import RewardRule
from tasks.train.rl import RlSettings, rl_run

STAGE_VERSION = 1
VALUE_HEAD = "value_head.safetensors"


class PpoSettings(RlSettings):
    rewards: list[RewardRule] = [RewardRule(rule="reward_model")]
    prompts_per_rollout: int = Field(16, ge=1)
    group_size: int = Field(1, ge=1)
    epochs: int = Field(2, ge=1)
    global_batch: int = Field(8, ge=1)
    kl_coef: float = Field(0.05, ge=0)  # per-token KL penalty (log pi_old - log ref) in the reward
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    vf_coef: float = Field(0.1, ge=0)
    value_clip: float = Field(0.2, gt=0)
    whiten: bool = True  # normalise the advantages over each rollout's tokens


class PpoConfig(PpoSettings):
    init_digest: str | None = None
    data_digests: list[list[str]] = []


def config(profile) -> PpoConfig:
    from tasks.train.stage import keyed_config

    return keyed_config("ppo", profile.stages.ppo, PpoConfig)


def export_policy(final: Path, tok_dir: Path, out) -> None:
    """The final checkpoint (policy + value head) -> out/hf (the policy alone, an HF causal LM),
    out/value_head.safetensors and out/checkpoint."""
    from safetensors.torch import save_file

    from model import ModelConfig, save_hf_dir
    from model.reward import RewardModel
    from tasks.train.checkpoint import load_model_config, load_weights

    for name in ("checkpoint", "hf"):
        if (out.path / name).exists():
            shutil.rmtree(out.path / name)
    shutil.copytree(final, out.path / "checkpoint")
    model = RewardModel(ModelConfig.from_dict(load_model_config(final)))
    model.load_state_dict(load_weights(final), strict=True)
    save_hf_dir(model.backbone(), tok_dir, out.path / "hf")
    save_file(model.head_state(), str(out.path / VALUE_HEAD), metadata={"format": "pt"})


def run(cfg: PpoConfig, inputs: dict, out) -> StageResult:
    objective = {"name": "ppo", "clip_eps": cfg.clip_eps, "vf_coef": cfg.vf_coef, "value_clip": cfg.value_clip}
    rollout = {"algo": "ppo", "kl_coef": cfg.kl_coef, "gamma": cfg.gamma, "lam": cfg.lam, "whiten": cfg.whiten}
    result = rl_run(cfg, inputs, out, "ppo", "dpo", objective,
                    lambda init_dir: {"builder": "reward_head", "init_from": str(init_dir)},
                    export_policy, rollout)
    result.extra["value_head"] = VALUE_HEAD
    return result


STAGE = Stage(
    name="ppo",
    version=STAGE_VERSION,
    upstream=("dpo", "reward"),
    settings=PpoSettings,
    config=config,
    run=run,
    group="train",
)
