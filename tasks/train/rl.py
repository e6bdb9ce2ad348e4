"""What the RL stages (grpo, ppo) share: their settings, their prompts, and the stage body
`rl_run` (prompts -> held-out split -> the engine job with the "rollouts" data builder ->
held-out rewards before and after -> the manifest's counts). A stage adds its objective, its
model section and its export.
torch, the models and the rollout code are imported inside the functions that run a stage: the CLI
imports every stage module to build the DAG and must not pay torch's start-up time for that.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from profiles.schema import Strict
from storage.errors import SlmError
from tasks.chat_data import add_system, encode_prompt, load_conversations, load_pairs, reason_counts, write_quarantine
from tasks.registry import StageResult
from tasks.rewards import RewardRule
from tasks.train.settings import TrainSettings
from tasks.train.stage import (data_files, engine_spec, held_out, load_tokenizer, model_dir, model_section,
                               run_training, tokenizer_dir)

RL_METRICS = ("reward", "kl", "entropy", "clip_frac", "reply_tokens", "value_loss")


class RlError(SlmError):
    pass


class PromptData(Strict):
    path: str
    package: str | None = None
    format: Literal["alpaca", "sharegpt", "openai", "chatterbot", "preference"]


class RlSettings(TrainSettings):
    """What the RL stages share. One optimizer step = `global_batch` replies; a rollout =
    prompts_per_rollout * group_size replies, used for `epochs` passes."""

    data: list[PromptData] = []
    system_prompt: str | None = None
    rewards: list[RewardRule] = [RewardRule(rule="length")]
    prompts_per_rollout: int = Field(4, ge=1)
    group_size: int = Field(4, ge=1)  # replies sampled per prompt (GRPO's group)
    epochs: int = Field(1, ge=1)  # optimizer passes over each rollout
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)  # 1.0: samples from the policy itself (the log-probs used)
    clip_eps: float = Field(0.2, gt=0)
    eval_prompts: int = Field(32, ge=0)  # held-out prompts scored before and after (0: none)
    eval_samples: int = Field(2, ge=1)  # sampled replies per held-out prompt
    steps: int = Field(50, ge=1)
    lr: float = Field(1e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["wsd", "cosine", "constant"] = "constant"
    global_batch: int = Field(16, ge=1)
    micro_batch: int = Field(8, ge=1, exclude=True)
    log_every: int = Field(1, ge=1, exclude=True)

    @model_validator(mode="after")
    def _rollout_sizes(self):
        rows = self.prompts_per_rollout * self.group_size
        if rows % self.global_batch:
            raise ValueError(f"prompts_per_rollout x group_size = {rows} replies per rollout must be a multiple "
                             f"of global_batch {self.global_batch}")
        if self.max_new_tokens >= self.seq_len:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt in seq_len {self.seq_len}")
        return self


def reward_dir(manifest, out) -> Path:
    """The local directory of a reward stage's artifact (its model/ and head files fetched through `out`)."""
    from model.reward import BACKBONE_DIR, HEAD_FILE

    wanted = [f.path for f in manifest.files if f.path == HEAD_FILE or f.path.startswith(BACKBONE_DIR + "/")]
    if HEAD_FILE not in wanted:
        raise RlError(f"reward/{manifest.key[:16]} holds no {HEAD_FILE}; rerun the reward stage")
    for rel in wanted:
        out.local_input(manifest, rel)
    return Path(out.local_input(manifest, HEAD_FILE)).parent


# --------------------------------------------------------------------------- prompts


def read_prompts(cfg: RlSettings, stage: str) -> tuple[list[dict], list[dict]]:
    """cfg.data -> ([{"messages", "answer"}], quarantine): a conversation's turns before its last
    reply (+ system_prompt) and that reply; a preference pair's prompt and chosen reply."""

    prompts, bad = [], []
    for n, entry in enumerate(cfg.data):
        files = [str(p) for p in data_files(entry, f"stages.{stage}.data[{n}]")]
        if entry.format == "preference":
            pairs, b = load_pairs(files)
            prompts += [{"messages": p.prompt, "answer": p.chosen} for p in pairs]
        else:
            convs, b = load_conversations([(f, entry.format) for f in files])
            prompts += [{"messages": c[:-1], "answer": c[-1]["content"]} for c in convs]
        bad += b
    for p in prompts:
        p["messages"] = add_system(p["messages"], cfg.system_prompt)
    return prompts, bad


def tokenize_prompts(prompts: list[dict], tok, cfg: RlSettings) -> tuple[list[dict], int]:
    """Add "ids" (the chat template's prompt with the assistant header); drop prompts for which
    prompt + max_new_tokens does not fit seq_len + 1 (returns how many)."""
    kept, dropped = [], 0
    for p in prompts:
        ids = encode_prompt(tok, p["messages"]).tolist()
        if len(ids) + cfg.max_new_tokens - 1 > cfg.seq_len:
            dropped += 1
            continue
        kept.append({**p, "ids": ids})
    return kept, dropped


# --------------------------------------------------------------------------- the stage body


