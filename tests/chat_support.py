"""Shared fixtures for the SFT / DPO tests (not a test module): a real tokenizer with the tokenizer
stage's ChatML template ({% generation %} markers), trained on chatterbot-corpus' Chinese Q/A (a
project dependency), a tiny random model saved as an HF directory, and the Q/A conversations."""
from __future__ import annotations

from pathlib import Path

import torch

from model import ModelConfig, Transformer, save_hf_dir
from tasks.chat_data import load_conversations


def chatterbot_files() -> list[tuple[str, str]]:
    import importlib.util

    base = Path(next(iter(importlib.util.find_spec("chatterbot_corpus").submodule_search_locations)))
    return [(str(p), "chatterbot") for p in sorted((base / "data" / "chinese").glob("*.yml"))]


def chatterbot_conversations() -> list[list[dict]]:
    return load_conversations(chatterbot_files())[0]


def make_tokenizer_dir(out: Path, vocab_size: int = 600) -> Path:
    """The tokenizer stage's pre-tokenizer, specials and tokenizer_config.json, trained in a second."""
    import json

    import zhconv
    from tokenizers import pre_tokenizers, trainers

    from tasks.stages.tokenizer import NAMED_SPECIAL, hf_config, new_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(NAMED_SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [m["content"] for c in chatterbot_conversations() for m in c]
    texts += [zhconv.convert(t, "zh-hant") for t in texts]  # both scripts, as the demo corpus has
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(hf_config(list(NAMED_SPECIAL))))
    return out


def make_model_dir(out: Path, tok_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=256)
    return save_hf_dir(Transformer(cfg).eval(), tok_dir, out)
