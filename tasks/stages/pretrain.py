"""pretrain: train the language model on the token shards, from scratch or from an HF model.

Reads   the tokenizer stage's tokenizer files (tokenizer.json, ...), the shard stage's
        train / val token shards (tasks.shard_reader.ShardReader), and, for continued
        pretraining, a Qwen2/Qwen3 Hugging Face directory named by `init_from`.
Writes  hf/          config.json + model.safetensors + the tokenizer files: loads with
                     transformers.AutoModelForCausalLM (model/hf.py), converts to GGUF
        checkpoint/  the final engine checkpoint (weights, optimizer, data cursor, RNG
                     states; tasks/train/checkpoint.py), to continue training from
        counts (steps, tokens, parameters), the final validation loss and bits per byte in
        the manifest; loss, lr, grad norm, tokens/s, MFU, peak memory and validation
        metrics per step to the stage's MLflow run.
Runs    the engine (tasks/train) in a child process in its own session, under torchrun
        when `nproc` > 1 (DDP, or FSDP2 with parallel: fsdp); tasks/train/launch.py stops
        its process group if this stage is cancelled or fails, and the engine stops by
        itself if this process dies. The child needs only torch, numpy, safetensors,
        pyarrow and tokenizers; it writes metrics.jsonl, which this process reads (the
        engine never imports mlflow or prefect).
Resume  checkpoints live in the stage's working dir (`_work/engine/checkpoints`, kept across
        restarts, uploaded with save_progress on remote stores); a restart with the same key
        continues from the latest one exactly (same data position, optimizer and RNG state).
Memory  the model, its optimizer state and one step's activations on each device; the data
        is streamed one row group at a time.
Fails   when the shards' vocabulary does not fit the model, when an init_from directory is
        missing or was trained with another tokenizer, when training stops on a signal
        (rerun to resume) or dies (the end of its log is in the message).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from storage.errors import SlmError
from tasks.progress import mean_rate
from tasks.registry import Stage, StageResult
from tasks.train.settings import EngineSettings, ModelShape
from tasks.train.stage import copy_tokenizer, engine_spec, export, init_digest, keyed_config, run_training

STAGE_VERSION = 1


class PretrainSettings(EngineSettings):
    """Defaults: a small model that trains in a few minutes on a laptop CPU (the demo);
    profiles/zh-64m.yaml shows the one-GPU scale. `model` is unused with `init_from`."""

    model: ModelShape = ModelShape()
    steps: int = Field(200, ge=1)
    lr: float = Field(2e-3, gt=0)
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = Field(20, ge=0)
    decay_shape: Literal["linear", "sqrt"] = "sqrt"
    eval_every: int = Field(100, ge=0)  # 0 -> only at the end
    eval_tokens: int = Field(50_000, ge=1)  # validation tokens per evaluation
    # runtime knobs, kept out of the key
    micro_batch: int = Field(16, ge=1, exclude=True)
    nproc: int = Field(0, ge=0, exclude=True)  # processes; 0 -> every visible GPU, or 1 without one


class PretrainConfig(PretrainSettings):
    init_digest: str | None = None  # what init_from held when the key was made


class PretrainError(SlmError):
    pass


def config(profile) -> PretrainConfig:
    return keyed_config("pretrain", profile.stages.pretrain, PretrainConfig)


# --------------------------------------------------------------------------- the job


def _model_spec(cfg: PretrainConfig, vocab: int, tok_dir: Path, extra: dict) -> tuple[dict, dict]:
    """The engine's "model" section and the ModelConfig it trains (as a dict)."""
    from model import ModelConfig
    from model.hf import config_from_hf

    if cfg.init_from:
        from transformers import AutoConfig

        root = Path(cfg.init_from).expanduser()
        if init_digest(str(root)) != cfg.init_digest:
            raise PretrainError(f"stages.pretrain.init_from: {root} changed since this run's key was made; run again")
        mcfg = config_from_hf(AutoConfig.from_pretrained(root))
        if mcfg.vocab_size < vocab:
            raise PretrainError(f"{root} has {mcfg.vocab_size} token embeddings, the tokenizer {vocab}: "
                                "continued pretraining needs the model's own tokenizer")
        _check_same_tokenizer(root, tok_dir)
        return {"init_from": str(root)}, mcfg.to_dict()
    shape = cfg.model.model_dump()
    mcfg = ModelConfig(vocab_size=vocab, max_seq_len=cfg.seq_len, extra=extra, **shape)
    return {"config": mcfg.to_dict()}, mcfg.to_dict()


