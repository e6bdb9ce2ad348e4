"""normalize: traditional -> simplified and Unicode cleanup, shard by shard.

Reads   extract's docs/*.parquet, one row group at a time.
Writes  docs/<same shard name>.parquet with title and text normalized, `lang` set (meta as it came);
        quarantine/<shard>.jsonl for documents left empty by the cleanup; report.md.
Text    tasks/corpus/text.clean_unicode (NFC; control, zero-width, bidi and BOM characters
        removed; whitespace normalized; full-width ASCII letters and digits -> ASCII when
        halfwidth_alnum) and then Converter(target, backend): zh-cn (mainland characters and
        wording), zh-hans (characters only) or none; backend zhconv (default) or opencc
        (faster; `benchmarks/data.py` compares the two). Chinese full-width punctuation,
        「」『』 included, is kept as it is.
Units   one per input shard, in runtime.workers processes; finished shards are kept on restart.
Memory  one row group of the input plus one output row group (~64 MB of text each) per worker.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from profiles.schema import Strict
from tasks.corpus.documents import DocWriter, Quarantine, empty_histogram, iter_batches, length_bin
from tasks.corpus.parallel import run_units, shard_units
from tasks.corpus.report import finish_stage
from tasks.corpus.text import Converter, clean_unicode, script_lang
from tasks.registry import Stage, StageResult

STAGE_VERSION = 1


class NormalizeSettings(Strict):
    target: Literal["zh-cn", "zh-hans", "none"] = "zh-cn"  # traditional -> simplified, or leave as is
    backend: Literal["zhconv", "opencc"] = "zhconv"
    halfwidth_alnum: bool = True  # ＡＢＣ１２３ -> ABC123 (punctuation stays full-width)


class NormalizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    settings: NormalizeSettings


def config(profile) -> NormalizeConfig:
    return NormalizeConfig(settings=profile.stages.normalize)


def normalize_unit(args: dict) -> dict:
    clock = time.perf_counter()
    out, name = Path(args["out"]), args["name"]
    convert = Converter(args["target"], args["backend"])
    halfwidth = args["halfwidth_alnum"]
    writer = DocWriter(out / "docs" / f"{name}.parquet")
    quarantine = Quarantine(out / "quarantine" / f"{name}.jsonl")
    counts = {"in": 0, "out": 0, "chars_out": 0, "bytes_in": 0, "changed": 0}
    hist = empty_histogram()
    try:
        for batch in iter_batches(Path(args["path"])):
            counts["bytes_in"] += int(pc.sum(pc.binary_length(batch.column("text"))).as_py() or 0)
            for row in batch.to_pylist():
                counts["in"] += 1
                text = convert(clean_unicode(row["text"], halfwidth))
                if not text:
                    quarantine.add("empty-after-normalize", row["source"], row["id"], row["id"],
                                   "nothing left after removing control and blank characters", row["text"])
                    continue
                if text != row["text"]:
                    counts["changed"] += 1
                title = convert(clean_unicode(row["title"] or "", halfwidth))
                writer.add(row["id"], row["source"], title, text, script_lang(text), row["meta"] or "{}")
                counts["out"] += 1
                counts["chars_out"] += len(text)
                hist[length_bin(len(text))] += 1
    except BaseException:
        writer.abort()
        raise
    files = [f"docs/{name}.parquet"] if writer.close() else []
    if quarantine.close():
        files.append(f"quarantine/{name}.jsonl")
    return {"counts": counts, "dropped": dict(quarantine.counts), "hist": hist, "files": files,
            "seconds": time.perf_counter() - clock}


def run(cfg: NormalizeConfig, inputs: dict, out) -> StageResult:
    clock = time.perf_counter()
    upstream = inputs["extract"]
    settings = cfg.settings
    units = shard_units(out, upstream, {"target": settings.target, "backend": settings.backend,
                                        "halfwidth_alnum": settings.halfwidth_alnum})
    results = run_units(out, "normalize", units, normalize_unit, desc="normalize")
    note = (f"Unicode cleanup, then traditional -> simplified: target {settings.target}, backend "
            f"{settings.backend}; Chinese full-width punctuation kept.")
    return finish_stage(out, "normalize", results, clock, upstream=upstream, note=note)


STAGE = Stage(
    name="normalize",
    version=STAGE_VERSION,
    upstream=("extract",),
    settings=NormalizeSettings,
    config=config,
    run=run,
)
