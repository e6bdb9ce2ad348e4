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

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from profiles.schema import Strict
from storage.errors import SlmError
from tasks.registry import Stage, StageResult
from tasks.train.settings import EngineSettings

STAGE_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class ModelShape(Strict):
    """The network for training from scratch (model/config.py ModelConfig; vocab from the tokenizer)."""

    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    head_dim: int = Field(0, ge=0)  # 0 -> hidden_size // num_heads
    intermediate_size: int = Field(384, ge=1)
    rope_theta: float = Field(1_000_000.0, gt=0)
    tie_embeddings: bool = True
    qk_norm: bool = True
    num_experts: int = Field(0, ge=0)  # > 0: MoE feed-forward
    experts_per_token: int = Field(2, ge=1)
    moe_intermediate_size: int = Field(0, ge=0)
    num_shared_experts: int = Field(0, ge=0)
    router_aux_loss_coef: float = Field(0.01, ge=0)
    init_std: float = Field(0.02, gt=0)


class PretrainSettings(EngineSettings):
    """Defaults: a small model that trains in a few minutes on a laptop CPU (the demo);
    profiles/zh-64m.yaml shows the one-GPU scale. `model` is unused with `init_from`."""

    model: ModelShape = ModelShape()
    steps: int = Field(200, ge=1)
    lr: float = Field(2e-3, gt=0)
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = Field(20, ge=0)
    decay_fraction: float = Field(0.2, ge=0, le=1)  # wsd: last share of the steps spent decaying
    decay_shape: Literal["linear", "sqrt"] = "sqrt"
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eval_every: int = Field(100, ge=0)  # 0 -> only at the end
    eval_tokens: int = Field(50_000, ge=1)  # validation tokens per evaluation
    # runtime knobs, kept out of the key
    micro_batch: int = Field(16, ge=1, exclude=True)
    nproc: int = Field(0, ge=0, exclude=True)  # processes; 0 -> every visible GPU, or 1 without one
    parallel: Literal["ddp", "fsdp"] = Field("ddp", exclude=True)


class PretrainConfig(PretrainSettings):
    init_digest: str | None = None  # what init_from held when the key was made


class PretrainError(SlmError):
    pass


def config(profile) -> PretrainConfig:
    settings = profile.stages.pretrain
    values = {name: getattr(settings, name) for name in PretrainSettings.model_fields}
    return PretrainConfig(**values, init_digest=init_digest(settings.init_from) if settings.init_from else None)


def init_digest(path: str) -> str:
    """sha256 of an HF directory's config.json and its weight files' names and sizes (cheap, no weights read)."""
    root = Path(path).expanduser()
    if not (root / "config.json").is_file():
        raise PretrainError(f"stages.pretrain.init_from: {root} has no config.json; point it at a Hugging Face "
                            "model directory (Qwen2 / Qwen3)")
    digest = hashlib.sha256((root / "config.json").read_bytes())
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise PretrainError(f"stages.pretrain.init_from: {root} has no *.safetensors weights")
    for f in weights:
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()


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


