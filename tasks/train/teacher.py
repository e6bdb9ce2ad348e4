"""What the distillation stages (distill, distill_data) share: their chat data (the sft stage's
when their own `data` is empty) and the teacher model they learn from.
"""
from __future__ import annotations

from pathlib import Path

from storage.errors import SlmError
from tasks.chat_data import add_system, load_conversations
from tasks.train.stage import TrainStageError, data_files, init_digest, model_dir


class DistillError(SlmError):
    pass


def with_sft_data(settings, profile):
    """Chat settings whose `data` is empty take the sft stage's `data` and `system_prompt`."""
    if settings.data:
        return settings
    sft = profile.stages.sft
    return settings.model_copy(update={"data": sft.data, "system_prompt": settings.system_prompt or sft.system_prompt})


def hf_digest(path: str, where: str) -> str:
    """init_digest of an HF directory, with an error naming the profile field."""
    root = Path(path).expanduser()
    if not (root / "config.json").is_file() or not any(root.glob("*.safetensors")):
        raise DistillError(f"{where}: {root} is not a Hugging Face model directory (config.json + *.safetensors)")
    return init_digest(str(root), where)


def read_chats(cfg, stage: str) -> tuple[list[list[dict]], list[dict]]:
    """The conversations of cfg.data (system prompt added) and the quarantine of bad records."""
    if not cfg.data:
        raise DistillError(f"stages.{stage}.data and stages.sft.data are empty: add chat data, e.g. "
                           "[{path: my_chats.jsonl, format: sharegpt}] (formats: alpaca, sharegpt, openai, chatterbot)")
    files = [(str(p), e.format) for n, e in enumerate(cfg.data) for p in data_files(e, f"stages.{stage}.data[{n}]")]
    convs, bad = load_conversations(files)
    return [add_system(c, cfg.system_prompt) for c in convs], bad


def teacher_dir(teacher: str | None, upstream, out, stage: str) -> Path:
    """`teacher`, or the upstream (dpo) stage's hf/ directory."""
    if teacher:
        return Path(teacher).expanduser()
    try:
        return model_dir(None, upstream, out, stage)
    except TrainStageError as e:
        raise DistillError(f"{e} (as the teacher: or set stages.{stage}.teacher)") from None
