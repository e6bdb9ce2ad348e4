"""tokenizer: train a byte-level BPE tokenizer (HF `tokenizers`) on a sample of the clean corpus.

Reads   dedup's documents (parquet, `text` and `source` columns, one row group at a time).
Writes  tokenizer.json            the fast tokenizer (model, pre-tokenizer, decoder, special tokens)
        tokenizer_config.json     for `transformers.AutoTokenizer`: eos/pad tokens and a ChatML
                                  chat template with {% generation %} markers, so
                                  apply_chat_template(..., return_assistant_tokens_mask=True)
                                  gives the assistant-only loss mask
        report.md                 compression on held-out documents, overall and per source
        manifest extra            vocab size, special token ids, compression, sample sizes.
Text    nothing normalizes the text: byte-level BPE with byte fallback for all 256 bytes, so
        decode(encode(text)) == text for every string.
Split   the pre-tokenizer is Qwen2's split regex, which llama.cpp implements for its "qwen2"
        pre-tokenizer (llama-vocab.cpp): runs of letters (a whole clause of unspaced Chinese is
        one piece), single digits, punctuation runs, whitespace. The GGUF export names it, so
        llama.cpp and Ollama cut text as this tokenizer does and give the same token ids
        (tests/test_export.py runs llama.cpp on held-out text). Unspaced Chinese makes long,
        unique pieces, and the BPE trainer's memory grows with the characters trained on
        (docs/operations.md, "Known dependency facts"): `sample_chars` is the bound.
Sample  each document gets a fixed pseudo-random number u in [0, 1) from (seed, its position
        in the corpus). Documents with u >= 1 - heldout_share are held out for the
        compression report; those with u < sample_share are trained on, in corpus order,
        until `sample_chars` characters. Shares come from one counting pass, so the sample
        spreads over the whole corpus. Both passes are units, one per document file
        (tasks.corpus.parallel: local workers or Ray tasks, resumed file by file); the driver
        only streams the drawn texts into the trainer.
Memory  a unit: one upstream row group and its file's drawn texts (at most sample_chars and
        heldout_chars of them); the trainer: its counts over at most `sample_chars`
        characters, whatever the corpus size (the corpus is never held in one string).
Fails   when the corpus has no text (names the upstream artifact), or when the sample is too
        small to learn a single merge.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from profiles.schema import Strict
from storage.artifacts import SCRATCH
from storage.errors import SlmError
from tasks.chat_data import EOS, IM_END, IM_START, NAMED_SPECIAL, PAD
from tasks.corpus.documents import document_files, iter_batches
from tasks.corpus.parallel import Unit, run_units
from tasks.corpus.positions import uniform
from tasks.registry import Stage, StageResult

STAGE_VERSION = 2  # 2: llama.cpp's qwen2 split (1 capped CJK runs at max_cjk_run, which llama.cpp cannot)

# ChatML. The assistant's reply and its <|im_end|> sit inside {% generation %}, so the
# assistant mask covers exactly what the model must learn to say (not the "\n" after it,
# not the "<|im_start|>assistant\n" header). `reasoning_content`, when a message has it,
# is rendered as a <think> block inside the reply.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if message.get('reasoning_content') %}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's tokenizer.json split, character for character: llama.cpp's "qwen2" pre-tokenizer is
# this regex (model/gguf_export.py recognises it in tokenizer.json and writes the name).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TokenizerSettings(Strict):
    # Total size including the special tokens. The shard stage stores ids as uint16, so a
    # tokenizer meant for it must stay below 65536 (6400 minimind scale, 32000 bilingual).
    vocab_size: int = Field(6400, ge=512, le=1_000_000)
    sample_chars: int = Field(20_000_000, ge=10_000)  # characters trained on: the memory bound
    heldout_chars: int = Field(1_000_000, ge=0)  # characters of held-out documents for the report
    min_frequency: int = Field(2, ge=1)  # a pair must occur this often to be merged
    reserved_tokens: int = Field(8, ge=0, le=4096)  # <|reserved_0|>... for later use, never in text
    seed: int = 0  # which documents are sampled / held out


class TokenizerError(SlmError):
    pass


def config(profile) -> TokenizerSettings:
    return profile.stages.tokenizer


def special_tokens(cfg: TokenizerSettings) -> list[str]:
    """All special tokens in id order: the named ones, then the reserved ones."""
    return [*NAMED_SPECIAL, *(f"<|reserved_{i}|>" for i in range(cfg.reserved_tokens))]


def new_tokenizer():
    """An untrained byte-level BPE tokenizer with llama.cpp's qwen2 split and no normalizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def hf_config(specials: list[str]) -> dict:
    """tokenizer_config.json: what AutoTokenizer needs, with the chat template inline."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,  # ends a pretraining document; chat turns end with <|im_end|>
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [t for t in specials if t not in (EOS, PAD)],
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "chat_template": CHAT_TEMPLATE,
    }


# --- the sample: units per document file, then streamed in corpus order ---------------------
@dataclass
class Plan:
    docs: int
    chars: int
    train_share: float
    heldout_share: float


def count_unit(args: dict) -> dict:
    """One document file's documents and characters (the first of the two passes)."""
    docs = chars = 0
    for batch in iter_batches(Path(args["path"]), columns=["text"]):
        docs += len(batch)
        chars += int(pc.sum(pc.fill_null(pc.utf8_length(batch.column("text")), 0)).as_py() or 0)
    return {"docs": docs, "chars": chars}


