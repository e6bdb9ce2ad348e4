"""sft: supervised fine-tuning on chat data, loss on the assistant's tokens only.

Reads   the model: the pretrain stage's hf/ directory, or any Qwen2/Qwen3 HF directory named by
        `init_from`; its tokenizer files (the tokenizer stage's when the model directory has
        none), whose chat template must carry {% generation %} markers (the tokenizer stage's
        does). Chat data: the files of `data:` entries in the stage settings, each a local
        path / glob (`path`) or files shipped inside an installed package (`package` + `path`),
        with a `format` (alpaca | sharegpt | openai | chatterbot; tasks/chat_data.py). Chat data
        is not a profile source: sources feed the pretraining corpus.
        Files are identified by their sha256 in the key: editing one reruns the stage.
        `system_prompt` (optional) goes first in every conversation without a system message.
Writes  hf/          the fine-tuned model + tokenizer files (model/hf.py format)
        checkpoint/  the final engine checkpoint
        quarantine.jsonl  records that could not become conversations, with reasons
        heldout.jsonl     the held-out conversations (messages), which eval's chat replies answer
        manifest     counts (conversations, train/val, tokens, learnt tokens, truncations),
                     dropped by reason, held-out assistant loss before and after training.
Data    conversations are split into train / held-out by a fixed hash of their position
        (`val_fraction`), tokenized with the chat template (assistant mask), cut to `seq_len`+1
        tokens (cuts counted: conversations, tokens, learnt tokens; a conversation with nothing
        learnt left is dropped and counted), and packed greedily into rows of `seq_len` tokens
        (document ids keep attention inside a conversation; the rest of a row is padding with
        no loss). Epochs reshuffle the conversations (seed, epoch).
Runs    the engine (tasks/train) as a child process, like pretrain (torchrun when nproc > 1),
        objective `sft` (masked next-token cross entropy); the engine's validation loss is the
        mean negative log-likelihood per held-out assistant token. With `lora:` only peft LoRA
        adapters on the named Linear modules train (tasks/train/lora.py); hf/ holds the merged
        model, so every later stage reads the same format.
Resume  engine checkpoints in the stage's working dir; a rerun with the same key continues
        exactly (weights, optimizer, data cursor, RNG).
Fails   when no data entry yields a conversation, when a data path matches nothing, when the
        chat template marks no assistant token, or when training fails (the end of its log).
"""
from __future__ import annotations

# torch and transformers are imported inside run(): the CLI imports every stage module to list the DAG.

from storage.errors import SlmError
from tasks.registry import Stage, StageResult
from tasks.train.settings import ChatSettings
from tasks.train.stage import data_files, keyed_config, model_dir, tokenizer_dir

STAGE_VERSION = 2  # 2: heldout.jsonl (the held-out conversations, for eval's replies)


class SftError(SlmError):
    pass


class SftSettings(ChatSettings):
    """The chat fine-tuning settings as they are (`data: []` -> the stage fails, saying to add data)."""


class SftConfig(SftSettings):
    init_digest: str | None = None
    data_digests: list[list[str]] = []  # [file, sha256] of every data file


# --------------------------------------------------------------------------- the stage


def config(profile) -> SftConfig:
    return keyed_config("sft", profile.stages.sft, SftConfig)


def run(cfg: SftConfig, inputs: dict, out) -> StageResult:
    from tasks.chat_data import add_system, load_conversations
    from tasks.train.finetune import fine_tune

    if not cfg.data:
        raise SftError("stages.sft.data is empty: add chat data, e.g. "
                       "[{path: my_chats.jsonl, format: sharegpt}] (formats: alpaca, sharegpt, openai, chatterbot)")
    files = [(str(p), e.format) for n, e in enumerate(cfg.data) for p in data_files(e, f"stages.sft.data[{n}]")]
    convs, bad = load_conversations(files)
    convs = [add_system(c, cfg.system_prompt) for c in convs]
    init_dir = model_dir(cfg.init_from, inputs.get("pretrain"), out, "sft")
    return fine_tune(cfg, convs, bad, init_dir, tokenizer_dir(init_dir, inputs.get("tokenizer"), out), out, "sft",
                     error=SftError)


STAGE = Stage(
    name="sft",
    version=STAGE_VERSION,
    upstream=("tokenizer", "pretrain"),
    settings=SftSettings,
    config=config,
    run=run,
    group="train",
)
