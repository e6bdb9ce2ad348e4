"""Fine-tuning on conversations, the part sft, distill_sft and distill share: the chats made ready
for the engine (`prepare_chats`) and, for sft and distill_sft, the whole job (`fine_tune`):
train from a model directory with the `sft` objective, export, and the held-out assistant loss
before and after.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tasks.chat_data import FitStats, encode_conversation, fit_length, reason_counts, write_quarantine
from tasks.registry import StageResult
from tasks.train.chats import heldout_assistant_loss, save_conversations
from tasks.train.stage import (TrainStageError, engine_spec, export, held_out, load_tokenizer, model_section,
                               run_training)


def prepare(convs: list[list[dict]], tok, seq_len: int, val_fraction: float, seed: int):
    """Conversations -> (train docs, val docs, FitStats); tokenized with the chat template, cut to seq_len + 1."""
    stats = FitStats()
    held = held_out(len(convs), val_fraction, seed)
    train, val = [], []
    for i, messages in enumerate(convs):
        fitted = fit_length(*encode_conversation(tok, messages), seq_len + 1, stats)
        if fitted is not None:
            (val if held[i] else train).append(fitted)
    return train, val, stats


HELDOUT_FILE = "heldout.jsonl"  # the held-out conversations, one JSON list of messages per line


def write_heldout(path: Path, convs: list[list[dict]], held) -> None:
    """The conversations the stage held out (its validation split), as messages: what the eval stage
    asks its chat models (questions none of them trained on when later stages split the same data)."""
    with open(path, "w", encoding="utf-8") as fh:
        for messages, is_held in zip(convs, held):
            if is_held:
                fh.write(json.dumps(messages, ensure_ascii=False) + "\n")


@dataclass
class ChatSet:
    """Conversations made ready for the engine by `prepare_chats`."""

    work: Path  # the engine's working dir (train.npz / val.npz, checkpoints)
    data: dict  # the run.json "data" section (builder "chats")
    train: list  # [(ids, assistant mask)]
    val: list
    stats: object  # chat_data.FitStats: what the length limit cut
    pad: int


def prepare_chats(cfg, convs: list[list[dict]], bad: list[dict], tok, out,
                  token_weights: dict[int, float] | None = None, error=TrainStageError) -> ChatSet:
    """`bad` records to quarantine.jsonl, the held-out conversations to heldout.jsonl; conversations tokenized by the chat template, split
    (held-out share `val_fraction`), cut to seq_len + 1 (`prepare`) and saved for the engine under
    out.scratch/engine. Fails when nothing is left to train on. Shared by sft, distill_sft and distill."""
    write_quarantine(out.path / "quarantine.jsonl", bad)
    if not convs:
        raise error(f"no conversation in the data ({len(bad)} records quarantined: see quarantine.jsonl)")
    write_heldout(out.path / HELDOUT_FILE, convs, held_out(len(convs), cfg.val_fraction, cfg.seed))
    train_docs, val_docs, stats = prepare(convs, tok, cfg.seq_len, cfg.val_fraction, cfg.seed)
    if not train_docs:
        raise error(f"every conversation was held out or too long for seq_len {cfg.seq_len}")
    work = out.scratch / "engine"
    work.mkdir(parents=True, exist_ok=True)
    save_conversations(work / "train.npz", train_docs)
    save_conversations(work / "val.npz", val_docs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = {"builder": "chats", "train": str(work / "train.npz"),
            "validation": str(work / "val.npz") if val_docs else None, "pad_id": int(pad), "seed": cfg.seed}
    if token_weights:
        data["token_weights"] = {str(k): float(v) for k, v in token_weights.items()}
    return ChatSet(work, data, train_docs, val_docs, stats, int(pad))


def fine_tune(cfg, convs: list[list[dict]], bad: list[dict], init_dir: Path, tok_dir: Path, out,
              stage: str, token_weights: dict[int, float] | None = None, error=TrainStageError) -> StageResult:
    """Conversations -> a fine-tuned model in out/hf (shared by sft and distill_sft): the data made
    ready (`prepare_chats`; with `token_weights` {token id: weight} a target token's loss counts that
    many times), training from init_dir (objective `sft`), export, and the held-out assistant loss
    before and after. Returns the stage's result."""
    chats = prepare_chats(cfg, convs, bad, load_tokenizer(tok_dir), out, token_weights, error)
    work, data, train_docs, val_docs, stats, pad = chats.work, chats.data, chats.train, chats.val, chats.stats, chats.pad
    spec = engine_spec(cfg, work, model_section(cfg, init_dir), data, {"name": "sft"}, {"stage": stage, "key": out.key})
    before = heldout_assistant_loss(init_dir, val_docs, cfg.seq_len, pad) if val_docs else float("nan")
    final, records, resumed = run_training(spec, cfg, work, out, error=error)
    export(final, tok_dir, out, cfg.lora)
    after = heldout_assistant_loss(out.path / "hf", val_docs, cfg.seq_len, pad) if val_docs else float("nan")

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
               "heldout_loss_before": before, "heldout_loss_after": after, "heldout": HELDOUT_FILE,
               "resumed_from": resumed,
               "final_val": next((r for r in reversed(records) if r.get("kind") == "eval"), {}).get("val_loss")},
    )
