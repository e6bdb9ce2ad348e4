"""Held-out loss of a model on the shard stage's validation split (eval and export compare models by it)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from tasks.shard_reader import ShardReader
from tasks.train.data import IGNORE, ValidationRows


def heldout_rows(shard_manifest, out, seq_len: int, max_tokens: int, tokenizer_json: Path | None):
    """The validation split as tasks.train.data.ValidationRows (None when the shards have no val split)."""
    shards = shard_manifest.extra.get("shards") or []
    files = [str(out.local_input(shard_manifest, s["path"])) for s in shards if s["split"] == "val"]
    if not files:
        return None
    decode = None
    if tokenizer_json is not None:
        tok = Tokenizer.from_file(str(tokenizer_json))
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    reader = ShardReader(files, shuffle=False, loop=False)
    return ValidationRows(reader, seq_len, int(shard_manifest.extra["eos_id"]), max_tokens, decode)


def heldout_loss(model, rows, device, rows_per_batch: int = 8) -> dict:
    """{"val_loss" (nats per token), "val_bpb", "val_ppl", "val_tokens", "val_seconds"} of a model on ValidationRows."""
    nats, count = 0.0, 0
    clock = time.perf_counter()
    with torch.no_grad():
        for batch in rows.batches(rows_per_batch):
            ids = torch.from_numpy(batch["input_ids"]).long().to(device)
            targets = torch.from_numpy(batch["targets"]).to(device)
            docs = torch.from_numpy(batch["document_ids"]).long().to(device)
            logits = model(ids, document_ids=docs)
            nats += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                          ignore_index=IGNORE, reduction="sum"))
            count += int((targets != IGNORE).sum())
    loss = nats / max(count, 1)
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count,
              "val_seconds": time.perf_counter() - clock}
    if rows.num_bytes:
        result["val_bpb"] = nats / math.log(2) / rows.num_bytes
    return result
