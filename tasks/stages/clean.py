"""clean: drop the documents that fail the quality rules, each rule named with its threshold.

Reads   normalize's docs/*.parquet, ~256k characters of documents at a time.
Writes  docs/<same shard name>.parquet with the documents that pass every rule; report.md
        with the rules, their thresholds, how many documents each dropped, and a sample of
        dropped documents per rule (the k with the smallest hash of their id, so the sample is
        the same however the work was split).
Rules   applied in this order; a document is dropped by the first rule it fails and counted
        under that rule's name (its key under `stages.clean` in the profile; null turns a rule
        off). Thresholds start from FineWeb-2's Chinese (cmn_Hani) filter values.
          min_chars, max_chars          characters other than spaces and newlines
          min_cjk_fraction              Han characters / characters other than whitespace
          min_line_punct_fraction       share of lines ending a sentence (。！？!?.…, then maybe
                                        a closing quote or bracket)   [FineWeb-2: 0.106]
          max_dup_line_fraction         share of lines that repeat an earlier line [0.287]
          max_dup_ngram_fraction        {n: f} for each n, the share of characters inside
                                        repeated n-grams of tokens (Gopher's duplicate n-gram
                                        rule; a token is one Han character or one Latin word)
                                        [FineWeb-2, n in words: 5: 0.198 ... 10: 0.127]
          max_top_ngram_fraction        {n: f} the share of characters taken by the most
                                        frequent n-gram   [FineWeb-2: 2: 0.256, 3: 0.201, 4: 0.171]
          max_boilerplate_fraction      share of short lines (<= 40 characters) holding one of
                                        boilerplate_patterns (copyright, navigation, "share to")
        FineWeb-2 counts n-grams of words from a Chinese word segmenter; here a Han character
        is a token, so the defaults take its n-gram sizes times ~1.5 (characters per Chinese
        word): with FineWeb-2's n taken as characters, 3% of People's Daily articles (laws,
        lists, headlines repeated in the lead) were dropped, with the scaled n 0.7%. The
        samples in report.md are there to check the rules on your corpus.
Memory  one chunk (~256k characters, ~40 bytes per character while its n-grams are counted)
        plus one output row group per worker.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import xxhash
from pydantic import BaseModel, ConfigDict, Field

from profiles.schema import Strict
from tasks.corpus.documents import DocWriter, empty_histogram, iter_chunks, length_bin
from tasks.corpus.parallel import run_units, shard_units
from tasks.corpus.report import finish_stage, table
from tasks.corpus.text import Tokens, ends_sentence, fmix64, han_count, ngram_hashes, tokenize
from tasks.registry import Stage, StageResult

STAGE_VERSION = 1
RULES = ("min_chars", "max_chars", "min_cjk_fraction", "min_line_punct_fraction", "max_dup_line_fraction",
         "max_dup_ngram_fraction", "max_top_ngram_fraction", "max_boilerplate_fraction")
BOILERPLATE_LINE_CHARS = 40
_DOC_MIX = np.uint64(0xD6E8FEB86659FD93)
DEFAULT_BOILERPLATE = [
    "版权所有", "版權所有", "all rights reserved", "copyright ©", "免责声明", "免責聲明", "联系我们", "聯繫我們",
    "关于我们", "上一篇", "下一篇", "上一页", "下一页", "返回顶部", "返回首页", "点击这里", "点击查看", "扫一扫",
    "扫描二维码", "关注我们", "关注公众号", "责任编辑", "icp备", "公网安备", "分享到", "阅读全文", "查看更多",
    "打印本页", "加入收藏", "cookie", "javascript",
]


class CleanSettings(Strict):
    min_chars: int | None = Field(20, ge=0)
    max_chars: int | None = Field(100_000, ge=1)
    min_cjk_fraction: float | None = Field(0.3, ge=0, le=1)
    min_line_punct_fraction: float | None = Field(0.106, ge=0, le=1)
    max_dup_line_fraction: float | None = Field(0.287, ge=0, le=1)
    # FineWeb-2's cmn_Hani values, their n (words) turned into tokens at ~1.5 Han characters a word
    max_dup_ngram_fraction: dict[int, float] = Field(
        default_factory=lambda: {8: 0.198, 9: 0.182, 11: 0.167, 12: 0.154, 14: 0.14, 15: 0.127})
    max_top_ngram_fraction: dict[int, float] = Field(default_factory=lambda: {3: 0.256, 5: 0.201, 6: 0.171})
    max_boilerplate_fraction: float | None = Field(0.3, ge=0, le=1)
    boilerplate_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_BOILERPLATE))
    samples_per_rule: int = Field(3, ge=0, le=100)


class CleanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    settings: CleanSettings


def config(profile) -> CleanConfig:
    return CleanConfig(settings=profile.stages.clean)


# --- the rules ----------------------------------------------------------------------------------
def _grouped(tokens: Tokens, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n-grams of each document, sorted so that equal n-grams of one document are adjacent:
    (first token index of each occurrence, index where each group of equal n-grams starts)."""
    h, doc, first = ngram_hashes(tokens, n)
    with np.errstate(over="ignore"):
        key = fmix64(h + doc.astype(np.uint64) * _DOC_MIX)  # one sortable key per (document, n-gram)
    order = np.argsort(key)
    key = key[order]
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1]))) if len(key) else np.zeros(0, np.int64)
    return first[order], starts


