"""Shared by test_tokenizer.py and test_shard.py: a real documents artifact and the stages' profile.

`documents_artifact(store, files)` writes documents parquet files (tasks.corpus.documents'
writer, small row groups) and commits them through ArtifactStore.begin/commit as the
`dedup` stage would, so the tokenizer and shard stages run on it through the real runner.
The text is real: Tang poems (traditional), Song ci (simplified), Alpaca answers from
../shared/data, plus a few hand-written edge cases (mixed scripts, emoji, control
characters, literal special tokens) that byte-level round trips must survive.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pydantic import create_model

from profiles.schema import ProfileBase, profile_model
from storage.artifacts import ArtifactStore
from storage.keys import stage_key
from storage.manifest import Manifest, list_files
from tasks.corpus.documents import DocWriter
from tasks.registry import all_stages
from tasks.stages.shard import ShardSettings
from tasks.stages.tokenizer import TokenizerSettings

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

EDGE_CASES = [
    "Mixed 中文 and English, numbers 1998年12月31日, ＡＢＣ full-width, 한국어 and 日本語のテキスト。",
    "emoji 👩‍👩‍👧 🇨🇳 and combining e\u0301, zero width\u200bspace, BOM \ufeff, RTL مرحبا",
    "tabs\tand\r\nCRLF\r\n\n\n   leading and trailing spaces   ",
    "literal special tokens: <|endoftext|> <|im_start|>user\nhi<|im_end|> <think>x</think> <|pad|>",
    "控制字符\x00\x01\x7f与私用区\ue000以及生僻字𠀀𪚥𰻞",
    "一" * 3000,  # one very long CJK run
]


def require_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA} (see ../shared/data/README.md)")
    return DATA


def corpus_records(files: list[str], alpaca: int = 0) -> list[dict]:
    """Documents from the shared data: each poem / ci is one document."""
    data = require_data()
    records = []
    for rel in files:
        for i, poem in enumerate(json.loads((data / rel).read_text(encoding="utf-8"))):
            title = poem.get("title") or poem.get("rhythmic") or ""
            text = "\n".join(poem["paragraphs"])
            records.append({"id": f"{Path(rel).stem}-{i}", "source": Path(rel).parent.name, "title": title, "text": text})
    if alpaca:
        rows = json.loads((data / "sft" / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
        for i, row in enumerate(rows[:alpaca]):
            records.append({"id": f"alpaca-{i}", "source": "alpaca", "title": row["instruction"][:40],
                            "text": "\n".join(x for x in (row["instruction"], row["input"], row["output"]) if x)})
    return records


def documents_artifact(store: ArtifactStore, parts: list[list[dict]], name: str = "corpus") -> Manifest:
    """Commit the records as a `dedup` artifact: one parquet file per part, row groups of ~64 KB."""
    key = stage_key("dedup", 1, {"fixture": name, "records": [len(p) for p in parts]}, {})
    found = store.load_manifest("dedup", key)
    if found is not None:
        return found
    out = store.begin("dedup", key)
    for index, records in enumerate(parts):
        writer = DocWriter(out.path / "docs" / f"part-{index:05d}.parquet", row_group_bytes=64 * 1024)
        for record in records:
            writer.add_row(record)
        writer.close()
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = Manifest(stage="dedup", key=key, stage_version=1, files=list_files(out.path),
                        counts={"out": sum(len(p) for p in parts)}, config={"fixture": name}, upstream={},
                        versions={}, started_at=now, finished_at=now, seconds=0.0)
    store.commit(out, manifest)
    return manifest


def stage_profile(root: str | Path, tokenizer: dict | None = None, shard: dict | None = None):
    """A validated profile with these stages' settings (the registered model once they are in
    tasks/registry.py, else one made from the two settings models)."""
    if "shard" in all_stages():
        model = profile_model()
    else:
        stages = create_model("Stages", tokenizer=(TokenizerSettings, TokenizerSettings()),
                              shard=(ShardSettings, ShardSettings()))
        model = create_model("Profile", __base__=ProfileBase, stages=(stages, stages()))
    return model.model_validate({
        "name": "token-test", "store": {"root": str(root)}, "tracking": {"enabled": False},
        "stages": {"tokenizer": tokenizer or {}, "shard": shard or {}},
    })

