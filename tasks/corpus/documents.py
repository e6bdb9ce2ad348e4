"""Documents on disk: the one reader and writer every corpus stage uses.

Format  parquet, columns id, source, title, text, lang, meta (all strings; meta is a JSON
        object as text, lang null until normalize sets it), zstd compressed, one row group
        per ~64 MB of text (ROW_GROUP_BYTES).
Writer  DocWriter buffers rows and flushes a row group when the buffer holds ROW_GROUP_BYTES
        of text; it writes `<name>.tmp` and renames to `<name>` on close, so a shard file that
        exists is complete. Memory: one row group (~64 MB of text, about twice that while
        arrow encodes it).
Reader  iter_batches(path) yields record batches of at most `rows` rows, one row group at a
        time: memory is one row group whatever the file size.
Quarantine  a JSONL file of records a stage could not use: {source, file, record, reason,
        detail, sample}; the sample is cut to SAMPLE_CHARS.
"""
from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import SlmError

ROW_GROUP_BYTES = 64 << 20
SAMPLE_CHARS = 300
COMPRESSION = "zstd"

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("title", pa.string()),
    ("text", pa.string()),
    ("lang", pa.string()),
    ("meta", pa.string()),
])
COLUMNS = tuple(SCHEMA.names)


def meta_json(meta: dict | None) -> str:
    return json.dumps(meta or {}, ensure_ascii=False, sort_keys=True)


class DocWriter:
    """Append documents to one parquet shard; `close()` publishes it under its final name."""

    def __init__(self, path: Path, row_group_bytes: int = ROW_GROUP_BYTES):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.row_group_bytes = row_group_bytes
        self._rows: dict[str, list] = {name: [] for name in COLUMNS}
        self._bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0
        self.chars = 0

    def add(self, id: str, source: str, title: str, text: str, lang: str | None = None, meta: str = "{}") -> None:
        row = self._rows
        row["id"].append(id)
        row["source"].append(source)
        row["title"].append(title)
        row["text"].append(text)
        row["lang"].append(lang)
        row["meta"].append(meta)
        self._bytes += len(text) * 3 + len(title) + len(meta)  # upper bound of UTF-8 bytes for CJK
        self.rows += 1
        self.chars += len(text)
        if self._bytes >= self.row_group_bytes:
            self._flush()

    def add_row(self, row: dict) -> None:
        self.add(row["id"], row["source"], row["title"], row["text"], row.get("lang"), row.get("meta") or "{}")

    def _flush(self) -> None:
        if not self._rows["id"]:
            return
        table = pa.Table.from_pydict(self._rows, schema=SCHEMA)
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp, SCHEMA, compression=COMPRESSION)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._rows = {name: [] for name in COLUMNS}
        self._bytes = 0

    def close(self) -> bool:
        """Publish the shard; returns False (and writes nothing) when no row was added."""
        self._flush()
        if self._writer is None:
            return False
        self._writer.close()
        os.replace(self.tmp, self.path)
        return True

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)


def iter_batches(path: Path, columns: list[str] | None = None, rows: int = 4096) -> Iterator[pa.RecordBatch]:
    """Record batches of a document shard, one row group in memory at a time."""
    handle = pq.ParquetFile(path)
    yield from handle.iter_batches(batch_size=rows, columns=columns)


def iter_rows(path: Path, columns: list[str] | None = None, rows: int = 4096) -> Iterator[dict]:
    for batch in iter_batches(path, columns, rows):
        yield from batch.to_pylist()


def count_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


@dataclass
class Quarantine:
    """Records a stage could not use, one JSON line each, written next to the shard."""

    path: Path
    counts: dict[str, int] = field(default_factory=dict)
    _handle: object = None

    def add(self, reason: str, source: str, file: str, record: str | int, detail: str = "", sample: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path.with_name(self.path.name + ".tmp"), "w", encoding="utf-8")
        entry = {"source": source, "file": file, "record": record, "reason": reason,
                 "detail": detail, "sample": sample[:SAMPLE_CHARS]}
        self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def close(self) -> bool:
        if self._handle is None:
            return False
        self._handle.close()
        os.replace(self.path.with_name(self.path.name + ".tmp"), self.path)
        return True


# --- length histograms (characters per document), shared by the reports ---------------------
LENGTH_EDGES = (0, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 1_000_000)


def length_bin(n: int) -> int:
    """Index of the histogram bin for a document of n characters (last bin is open)."""
    return bisect.bisect_right(LENGTH_EDGES, n) - 1


def empty_histogram() -> list[int]:
    return [0] * len(LENGTH_EDGES)


def add_histograms(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b)]


def iter_chunks(path: Path, chars: int = 1 << 18, columns: list[str] | None = None) -> Iterator[list[dict]]:
    """Rows of a shard in lists of about `chars` characters of text (for vectorized work)."""
    chunk: list[dict] = []
    size = 0
    for row in iter_rows(path, columns):
        chunk.append(row)
        size += len(row["text"])
        if size >= chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def document_files(manifest) -> list[str]:
    """The documents files of an upstream corpus artifact (`docs/*.parquet`, as every corpus
    stage writes them; other files such as dedup's duplicates.parquet are not documents)."""
    files = sorted(f.path for f in manifest.files_under("docs") if f.path.endswith(".parquet"))
    if not files:
        raise SlmError(
            f"{manifest.stage}/{manifest.key[:16]} lists no documents file (docs/*.parquet): "
            f"rerun `slm run --until {manifest.stage}` and check its report"
        )
    return files