def _repeat_fractions(tokens: Tokens, total: np.ndarray, sizes) -> dict[int, np.ndarray]:
    """{n: share of each document's token characters covered by repeated n-grams}."""
    found = {}
    size = len(tokens.ids) + 1
    for n in sizes:
        first, starts = _grouped(tokens, n)
        if len(first):
            group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(first))))
            earliest = np.minimum.reduceat(first, starts)[group]
            repeats = first[first != earliest]  # every occurrence after the first of its n-gram
        else:
            repeats = first
        depth = np.cumsum(np.bincount(repeats, minlength=size) - np.bincount(repeats + n, minlength=size))[:-1]
        covered = depth > 0
        chars = np.bincount(tokens.doc[covered], weights=tokens.length[covered], minlength=tokens.n_docs)
        found[n] = chars / np.maximum(total, 1)
    return found


def _top_fractions(tokens: Tokens, total: np.ndarray, sizes) -> dict[int, np.ndarray]:
    """{n: share of each document's token characters taken by its most frequent n-gram}."""
    found = {}
    cum = np.concatenate(([0], np.cumsum(tokens.length)))
    for n in sizes:
        first, starts = _grouped(tokens, n)
        count = np.diff(np.append(starts, len(first)))
        lead = first[starts]
        weight = count * (cum[lead + n] - cum[lead])
        repeated = count > 1
        best = np.zeros(tokens.n_docs)
        np.maximum.at(best, tokens.doc[lead[repeated]], weight[repeated])
        found[n] = best / np.maximum(total, 1)
    return found


def evaluate(texts: list[str], s: CleanSettings) -> list[tuple[str, float] | None]:
    """For each text: None if it passes, else (first failing rule, its measured value)."""
    tokens = tokenize(texts)
    total = tokens.chars_per_doc()
    dup_ngrams = _repeat_fractions(tokens, total, sorted(s.max_dup_ngram_fraction))
    top_ngrams = _top_fractions(tokens, total, sorted(s.max_top_ngram_fraction))
    patterns = re.compile("|".join(re.escape(p) for p in s.boilerplate_patterns), re.IGNORECASE) if s.boilerplate_patterns else None
    verdicts: list[tuple[str, float] | None] = []
    for i, text in enumerate(texts):
        verdicts.append(_first_failure(i, text, s, dup_ngrams, top_ngrams, patterns))
    return verdicts


def _first_failure(i, text, s, dup_ngrams, top_ngrams, patterns):
    chars = len(text) - text.count(" ") - text.count("\n")
    if s.min_chars is not None and chars < s.min_chars:
        return "min_chars", chars
    if s.max_chars is not None and chars > s.max_chars:
        return "max_chars", chars
    if s.min_cjk_fraction is not None:
        share = han_count(text) / max(chars, 1)
        if share < s.min_cjk_fraction:
            return "min_cjk_fraction", share
    lines = [line for line in (part.strip() for part in text.split("\n")) if line]
    if s.min_line_punct_fraction is not None and lines:
        share = sum(1 for line in lines if ends_sentence(line)) / len(lines)
        if share < s.min_line_punct_fraction:
            return "min_line_punct_fraction", share
    if s.max_dup_line_fraction is not None and lines:
        share = (len(lines) - len(set(lines))) / len(lines)
        if share > s.max_dup_line_fraction:
            return "max_dup_line_fraction", share
    for n, limit in sorted(s.max_dup_ngram_fraction.items()):
        if dup_ngrams[n][i] > limit:
            return "max_dup_ngram_fraction", float(dup_ngrams[n][i])
    for n, limit in sorted(s.max_top_ngram_fraction.items()):
        if top_ngrams[n][i] > limit:
            return "max_top_ngram_fraction", float(top_ngrams[n][i])
    if s.max_boilerplate_fraction is not None and lines and patterns is not None:
        hits = sum(1 for line in lines if len(line) <= BOILERPLATE_LINE_CHARS and patterns.search(line))
        if hits / len(lines) > s.max_boilerplate_fraction:
            return "max_boilerplate_fraction", hits / len(lines)
    return None


