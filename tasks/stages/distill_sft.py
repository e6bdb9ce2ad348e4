"""distill_sft: fine-tune a student on the teacher's answers (the training half of black-box distillation).

Reads   distill_data's data/train.jsonl (OpenAI messages format: the SFT set's prompts with the
        teacher's answers); the student: the pretrain stage's hf/ model (the pipeline's base
        model), or any Qwen2/Qwen3 HF directory named by `init_from`, with its own tokenizer (the
        tokenizer stage's when the directory has none). Black-box distillation only sees the
        teacher's text, so the student's tokenizer may differ from the teacher's.
Writes  hf/, checkpoint/, quarantine.jsonl, and the manifest of sft (conversations, train/val,
        truncations, held-out assistant loss before and after training).
Runs    tasks/train/finetune.py fine_tune: the SFT machinery (split, cut, pack; engine child, objective
        `sft`). `special_token_weight` != 1 weights the loss of the reasoning template's special
        tokens, <think> and </think>, when they are targets: the student must learn where the
        reasoning starts and ends, a handful of tokens among many (per-token weights, PackedChats
        token_weights; the tokenizer must have both tokens, as the tokenizer stage's has).
Why a stage of its own  the teacher's answers (API calls: time and money) are an artifact keyed by
        what was asked, so retraining the student with other settings never asks the teacher again,
        and this stage is sft with another data source.
Resume  as sft: engine checkpoints in the working dir, exact continuation.
"""
from __future__ import annotations

from pydantic import Field

from storage.errors import SlmError
from tasks.registry import Stage, StageResult
from tasks.train.settings import TrainSettings

STAGE_VERSION = 2  # 2: heldout.jsonl


class DistillSftError(SlmError):
    pass


class DistillSftSettings(TrainSettings):
    special_token_weight: float = Field(1.0, ge=0)  # loss weight of <think> / </think> targets (1: none extra)
    lr: float = Field(1e-4, gt=0)


class DistillSftConfig(DistillSftSettings):
    init_digest: str | None = None


def config(profile) -> DistillSftConfig:
    from tasks.train.stage import keyed_config

    return keyed_config("distill_sft", profile.stages.distill_sft, DistillSftConfig)


def special_weights(tok, weight: float) -> dict[int, float] | None:
    """{id of <think>: weight, id of </think>: weight}, or None when the weight is 1."""
    from tasks.chat_data import END_THINK, THINK

    if weight == 1.0:
        return None
    vocab = tok.get_vocab()
    missing = [t for t in (THINK, END_THINK) if t not in vocab]
    if missing:
        raise DistillSftError(f"stages.distill_sft.special_token_weight is {weight}, but the student's tokenizer has no "
                              f"{' / '.join(missing)} token: use a tokenizer with the reasoning template's special "
                              "tokens (the tokenizer stage's has them) or set the weight to 1")
    return {vocab[THINK]: weight, vocab[END_THINK]: weight}


def run(cfg: DistillSftConfig, inputs: dict, out) -> StageResult:
    from tasks.chat_data import load_conversations
    from tasks.train.finetune import fine_tune
    from tasks.train.stage import load_tokenizer, model_dir, tokenizer_dir

    made = inputs["distill_data"]
    dataset = out.local_input(made, made.extra.get("dataset", "data/train.jsonl"))
    convs, bad = load_conversations([(str(dataset), "openai")])
    init_dir = model_dir(cfg.init_from, inputs.get("pretrain"), out, "distill_sft")
    tok_dir = tokenizer_dir(init_dir, inputs.get("tokenizer"), out)
    weights = special_weights(load_tokenizer(tok_dir), cfg.special_token_weight)
    result = fine_tune(cfg, convs, bad, init_dir, tok_dir, out, "distill_sft", token_weights=weights,
                       error=DistillSftError)
    teacher = made.extra.get("teacher", {})
    result.extra.update({"teacher": teacher, "dataset": f"distill_data/{made.key[:16]}/{made.extra.get('dataset')}",
                         "special_token_weight": cfg.special_token_weight})
    result.summary = f"on the answers of {teacher.get('model') or teacher.get('path') or 'the teacher'}: {result.summary}"
    return result


STAGE = Stage(
    name="distill_sft",
    version=STAGE_VERSION,
    upstream=("tokenizer", "pretrain", "distill_data"),
    settings=DistillSftSettings,
    config=config,
    run=run,
    group="train",
)
