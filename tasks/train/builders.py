"""The engine's data and model builders, by name: run.json's "data": {"builder": NAME, ...}
and "model": {"builder": NAME, ...} (tasks/train/engine.py run_from_config).

A builder module holds numpy/torch code only: the engine child never imports pydantic, the
profiles or a stage module. Each is imported when named, so the child loads only its own.

  data builders   (data spec, TrainConfig) -> (training batches, validation set or None)
  model builders  (model spec) -> the model to train
"""
from __future__ import annotations

from importlib import import_module
from typing import Callable

DATA_BUILDERS = {
    "chats": "tasks.train.chats:engine_data",  # packed conversations, loss on assistant tokens (sft, distill)
    "pairs": "tasks.train.pairs:engine_data",  # chosen / rejected replies (dpo, reward)
    "rollouts": "tasks.train.rollout:engine_data",  # replies sampled from the policy as it trains (grpo, ppo)
}
MODEL_BUILDERS = {
    "reward_head": "model.reward:engine_model",  # a causal LM backbone with a scalar head (reward, ppo's value)
}


def _load(table: dict[str, str], kind: str, name: str) -> Callable:
    if name not in table:
        raise ValueError(f"{kind} builder {name!r}: known builders are {sorted(table)}")
    module, func = table[name].split(":")
    return getattr(import_module(module), func)


def data_builder(name: str) -> Callable:
    return _load(DATA_BUILDERS, "data", name)


def model_builder(name: str) -> Callable:
    return _load(MODEL_BUILDERS, "model", name)