# --- the stage -----------------------------------------------------------------------------------
def clean_unit(args: dict) -> dict:
    clock = time.perf_counter()
    out, name = Path(args["out"]), args["name"]
    settings = CleanSettings.model_validate(args["settings"])
    writer = DocWriter(out / "docs" / f"{name}.parquet")
    counts = {"in": 0, "out": 0, "chars_out": 0, "bytes_in": 0}
    dropped: dict[str, int] = {}
    samples: dict[str, list] = {}
    hist = empty_histogram()
    try:
        for chunk in iter_chunks(Path(args["path"])):
            texts = [row["text"] for row in chunk]
            counts["in"] += len(chunk)
            counts["bytes_in"] += sum(len(t.encode("utf-8")) for t in texts)
            for row, verdict in zip(chunk, evaluate(texts, settings)):
                if verdict is None:
                    writer.add_row(row)
                    counts["out"] += 1
                    counts["chars_out"] += len(row["text"])
                    hist[length_bin(len(row["text"]))] += 1
                    continue
                rule, value = verdict
                dropped[rule] = dropped.get(rule, 0) + 1
                _sample(samples.setdefault(rule, []), row, value, settings.samples_per_rule)
    except BaseException:
        writer.abort()
        raise
    files = [f"docs/{name}.parquet"] if writer.close() else []
    return {"counts": counts, "dropped": dropped, "hist": hist, "files": files, "samples": samples,
            "seconds": time.perf_counter() - clock}


def _sample(kept: list, row: dict, value: float, k: int) -> None:
    """Keep the k rows with the smallest hash of their id: the same sample however shards split."""
    if k <= 0:
        return
    kept.append([xxhash.xxh64_intdigest(row["id"].encode("utf-8")), row["id"], round(float(value), 4), row["text"][:300]])
    kept.sort()
    del kept[k:]


def run(cfg: CleanConfig, inputs: dict, out) -> StageResult:
    clock = time.perf_counter()
    upstream = inputs["normalize"]
    s = cfg.settings
    units = shard_units(out, upstream, {"settings": s.model_dump(mode="json")})
    results = run_units(out, "clean", units, clean_unit, desc="clean")
    merged: dict[str, list] = {}
    for result in results.values():
        for rule, rows in result["samples"].items():
            for row in rows:
                _sample(merged.setdefault(rule, []), {"id": row[1], "text": row[3]}, row[2], s.samples_per_rule)
    dropped: dict[str, int] = {}
    for result in results.values():
        for rule, value in result["dropped"].items():
            dropped[rule] = dropped.get(rule, 0) + value
    thresholds = [[rule, _threshold(s, rule), dropped.get(rule, 0)] for rule in RULES]
    sections = ["## Rules (in the order they apply)", "", table(["rule", "threshold", "documents dropped"], thresholds), ""]
    if any(merged.values()):
        sections += ["## Sample of dropped documents", ""]
        rows = [[rule, doc_id, value, text] for rule in RULES for _, doc_id, value, text in merged.get(rule, [])]
        sections += [table(["rule", "id", "value", "text (first 300 characters)"], rows), ""]
    result = finish_stage(out, "clean", results, clock, upstream=upstream, sections=sections,
                          note="Documents that pass every quality rule; each dropped one counts under the first rule it fails.",
                          extra={"rules": {rule: _threshold(s, rule) for rule in RULES},
                                 "samples": {rule: [r[1:] for r in rows] for rule, rows in merged.items()}})
    return result


def _threshold(s: CleanSettings, rule: str):
    value = getattr(s, rule)
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


STAGE = Stage(
    name="clean",
    version=STAGE_VERSION,
    upstream=("normalize",),
    settings=CleanSettings,
    config=config,
    run=run,
)
