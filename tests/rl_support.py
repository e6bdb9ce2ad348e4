"""Shared by the RL tests (not a test module): a tiny chat policy, SFT-trained in seconds on
chatterbot-corpus' real Chinese Q/A (a project dependency), built once per test process."""
from __future__ import annotations

from pathlib import Path

from model import load_hf_dir
from tasks.train.chats import PackedChats
from tasks.train.finetune import prepare
from tasks.train.stage import load_tokenizer
from tasks.train import checkpoint as ckpt
from tasks.train.engine import TrainConfig, train
from tasks.train.objectives import SFT
from tests.chat_support import chatterbot_conversations, make_model_dir, make_tokenizer_dir

SEQ = 64
CHATTERBOT = {"package": "chatterbot_corpus", "path": "data/chinese/*.yml", "format": "chatterbot"}
_built: dict[str, Path] = {}


def sft_policy(tmp_path_factory) -> Path:
    """An HF directory (+ tokenizer): a 2-layer model fine-tuned 60 steps on the Q/A; it answers
    in the chat format and ends its replies with <|im_end|>."""
    if "policy" in _built:
        return _built["policy"]
    root = tmp_path_factory.mktemp("rl-policy")
    tok_dir = make_tokenizer_dir(root / "tok")
    base = make_model_dir(root / "base", tok_dir)
    tok = load_tokenizer(base)
    train_docs, _, _ = prepare(chatterbot_conversations(), tok, SEQ, 0.1, 0)
    cfg = TrainConfig(out_dir=str(root / "sft"), steps=60, seq_len=SEQ, micro_batch=8, lr=5e-3, warmup_steps=5,
                      schedule="cosine", log_every=50, threads=2)
    train(cfg, lambda: load_hf_dir(base)[0], SFT(), PackedChats(train_docs, SEQ, tok.pad_token_id, 0))
    _built["policy"] = ckpt.export_hf(ckpt.latest_checkpoint(root / "sft" / "checkpoints"), tok_dir, root / "sft-hf")
    return _built["policy"]
