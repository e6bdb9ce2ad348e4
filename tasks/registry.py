"""The stage registry: the pipeline DAG as data.

Each stage module defines `STAGE = Stage(...)`: its name, STAGE_VERSION, upstream
stages, settings model (its section under `stages:` in a profile), the function that
cuts its config slice from a profile (that slice, and only it, goes into the key),
and its `run` function. A new stage joins the pipeline by adding its module to
`_STAGE_MODULES` below; a stage that does not exist yet is simply not listed.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

from pydantic import BaseModel

from storage.errors import SlmError

_STAGE_MODULES = [
    "tasks.stages.download",
    "tasks.stages.extract",
    "tasks.stages.normalize",
    "tasks.stages.clean",
    "tasks.stages.dedup",
    "tasks.stages.tokenizer",
    "tasks.stages.shard",
    "tasks.stages.pretrain",
    "tasks.stages.sft",
    "tasks.stages.dpo",
    "tasks.stages.reward", "tasks.stages.ppo", "tasks.stages.grpo",
    "tasks.stages.distill", "tasks.stages.distill_data", "tasks.stages.distill_sft",
    "tasks.stages.eval",
    "tasks.stages.export",
]


@dataclass
class StageResult:
    """What a stage reports besides its files (the runner adds files, key, timing)."""

    counts: dict[str, int] = field(default_factory=dict)  # e.g. {"in": 10, "out": 8}
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> records
    summary: str = ""  # one or two human lines
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific facts for readers


@dataclass(frozen=True)
class Stage:
    name: str
    version: int  # bump when output semantics change: the key changes, the stage reruns
    upstream: tuple[str, ...]
    settings: type[BaseModel]  # the profile's `stages.<name>` section
    config: Callable[[Any], BaseModel]  # profile -> this stage's config slice
    run: Callable[[Any, dict, Any], StageResult]  # (config, inputs, out) -> result
    group: str = "data"  # data stages run on CPU workers, train stages on GPU workers


@lru_cache(maxsize=1)
def all_stages() -> dict[str, Stage]:
    """Registered stages in topological order (upstream before downstream)."""
    stages: dict[str, Stage] = {}
    for module in _STAGE_MODULES:
        stage = importlib.import_module(module).STAGE
        missing = [u for u in stage.upstream if u not in stages]
        if missing:
            raise RuntimeError(f"stage {stage.name} is listed before its upstream {missing}")
        stages[stage.name] = stage
    return stages


def select(until: str | None = None, only: str | None = None, group: str | None = None) -> list[Stage]:
    """The stages a run executes: all, those up to `until` (its ancestors), or just `only`."""
    stages = all_stages()
    for flag, name in (("--until", until), ("--only", only)):
        if name is not None and name not in stages:
            raise SlmError(f"{flag} {name}: unknown stage; stages are: {', '.join(stages)}")
    if only is not None:
        chosen = [stages[only]]
    elif until is not None:
        wanted = {until}
        for stage in reversed(list(stages.values())):
            if stage.name in wanted:
                wanted.update(stage.upstream)
        chosen = [s for s in stages.values() if s.name in wanted]
    else:
        chosen = list(stages.values())
    return [s for s in chosen if group is None or s.group == group]
