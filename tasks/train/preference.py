"""What a preference stage (dpo, reward) starts from: its pairs read from `data:` (preference
files, or chat files turned into pairs with a made rejected reply), the quarantine, the model and its tokenizer;
and the `dropped` counts of its manifest.
"""
from __future__ import annotations

import numpy as np

from tasks.chat_data import PreferencePair, load_conversations, load_pairs, reason_counts, write_quarantine
from tasks.train.stage import data_files, load_tokenizer, model_dir, tokenizer_dir


def mismatched_pairs(convs: list[list[dict]], seed: int):
    """Conversations -> PreferencePairs: chosen = its own last reply, rejected = the last reply of
    another conversation (a seeded permutation shifted by one, so never its own)."""
    n = len(convs)
    if n < 2:
        return []
    perm = np.random.default_rng(seed).permutation(n)
    other = np.empty(n, dtype=np.int64)
    other[perm] = np.roll(perm, 1)
    pairs = []
    for i, conv in enumerate(convs):
        chosen, rejected = conv[-1]["content"], convs[other[i]][-1]["content"]
        if chosen != rejected:
            pairs.append(PreferencePair(conv[:-1], chosen, rejected))
    return pairs


def looped(reply: str) -> str:
    """The reply collapsing into a loop: its first third kept, then the last kept character repeated
    to the reply's length ("我梦想我会变得富有" -> "我梦想想想想想想想")."""
    keep = max(1, len(reply) // 3)
    return reply[:keep] + reply[keep - 1] * (len(reply) - keep)


def looped_pairs(convs: list[list[dict]]):
    """Conversations -> PreferencePairs: chosen = its own last reply, rejected = `looped(chosen)`.
    A preference a small model can learn from a few hundred pairs and carry to unseen questions
    (a mismatched answer can only be told apart by understanding the question)."""
    pairs = []
    for conv in convs:
        chosen = conv[-1]["content"]
        if looped(chosen) != chosen:
            pairs.append(PreferencePair(conv[:-1], chosen, looped(chosen)))
    return pairs


def read_pairs(cfg, stage: str = "dpo") -> tuple[list, list[dict]]:
    """The pairs of cfg.data (any config with `data` and `seed`; `stage` names it in errors) + quarantine."""
    pairs, bad = [], []
    for n, entry in enumerate(cfg.data):
        files = [str(p) for p in data_files(entry, f"stages.{stage}.data[{n}]")]
        if entry.format == "preference":
            p, b = load_pairs(files)
        else:
            convs, b = load_conversations([(f, "chatterbot") for f in files])
            p = looped_pairs(convs) if entry.rejected == "looped" else mismatched_pairs(convs, cfg.seed)
        pairs += p
        bad += b
    return pairs, bad


def preference_inputs(cfg, inputs: dict, out, stage: str, error, hint: str = ""):
    """What a preference stage (dpo, reward) starts from: the pairs of cfg.data (the quarantine
    written to quarantine.jsonl), the model to train (the sft stage's hf/, or cfg.init_from), its
    tokenizer dir and tokenizer. Fails, naming stages.<stage>.data, without data or usable pairs.
    Returns (pairs, quarantine, model dir, tokenizer dir, tokenizer)."""
    if not cfg.data:
        raise error(f"stages.{stage}.data is empty: add preference data, e.g. "
                    f"[{{path: pairs.jsonl, format: preference}}]{hint}")
    pairs, bad = read_pairs(cfg, stage)
    write_quarantine(out.path / "quarantine.jsonl", bad)
    if not pairs:
        raise error(f"no preference pair in the data ({len(bad)} records quarantined: see quarantine.jsonl)")
    init_dir = model_dir(cfg.init_from, inputs.get("sft"), out, stage)
    tok_dir = tokenizer_dir(init_dir, None, out)
    return pairs, bad, init_dir, tok_dir, load_tokenizer(tok_dir)


def preference_dropped(bad: list[dict], counts: dict[str, int]) -> dict[str, int]:
    """The `dropped` of a preference stage (dpo, reward): quarantine reasons, plus the pairs whose
    prompt alone filled seq_len (encode_pairs' prompt_too_long, train and val)."""
    dropped = reason_counts(bad)
    too_long = counts.get("train_prompt_too_long", 0) + counts.get("val_prompt_too_long", 0)
    if too_long:
        dropped["prompt longer than seq_len"] = too_long
    return dropped
