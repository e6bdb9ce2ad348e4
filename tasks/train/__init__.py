"""The training engine shared by pretrain, SFT, DPO and distill (see engine.py).

Needs only torch, numpy and safetensors (pyarrow and tokenizers for shard data),
so it runs on a GPU box without prefect or mlflow.

    from tasks.train import TrainConfig, train, CausalLM, PackedBatches, ValidationRows

Names are imported lazily, so `python -m tasks.train.engine` does not import
the engine module twice.
"""
from importlib import import_module

_EXPORTS = {
    "ArrayDocuments": "data", "PackedBatches": "data", "PackedRows": "data", "ValidationRows": "data", "EXIT_STOPPED": "engine", "TrainConfig": "engine", "read_metrics": "metrics",
    "train": "engine", "CausalLM": "objectives", "Schedule": "schedule",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tasks.train' has no attribute {name!r}")
    return getattr(import_module(f"tasks.train.{_EXPORTS[name]}"), name)
