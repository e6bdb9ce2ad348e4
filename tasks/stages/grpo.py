"""grpo: group relative policy optimisation of the chat policy against rule and/or model rewards.

Reads   the policy to start from: the dpo stage's hf/ (or any Qwen2/Qwen3 HF directory named by
        `init_from`), which is also the frozen reference; its tokenizer (chat template).
        Prompts: the files of `data:` entries (as sft: a path / glob or files in an installed
        package; formats alpaca | sharegpt | openai | chatterbot | preference): a conversation
        gives its turns before the last assistant reply as the prompt and that reply as the answer
        (for the exact_match rule); a preference pair gives its prompt and chosen reply.
        The reward stage's model when `rewards` lists the reward_model rule.
Runs    the engine child (tasks/train), objective `grpo`, data = tasks/train/rollout.py
        RolloutBatches: per rollout `prompts_per_rollout` prompts x `group_size` sampled replies,
        scored by tasks/rewards.py, advantages normalised within each group; loss = clipped
        policy gradient + beta * per-token k3 KL to the reference; `epochs` passes over each
        rollout, `global_batch` replies per optimizer step; `steps` optimizer steps in all.
Writes  hf/ (the policy, model/hf.py format, + tokenizer), checkpoint/, prompts.json (the
        tokenized prompts, train and held-out), quarantine.jsonl; manifest: counts (prompts,
        held out, dropped as too long, rollouts, steps), the held-out mean reward (each rule's
        mean, reply length) of sampled replies before and after training, the last step's
        training statistics. MLflow: loss, reward, kl, entropy, clip_frac, reply_tokens per
        logged step (log_every 1 logs every step).
Resume  engine checkpoints hold the policy, optimizer and the rollout cursor (the current
        rollout's rows included): a killed run continues inside the same rollout; see
        tasks/train/rollout.py for what is reproduced exactly.
Memory  policy + reference (+ the reward model), one rollout's rows.
Fails   when no prompt fits seq_len - max_new_tokens, when the batch sizes do not divide
        (prompts_per_rollout * group_size by global_batch), with LoRA (not supported for RL
        here), or when training fails (the end of its log).
The ppo stage (tasks/stages/ppo.py) shares this module's settings, prompt reading and evaluation.
"""
from __future__ import annotations

from pydantic import Field

from tasks.registry import Stage, StageResult
from tasks.train.rl import RlSettings, rl_run
from tasks.train.stage import export, keyed_config

STAGE_VERSION = 1


class GrpoSettings(RlSettings):
    beta: float = Field(0.04, ge=0)  # weight of the per-token KL (k3) to the reference in the loss


class GrpoConfig(GrpoSettings):
    init_digest: str | None = None
    data_digests: list[list[str]] = []


def config(profile) -> GrpoConfig:
    return keyed_config("grpo", profile.stages.grpo, GrpoConfig)


def run(cfg: GrpoConfig, inputs: dict, out) -> StageResult:
    return rl_run(cfg, inputs, out, "grpo", "dpo", {"name": "grpo", "clip_eps": cfg.clip_eps, "beta": cfg.beta},
                  lambda init_dir: {"init_from": str(init_dir)}, lambda final, tok_dir, o: export(final, tok_dir, o),
                  {"algo": "grpo"})


STAGE = Stage(
    name="grpo",
    version=STAGE_VERSION,
    upstream=("dpo", "reward"),
    settings=GrpoSettings,
    config=config,
    run=run,
    group="train",
)
