"""One source of training settings: every TrainConfig field reaches the engine from the stage's
settings, and every one that changes what is trained changes the stage's cache key."""
from __future__ import annotations

from dataclasses import fields

import pytest

from profiles.loader import load_profile
from storage.keys import stage_key
from tasks.registry import all_stages
from tasks.runner import config_slice
from tasks.train.engine import TrainConfig
from tasks.train.settings import EngineSettings
from tasks.train.stage import train_section

# Where and how fast, not what is trained: changing these must never rerun a stage.
RUNTIME_KNOBS = {"micro_batch", "compile", "parallel", "log_every", "ckpt_every", "keep_last", "deterministic",
                 "threads", "peak_flops"}
TRAIN_STAGES = [s.name for s in all_stages().values() if issubclass(s.settings, EngineSettings)]


def changed(name: str, value):
    """A valid value for setting `name` other than `value`."""
    other = {"schedule": {"wsd": "cosine"}, "decay_shape": {"linear": "sqrt"}, "precision": {"auto": "fp32"},
             "parallel": {"ddp": "fsdp"}}
    if name in other:
        return other[name].get(value, next(iter(other[name])))
    if name == "global_batch":
        return value // 2  # still divides the RL stages' replies per rollout (micro_batch set to 1 below)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 8 if name == "seq_len" else value + 1
    return value * 0.9 if value else 0.05  # floats: all bounded by 1 or unbounded above 0


def key(profile, stage):
    return stage_key(stage.name, stage.version, config_slice(stage, profile), {})


def test_train_stages_are_found():
    assert {"pretrain", "sft", "dpo", "reward", "ppo", "grpo", "distill", "distill_sft"} <= set(TRAIN_STAGES)


def test_every_engine_setting_is_a_profile_setting():
    names = {f.name for f in fields(TrainConfig)} - {"out_dir"}
    for stage in TRAIN_STAGES:
        settings = all_stages()[stage].settings
        assert names <= set(settings.model_fields), f"{stage}: {sorted(names - set(settings.model_fields))}"
        excluded = {n for n, f in settings.model_fields.items() if f.exclude and n in names}
        assert excluded == RUNTIME_KNOBS, stage


def test_engine_section_is_the_resolved_settings(tmp_path):
    profile = load_profile("demo")
    for stage in TRAIN_STAGES:
        cfg = all_stages()[stage].config(profile)
        section = train_section(cfg, tmp_path)
        assert set(section) == {f.name for f in fields(TrainConfig)}
        resolved = TrainConfig.from_dict(section)
        assert resolved.beta2 == cfg.beta2 and resolved.decay_shape == cfg.decay_shape and resolved.eps == cfg.eps


@pytest.mark.parametrize("stage_name", TRAIN_STAGES)
def test_each_training_setting_changes_the_key(stage_name):
    base = load_profile("demo")
    stage = all_stages()[stage_name]
    before = key(base, stage)
    current = getattr(base.stages, stage_name)
    names = [f.name for f in fields(TrainConfig) if f.name not in RUNTIME_KNOBS | {"out_dir"}]
    assert {"beta1", "beta2", "eps", "decay_shape", "decay_fraction"} <= set(names)
    for name in names:
        value = changed(name, getattr(current, name))
        extra = [f"stages.{stage_name}.micro_batch=1"] if name == "global_batch" else []
        after = key(load_profile("demo", [f"stages.{stage_name}.{name}={value}", *extra]), stage)
        assert after != before, f"{stage_name}.{name} = {value} left the key unchanged"
    for name in RUNTIME_KNOBS:
        value = changed(name, getattr(current, name)) if name != "compile" else True
        if name == "micro_batch":
            value = 1  # still divides global_batch
        assert key(load_profile("demo", [f"stages.{stage_name}.{name}={value}"]), stage) == before, name