def _check_same_tokenizer(model_dir: Path, tok_dir: Path) -> None:
    from tokenizers import Tokenizer

    theirs = model_dir / "tokenizer.json"
    if not theirs.exists():
        return
    if Tokenizer.from_file(str(theirs)).get_vocab() != Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab():
        raise PretrainError(
            f"{model_dir} was trained with another tokenizer than the tokenizer stage's: its embeddings "
            "would be read with the wrong ids. Continue such a model only on shards made with its own tokenizer."
        )


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run(cfg: PretrainConfig, inputs: dict, out) -> StageResult:
    tok_m, shard_m = inputs["tokenizer"], inputs["shard"]
    tok_dir = copy_tokenizer(tok_m, out)
    shards = shard_m.extra.get("shards") or []
    train_files = [str(out.local_input(shard_m, s["path"])) for s in shards if s["split"] == "train"]
    val_files = [str(out.local_input(shard_m, s["path"])) for s in shards if s["split"] == "val"]
    if not train_files:
        raise PretrainError(f"shard/{shard_m.key[:16]} has no train shard; rerun the shard stage")
    vocab, eos = int(shard_m.extra["vocab_size"]), int(shard_m.extra["eos_id"])
    special = {"eos_token_id": eos}
    if "pad_id" in tok_m.extra:
        special["pad_token_id"] = int(tok_m.extra["pad_id"])
    model_section, model_cfg = _model_spec(cfg, vocab, tok_dir, special)

    work = out.scratch / "engine"
    data = {"train": train_files, "validation": val_files, "eos_id": eos, "seed": cfg.seed,
            "tokenizer": str(tok_dir / "tokenizer.json"), "eval_tokens": cfg.eval_tokens}
    spec = engine_spec(cfg, work, model_section, data, {"name": "causal_lm"}, {"stage": "pretrain", "key": out.key})
    nproc = cfg.nproc or max(1, _visible_gpus())
    final, records, resumed = run_training(spec, cfg, work, out, error=PretrainError, nproc=nproc, poll_seconds=2.0)
    export(final, tok_dir, out)

    train_recs = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    last_eval = evals[-1] if evals else {}
    tokens = train_recs[-1]["tokens"] if train_recs else 0
    speed = mean_rate(records) or 0.0  # wall clock over each attempt's logged steps (tasks/progress.py)
    params = next((r["params"] for r in records if r.get("kind") == "start"), 0)
    bpb = f", val {last_eval['val_bpb']:.3f} bits/byte" if "val_bpb" in last_eval else ""
    return StageResult(
        counts={"steps": cfg.steps, "tokens": tokens, "params": params, "processes": nproc},
        summary=(f"{params / 1e6:.1f}M parameters, {cfg.steps} steps, {tokens:,} tokens"
                 f"{', from ' + cfg.init_from if cfg.init_from else ''}; val loss "
                 f"{last_eval.get('val_loss', float('nan')):.3f}{bpb}; {speed:,.0f} tokens/s"),
        extra={"model_config": model_cfg, "final_val": {k: v for k, v in last_eval.items() if k.startswith("val_")},
               "hf_dir": "hf", "checkpoint": "checkpoint", "init_from": cfg.init_from,
               "tokens_per_s": speed, "resumed_from": resumed},
    )


STAGE = Stage(
    name="pretrain",
    version=STAGE_VERSION,
    upstream=("tokenizer", "shard"),
    settings=PretrainSettings,
    config=config,
    run=run,
    group="train",
)