class _Watch:
    """on_poll for launch.run_engine: forward the engine's log, upload finished checkpoints."""

    def __init__(self, out, work: Path, log: Path):
        self.out, self.work, self.log = out, work, log
        self.offset = log.stat().st_size if log.exists() else 0
        self.uploaded: set[str] = set()

    def __call__(self) -> None:
        from tasks.train.checkpoint import list_checkpoints

        if self.log.exists():
            with open(self.log, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
            self.offset += len(chunk)
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
        for ckpt in list_checkpoints(self.work / "checkpoints"):
            if ckpt.name in self.uploaded:
                continue
            for f in sorted(ckpt.iterdir()):
                self.out.save_progress(f.relative_to(self.out.path).as_posix())
            for f in ("run.json", "metrics.jsonl"):
                if (self.work / f).exists():
                    self.out.save_progress((self.work / f).relative_to(self.out.path).as_posix())
            self.uploaded.add(ckpt.name)

    def tail(self, lines: int = 25) -> str:
        if not self.log.exists():
            return "(no engine log)"
        return "\n".join(self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def run(cfg: PretrainConfig, inputs: dict, out) -> StageResult:
    from tasks.train.checkpoint import export_hf, latest_checkpoint, checkpoint_step
    from tasks.train.engine import EXIT_STOPPED, read_metrics
    from tasks.train.launch import run_engine

    tok_m, shard_m = inputs["tokenizer"], inputs["shard"]
    tok_dir = out.scratch / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if any(f.path == name for f in tok_m.files):
            shutil.copyfile(out.local_input(tok_m, name), tok_dir / name)
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
    work.mkdir(parents=True, exist_ok=True)
    train_keys = ("steps", "seq_len", "micro_batch", "global_batch", "lr", "schedule", "warmup_steps",
                  "decay_fraction", "decay_shape", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip",
                  "seed", "precision", "compile", "parallel", "log_every", "eval_every", "ckpt_every", "keep_last",
                  "threads")
    spec = {
        "train": {"out_dir": str(work), **{k: getattr(cfg, k) for k in train_keys}},
        "model": model_section,
        "data": {"train": train_files, "validation": val_files, "eos_id": eos, "seed": cfg.seed,
                 "tokenizer": str(tok_dir / "tokenizer.json"), "eval_tokens": cfg.eval_tokens},
        "objective": {"name": "causal_lm"},
        "extra": {"stage": "pretrain", "key": out.key},
    }
    (work / "run.json").write_text(json.dumps(spec, indent=2))
    nproc = cfg.nproc or max(1, _visible_gpus())
    resumed = latest_checkpoint(work / "checkpoints")
    log = work / "engine.log"
    watch = _Watch(out, work, log)
    print(f"pretrain: {'resuming from ' + resumed.name if resumed else 'starting'}, {nproc} process(es); "
          f"log {log}", flush=True)
    code = run_engine(work / "run.json", work, nproc=nproc, on_poll=watch, poll_seconds=2.0,
                      grace_seconds=cfg.grace_seconds, log_path=log)
    history = read_metrics(work / "metrics.jsonl")
    begun = [i for i, r in enumerate(history) if r.get("kind") in ("start", "resume")]
    ends = [r for r in history[begun[-1] if begun else len(history):] if r.get("kind") == "end"]  # this attempt's
    if code != 0 and (code == EXIT_STOPPED or (ends and ends[-1].get("stopped"))):
        # (torchrun reports its own status, so the engine's "end" record is the one to trust)
        last = latest_checkpoint(work / "checkpoints")
        reason = ends[-1].get("stopped") if ends else "a signal"
        raise PretrainError(f"training was stopped ({reason}) after step {checkpoint_step(last) if last else 0}, "
                            f"checkpoint saved; run the stage again to resume")
    if code != 0:
        raise PretrainError(f"the training process failed (exit status {code}); the end of {log}:\n{watch.tail()}")

    final = latest_checkpoint(work / "checkpoints")
    if final is None or checkpoint_step(final) != cfg.steps:
        raise PretrainError(f"training ended without its final checkpoint (found {final}); see {log}")
    dest = out.path / "checkpoint"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(final, dest)
    if (out.path / "hf").exists():
        shutil.rmtree(out.path / "hf")
    export_hf(final, tok_dir, out.path / "hf")

    records = read_metrics(work / "metrics.jsonl")
    fields = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gib", "val_loss", "val_bpb")
    for rec in records:
        if rec.get("kind") in ("train", "eval"):
            values = {k: rec[k] for k in fields if k in rec}
            if values:
                out.log_metrics(values, step=rec["step"])
    train_recs = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    last_eval = evals[-1] if evals else {}
    tokens = train_recs[-1]["tokens"] if train_recs else 0
    speed = sum(r["tokens_per_s"] for r in train_recs[-5:]) / max(1, len(train_recs[-5:]))
    params = next((r["params"] for r in records if r.get("kind") == "start"), 0)
    bpb = f", val {last_eval['val_bpb']:.3f} bits/byte" if "val_bpb" in last_eval else ""
    return StageResult(
        counts={"steps": cfg.steps, "tokens": tokens, "params": params, "processes": nproc},
        summary=(f"{params / 1e6:.1f}M parameters, {cfg.steps} steps, {tokens:,} tokens"
                 f"{', from ' + cfg.init_from if cfg.init_from else ''}; val loss "
                 f"{last_eval.get('val_loss', float('nan')):.3f}{bpb}; {speed:,.0f} tokens/s"),
        extra={"model_config": model_cfg, "final_val": {k: v for k, v in last_eval.items() if k.startswith("val_")},
               "hf_dir": "hf", "checkpoint": "checkpoint", "init_from": cfg.init_from,
               "tokens_per_s": speed, "resumed_from": resumed.name if resumed else None},
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