def rl_run(cfg: RlSettings, inputs: dict, out, stage: str, upstream_policy: str, objective: dict, model_spec,
           export_fn, rollout_extra: dict) -> StageResult:
    """Everything the RL stages share: prompts, held-out split, the engine job, before/after
    evaluation, the manifest. model_spec(init_dir) -> the run.json "model" section; export_fn(final
    checkpoint, tok_dir, out) writes hf/ (+ whatever else); rollout_extra: algorithm keys of the
    rollout spec."""
    from model import load_hf_dir
    from model.generate import resolve_device
    from model.hf import read_config_json
    from tasks.rewards import Scorer
    from tasks.train.rollout import heldout_rewards

    if cfg.lora:
        raise RlError(f"stages.{stage}.lora: LoRA is not supported by the RL stages; remove it")
    if cfg.nproc != 1:
        raise RlError(f"stages.{stage}.nproc: the RL stages run in one process (rollouts are sampled on one device)")
    if not cfg.data:
        raise RlError(f"stages.{stage}.data is empty: add prompt data, e.g. "
                      "[{path: chats.jsonl, format: sharegpt}] (the sft/dpo entries work as they are)")
    prompts, bad = read_prompts(cfg, stage)
    write_quarantine(out.path / "quarantine.jsonl", bad)
    init_dir = model_dir(cfg.init_from, inputs.get(upstream_policy), out, stage)
    context = read_config_json(init_dir).get("max_position_embeddings")
    if context and cfg.seq_len > context:
        raise RlError(f"stages.{stage}.seq_len {cfg.seq_len} is longer than the policy's context ({context} tokens); "
                      "lower seq_len (prompt + max_new_tokens must fit in it)")
    tok_dir = tokenizer_dir(init_dir, None, out)
    tok = load_tokenizer(tok_dir)
    prompts, too_long = tokenize_prompts(prompts, tok, cfg)
    held = held_out(len(prompts), cfg.val_fraction, cfg.seed)
    train_prompts = [p for p, h in zip(prompts, held) if not h]
    val_prompts = [p for p, h in zip(prompts, held) if h][:cfg.eval_prompts]
    if not train_prompts:
        raise RlError(f"no training prompt fits seq_len {cfg.seq_len} - max_new_tokens {cfg.max_new_tokens} "
                      f"({too_long} too long, {len(bad)} records quarantined)")
    uses_model = any(r.rule == "reward_model" for r in cfg.rewards)
    rm_dir = None
    if uses_model:
        if inputs.get("reward") is None:
            raise RlError(f"stages.{stage}.rewards lists reward_model but no reward stage artifact was given")
        rm_dir = str(reward_dir(inputs["reward"], out))

    work = out.scratch / "engine"
    work.mkdir(parents=True, exist_ok=True)
    (out.path / "prompts.json").write_text(json.dumps({"train": train_prompts, "heldout": val_prompts}, ensure_ascii=False))
    (work / "prompts.json").write_text(json.dumps(train_prompts, ensure_ascii=False))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = {"builder": "rollouts", "prompts": str(work / "prompts.json"),
            "tokenizer": str(tok_dir), "reference": str(init_dir), "rewards": [r.model_dump() for r in cfg.rewards],
            "reward_model": rm_dir, "prompts_per_rollout": cfg.prompts_per_rollout, "group_size": cfg.group_size,
            "epochs": cfg.epochs, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
            "seed": cfg.seed, "pad_id": int(pad), **rollout_extra}
    spec = engine_spec(cfg, work, model_section(cfg, init_dir), data, objective, {"stage": stage, "key": out.key})
    spec["model"] = model_spec(init_dir)

    device = resolve_device(None)  # the stage process evaluates on the GPU when there is one

    def evaluate(model_path) -> dict[str, float]:  # models loaded for the call only: none held while training
        return heldout_rewards(load_hf_dir(model_path)[0].to(device), tok, val_prompts, Scorer(cfg.rewards, rm_dir, device),
                               cfg.max_new_tokens, cfg.eval_samples, cfg.temperature, cfg.seed + 1)

    before = evaluate(init_dir)
    final, records, resumed = run_training(spec, cfg, work, out, error=RlError, extra_metrics=RL_METRICS)
    export_fn(final, tok_dir, out)
    after = evaluate(out.path / "hf")
    out.log_metrics({f"heldout_{k}": v for k, v in after.items()}, step=cfg.steps)

    train_recs = [r for r in records if r.get("kind") == "train"]
    last = {k: train_recs[-1][k] for k in RL_METRICS if train_recs and k in train_recs[-1]}
    first = {k: train_recs[0][k] for k in RL_METRICS if train_recs and k in train_recs[0]}
    dropped = reason_counts(bad)
    if too_long:
        dropped["prompt longer than seq_len - max_new_tokens"] = too_long
    steps_per_rollout = cfg.epochs * cfg.prompts_per_rollout * cfg.group_size // cfg.global_batch
    rollouts = -(-cfg.steps // steps_per_rollout)
    fmt = lambda m: f"{m['reward']:.3f}" if m else "n/a"  # noqa: E731
    return StageResult(
        counts={"prompts": len(prompts), "train_prompts": len(train_prompts), "heldout_prompts": len(val_prompts),
                "quarantined": len(bad), "rollouts": rollouts,
                "replies": rollouts * cfg.prompts_per_rollout * cfg.group_size, "steps": cfg.steps},
        dropped=dropped,
        summary=(f"{len(train_prompts)} train prompts, {rollouts} rollouts of {cfg.prompts_per_rollout}x{cfg.group_size} "
                 f"replies, {cfg.steps} steps; training reward {first.get('reward', float('nan')):.3f} -> "
                 f"{last.get('reward', float('nan')):.3f}; held-out reward {fmt(before)} -> {fmt(after)}"),
        extra={"hf_dir": "hf", "checkpoint": "checkpoint", "init_from": cfg.init_from or upstream_policy,
               "heldout_before": before, "heldout_after": after, "first_step": first, "last_step": last,
               "resumed_from": resumed, "rewards": [r.model_dump() for r in cfg.rewards]},
    )
