"""Stage keys: what makes two runs of a stage the same run.

key = sha256(stage name, STAGE_VERSION, canonical JSON of the stage's own config
slice, the upstream stages' keys). Deliberately not the source text of the task
(an edit to a docstring must not rerun hours of training) and not the flow run id
(a new run must reuse what an old one made).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

KEY_DIGITS = 16  # directory names use a 64-bit prefix; manifests keep the full key


def canonical_json(value: Any) -> str:
    """Stable JSON: sorted keys, no whitespace, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def stage_key(stage: str, version: int, config: dict, upstream: dict[str, str]) -> str:
    payload = {"stage": stage, "version": version, "config": config, "upstream": upstream}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def short(key: str) -> str:
    return key[:KEY_DIGITS]