def _write_texts(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with pa.ipc.new_file(tmp, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def sample_unit(args: dict) -> dict:
    """One document file's share of the sample. Each document gets u in [0, 1) from (seed, its
    corpus position): u < train_share is trained on, u >= 1 - heldout_share is held out. Writes
    _work/sample/<name>.train.arrow (text) and .heldout.arrow (source, text), in file order,
    each cut where this file alone passes the stage's bound (sample_chars, heldout_chars): the
    driver's cut in corpus order comes no later. Memory: at most those bounds of text."""
    out, name, position = Path(args["out"]), args["name"], args["first_position"]
    train, held_sources, held = [], [], []
    train_chars = held_chars = 0
    for batch in iter_batches(Path(args["path"]), columns=["source", "text"]):
        chars = pc.fill_null(pc.utf8_length(batch.column("text")), 0).to_numpy(zero_copy_only=False)
        u = uniform(np.arange(position, position + len(batch)), args["seed"])
        position += len(batch)
        texts, sources = batch.column("text"), batch.column("source")
        for i in np.flatnonzero((u < args["train_share"]) & (chars > 0)):
            if train and train_chars + int(chars[i]) > args["sample_chars"]:
                break
            train.append(texts[int(i)].as_py())
            train_chars += int(chars[i])
        for i in np.flatnonzero((u >= 1.0 - args["heldout_share"]) & (chars > 0)):
            if held_chars >= args["heldout_chars"]:
                break
            held_sources.append(sources[int(i)].as_py() or "?")
            held.append(texts[int(i)].as_py())
            held_chars += int(chars[i])
    files = [f"{SCRATCH}/sample/{name}.train.arrow", f"{SCRATCH}/sample/{name}.heldout.arrow"]
    _write_texts(out / files[0], pa.table({"text": pa.array(train, pa.string())}))
    _write_texts(out / files[1], pa.table({"source": pa.array(held_sources, pa.string()),
                                           "text": pa.array(held, pa.string())}))
    return {"train_chars": train_chars, "heldout_chars": held_chars, "files": files}


def draw_sample(out, paths: list[Path], cfg: TokenizerSettings) -> tuple[Plan, list[Path], list[Path]]:
    """Both passes over the corpus as units (tasks.corpus.parallel: local workers or Ray tasks,
    resumed file by file): count, then each file's share of the sample. Returns the plan and
    the sample files (training, held out), in corpus order."""
    names = [f"f{i:05d}" for i in range(len(paths))]
    base = [Unit(n, {"name": n, "path": str(p), "out": str(out.path), "size": p.stat().st_size})
            for n, p in zip(names, paths)]
    counted = run_units(out, "tokenizer-count", base, count_unit, desc="tokenizer: count")
    docs = sum(counted[n]["docs"] for n in names)
    chars = sum(counted[n]["chars"] for n in names)
    heldout = min(0.5, cfg.heldout_chars / chars) if chars else 0.0
    plan = Plan(docs, chars, min(1.0 - heldout, cfg.sample_chars / chars) if chars else 0.0, heldout)
    if not chars:
        return plan, [], []
    units, position = [], 0
    for unit in base:
        units.append(Unit(unit.name, {**unit.args, "first_position": position, "seed": cfg.seed,
                                      "train_share": plan.train_share, "heldout_share": plan.heldout_share,
                                      "sample_chars": cfg.sample_chars, "heldout_chars": cfg.heldout_chars}))
        position += counted[unit.name]["docs"]
    done = run_units(out, "tokenizer-sample", units, sample_unit, desc="tokenizer: sample")
    files = [[out.path / f for f in done[n]["files"]] for n in names]
    return plan, [f[0] for f in files], [f[1] for f in files]


def _read_texts(path: Path) -> pa.Table:
    with pa.ipc.open_file(path) as reader:
        return reader.read_all()


def training_texts(files: list[Path], cfg: TokenizerSettings, taken: dict) -> Iterator[str]:
    """The sampled documents' texts in corpus order, stopping at `sample_chars` (one file's
    share in memory at a time)."""
    for path in files:
        for text in _read_texts(path).column("text").to_pylist():
            if taken["chars"] + len(text) > cfg.sample_chars and taken["docs"]:
                return
            taken["chars"] += len(text)
            taken["docs"] += 1
            yield text


def heldout_docs(files: list[Path], cfg: TokenizerSettings) -> Iterator[tuple[str, str]]:
    """(source, text) of the held-out documents in corpus order, up to `heldout_chars` characters."""
    total = 0
    for path in files:
        table = _read_texts(path)
        for source, text in zip(table.column("source").to_pylist(), table.column("text").to_pylist()):
            if total >= cfg.heldout_chars:
                return
            total += len(text)
            yield source, text


def compression(tok, docs: Iterator[tuple[str, str]], batch_docs: int = 512) -> dict:
    """Characters and UTF-8 bytes per token, overall and per source."""
    per: dict[str, list[int]] = {}  # source -> [docs, chars, bytes, tokens]

    def flush(chunk):
        encodings = tok.encode_batch_fast([t for _, t in chunk], add_special_tokens=False)
        for (source, text), enc in zip(chunk, encodings):
            row = per.setdefault(source, [0, 0, 0, 0])
            row[0] += 1
            row[1] += len(text)
            row[2] += len(text.encode("utf-8"))
            row[3] += len(enc.ids)

    chunk = []
    for item in docs:
        chunk.append(item)
        if len(chunk) >= batch_docs:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)

    def ratios(row):
        docs_, chars, nbytes, tokens = row
        return {"docs": docs_, "chars": chars, "tokens": tokens,
                "chars_per_token": round(chars / max(tokens, 1), 4),
                "bytes_per_token": round(nbytes / max(tokens, 1), 4)}

    total = [sum(r[k] for r in per.values()) for k in range(4)]
    return {**ratios(total), "by_source": {s: ratios(r) for s, r in sorted(per.items())}}


def report_md(cfg: TokenizerSettings, vocab: int, plan: Plan, taken: dict, comp: dict) -> str:
    lines = [
        "# tokenizer",
        "",
        f"Byte-level BPE, {vocab} tokens ({len(special_tokens(cfg))} special), split as llama.cpp's "
        f"qwen2 pre-tokenizer splits.",
        f"Trained on {taken['docs']:,} documents, {taken['chars']:,} characters "
        f"(of {plan.docs:,} documents, {plan.chars:,} characters).",
        "",
        "Compression on held-out documents:",
        "",
        "| source | docs | chars | tokens | chars/token | bytes/token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [("all", comp)] + list(comp["by_source"].items())
    for name, r in rows:
        lines.append(f"| {name} | {r['docs']:,} | {r['chars']:,} | {r['tokens']:,} | "
                     f"{r['chars_per_token']:.3f} | {r['bytes_per_token']:.3f} |")
    return "\n".join(lines) + "\n"


def run(cfg: TokenizerSettings, inputs: dict, out) -> StageResult:
    from tokenizers import pre_tokenizers, trainers

    manifest = inputs["dedup"]
    paths = [out.local_input(manifest, rel) for rel in document_files(manifest)]
    plan, train_files, heldout_files = draw_sample(out, paths, cfg)
    if plan.chars == 0:
        raise TokenizerError(
            f"{manifest.stage}/{manifest.key[:16]}: the corpus has no text ({plan.docs} documents); "
            f"check the sources and the cleaning rules"
        )
    specials = special_tokens(cfg)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is ever unknown
        show_progress=sys.stderr.isatty(),
    )
    taken = {"docs": 0, "chars": 0}
    tok.train_from_iterator(training_texts(train_files, cfg, taken), trainer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab <= len(specials) + 256:
        raise TokenizerError(
            f"the training sample ({taken['chars']} characters) taught no merge: the corpus of "
            f"{manifest.stage}/{manifest.key[:16]} is too small or stages.tokenizer.min_frequency too high"
        )
    wrong = [t for i, t in enumerate(specials) if tok.token_to_id(t) != i]
    if wrong:  # the ids the rest of the pipeline relies on (eos 0, im_start 1, im_end 2, pad 3)
        raise TokenizerError(f"special tokens {wrong} did not get their fixed ids; tokenizers "
                             f"{_version()} trains differently from the version this stage was written for")

    tok.save(str(out.path / "tokenizer.json"))
    (out.path / "tokenizer_config.json").write_text(
        json.dumps(hf_config(specials), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tok.encode_special_tokens = True  # measure documents as the shard stage encodes them
    comp = compression(tok, heldout_docs(heldout_files, cfg))
    (out.path / "report.md").write_text(report_md(cfg, vocab, plan, taken, comp), encoding="utf-8")

    out.log_metrics({"vocab_size": vocab, "chars_per_token": comp["chars_per_token"],
                     "bytes_per_token": comp["bytes_per_token"], "sample_chars": taken["chars"]})
    short = "" if vocab == cfg.vocab_size else f" (asked for {cfg.vocab_size}: the sample ran out of pairs)"
    return StageResult(
        counts={"vocab_size": vocab, "sample_docs": taken["docs"], "sample_chars": taken["chars"],
                "heldout_docs": comp["docs"], "heldout_chars": comp["chars"]},
        summary=(f"{vocab} tokens{short}; held-out {comp['chars_per_token']:.3f} chars/token, "
                 f"{comp['bytes_per_token']:.3f} bytes/token; trained on {taken['chars']:,} characters"),
        extra={
            "vocab_size": vocab,
            "special_tokens": {t: i for i, t in enumerate(specials)},
            "eos_id": specials.index(EOS), "pad_id": specials.index(PAD),
            "im_start_id": specials.index(IM_START), "im_end_id": specials.index(IM_END),
            "compression": comp,
            "corpus": {"docs": plan.docs, "chars": plan.chars},
            "sample": dict(taken),
            "pretokenizer": SPLIT_PATTERN,
        },
    )


def _version() -> str:
    import tokenizers

    return tokenizers.__version__


STAGE = Stage(
    name="tokenizer",
    version=STAGE_VERSION,
    upstream=("dedup",),
    settings=TokenizerSettings,
    config=config,
    run=run,
)
