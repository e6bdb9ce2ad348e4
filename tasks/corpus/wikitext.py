"""MediaWiki `pages-articles` XML dumps -> articles as plain text.

stream_ranges(path, target_bytes)
    Byte ranges of a .xml.bz2 dump that can be decompressed on their own. A multistream
    dump (zhwiki-*-pages-articles-multistream.xml.bz2) is a chain of bz2 streams of 100
    pages each; their starts are found by scanning for the bz2 stream header followed by
    the block magic, and neighbouring streams are grouped into ranges of ~target_bytes.
    A single-stream dump (or plain .xml) is one range. Memory: the scan reads 16 MB blocks.
iter_pages(path, start, end)
    Decompresses one range chunk by chunk, cuts out each <page>...</page> and parses it
    on its own (ElementTree), so a range may start at any stream of the dump and memory
    holds one page plus one decompressed chunk. Yields Page or PageError (a page that is
    not well-formed XML, an archive that is truncated or corrupt: what was read before
    the damage is kept).
wikitext_to_text(source)
    mwparserfromhell's parse tree rendered to plain text: templates, <ref> and other
    non-prose tags, tables, comments, files/images, categories and interlanguage links are
    dropped; links keep their label, headings become their own line; zhwiki's language
    variant markup -{zh-hans:...;zh-hant:...}- keeps the simplified variant.
"""
from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mwparserfromhell
from mwparserfromhell.nodes import Comment, ExternalLink, Heading, HTMLEntity, Tag, Template, Text, Wikilink
from mwparserfromhell.nodes import Argument

STREAM_MAGIC = re.compile(rb"BZh[1-9]1AY&SY")
SCAN_BLOCK = 16 << 20
READ_CHUNK = 1 << 20
REDIRECT_RE = re.compile(r"^\s*#\s*(redirect|重定向)", re.IGNORECASE)

DROP_TAGS = frozenset({
    "ref", "references", "gallery", "math", "chem", "ce", "timeline", "imagemap", "score", "graph",
    "templatedata", "syntaxhighlight", "source", "table", "noinclude", "includeonly", "onlyinclude",
    "mapframe", "maplink", "inputbox", "categorytree", "indicator", "templatestyles", "hiero", "poem-",
})
LINE_TAGS = frozenset({"br", "p", "li", "dt", "dd", "div", "tr"})
DROP_NAMESPACES = frozenset({
    "file", "image", "media", "category", "文件", "檔案", "档案", "图像", "圖像", "分类", "分類",
    "template", "模板", "help", "帮助", "wikipedia", "wp", "维基百科", "portal", "主题", "special", "user",
    "wikt", "wiktionary", "commons", "s", "q", "b", "n", "v", "voy", "d", "m", "meta", "mw", "species",
})
INTERLANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]+){0,2}$")
MAGIC_WORD_RE = re.compile(r"__[A-Z]+__")
VARIANT_RE = re.compile(r"-\{(.*?)\}-", re.S)
LEFTOVER_TEMPLATE_RE = re.compile(r"\{\{[^{}]*\}\}")
LEFTOVER_MARKUP_RE = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}|<ref[^>]*>|</ref>")
EMPTY_PARENS_RE = re.compile(r" ?[(（][\s,;:，；、]*[)）]")  # what is left of "(pronunciation template)"
VARIANT_ORDER = ("zh-cn", "zh-hans", "zh", "zh-sg", "zh-my", "zh-hant", "zh-tw", "zh-hk", "zh-mo")


@dataclass
class Page:
    page_id: str
    title: str
    ns: int
    redirect: bool
    text: str  # wikitext


@dataclass
class PageError:
    reason: str  # bad-xml, truncated-archive, corrupt-archive
    detail: str
    sample: str
    offset: int  # byte offset in the compressed file (range start, for archive errors)


# --- ranges -------------------------------------------------------------------------------------
def stream_ranges(path: Path, target_bytes: int) -> list[tuple[int, int]]:
    size = path.stat().st_size
    if not path.name.endswith(".bz2"):
        return [(0, size)]
    starts = []
    with open(path, "rb") as handle:
        offset, tail = 0, b""
        while block := handle.read(SCAN_BLOCK):
            data = tail + block
            base = offset - len(tail)
            starts.extend(base + m.start() for m in STREAM_MAGIC.finditer(data) if base + m.start() not in starts[-1:])
            tail = data[-9:]
            offset += len(block)
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    starts = sorted(set(starts))
    ranges, begin = [], starts[0]
    for start in starts[1:]:
        if start - begin >= target_bytes:
            ranges.append((begin, start))
            begin = start
    ranges.append((begin, size))
    return ranges


# --- pages --------------------------------------------------------------------------------------
def _decompressed_chunks(path: Path, start: int, end: int) -> Iterator[bytes | PageError]:
    """Decompressed bytes of [start, end); a PageError last if the archive is damaged."""
    if not path.name.endswith(".bz2"):
        with open(path, "rb") as handle:
            handle.seek(start)
            left = end - start
            while left > 0 and (chunk := handle.read(min(READ_CHUNK, left))):
                left -= len(chunk)
                yield chunk
        return
    with open(path, "rb") as handle:
        handle.seek(start)
        left = end - start
        decompressor = bz2.BZ2Decompressor()
        started = False  # has the current stream received any bytes?
        position = start
        while True:
            raw = handle.read(min(READ_CHUNK, left)) if left > 0 else b""
            left -= len(raw)
            if not raw:
                if started and not decompressor.eof:
                    yield PageError("truncated-archive", f"bz2 stream ends early near byte {position} "
                                    f"(file has {path.stat().st_size} bytes)", "", position)
                return
            data = raw
            while data:
                started = True
                try:
                    out = decompressor.decompress(data)
                except (OSError, ValueError, EOFError) as err:
                    yield PageError("corrupt-archive", f"bz2 data invalid near byte {position}: {err}", "", position)
                    return
                if out:
                    yield out
                if decompressor.eof:
                    data = decompressor.unused_data
                    decompressor = bz2.BZ2Decompressor()  # next stream of a multistream file
                    started = False
                else:
                    data = b""
            position += len(raw)


def iter_pages(path: Path, start: int = 0, end: int | None = None) -> Iterator[Page | PageError]:
    end = path.stat().st_size if end is None else end
    buffer = b""
    for chunk in _decompressed_chunks(path, start, end):
        if isinstance(chunk, PageError):
            yield chunk
            return
        buffer += chunk
        cut = 0
        while True:
            begin = buffer.find(b"<page>", cut)
            if begin < 0:
                cut = max(cut, len(buffer) - 6)
                break
            finish = buffer.find(b"</page>", begin)
            if finish < 0:
                cut = begin
                break
            finish += len(b"</page>")
            yield _parse_page(buffer[begin:finish])
            cut = finish
        buffer = buffer[cut:]


def _parse_page(raw: bytes) -> Page | PageError:
    try:
        node = ET.fromstring(raw)
    except ET.ParseError as err:
        sample = raw[:300].decode("utf-8", "replace")
        return PageError("bad-xml", f"page is not well-formed XML: {err}", sample, -1)
    text = node.findtext("revision/text") or ""
    ns = node.findtext("ns") or "0"
    return Page(
        page_id=node.findtext("id") or "",
        title=node.findtext("title") or "",
        ns=int(ns) if ns.lstrip("-").isdigit() else -999,
        redirect=node.find("redirect") is not None or bool(REDIRECT_RE.match(text)),
        text=text,
    )


# --- wikitext -> text ---------------------------------------------------------------------------
def _variant(match: re.Match) -> str:
    body = match.group(1)
    if ":" not in body or "|" in body.split(":", 1)[0]:
        return body.split("|")[-1] if "|" in body and re.match(r"^[A-Za-z;]+\|", body) else body
    options = {}
    for part in body.split(";"):
        if ":" in part:
            code, value = part.split(":", 1)
            options[code.strip().lower()] = value.strip()
    for code in VARIANT_ORDER:
        if code in options:
            return options[code]
    return next(iter(options.values()), "")


def _render(code, out: list[str]) -> None:
    for node in code.nodes:
        if isinstance(node, Text):
            out.append(node.value)
        elif isinstance(node, Wikilink):
            _render_link(node, out)
        elif isinstance(node, Tag):
            tag = str(node.tag).strip().lower()
            if tag in DROP_TAGS or node.wiki_markup == "{|":
                continue
            if tag in LINE_TAGS:
                out.append("\n")
            if node.contents is not None and not node.self_closing:
                _render(node.contents, out)
        elif isinstance(node, Heading):
            out.append("\n")
            _render(node.title, out)
            out.append("\n")
        elif isinstance(node, ExternalLink):
            if node.title is not None:
                _render(node.title, out)
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, (Template, Comment, Argument)):
            continue


def _render_link(node: Wikilink, out: list[str]) -> None:
    title = str(node.title).strip()
    if not title.startswith(":") and ":" in title:
        prefix = title.split(":", 1)[0].strip().lower()
        if prefix in DROP_NAMESPACES or INTERLANGUAGE_RE.match(prefix):
            return
    if node.text is not None:
        _render(node.text, out)
    else:
        out.append(title.lstrip(":").split("#")[0] or title)


def wikitext_to_text(source: str) -> str:
    source = VARIANT_RE.sub(_variant, source)
    parts: list[str] = []
    _render(mwparserfromhell.parse(source), parts)
    text = html.unescape("".join(parts))
    text = MAGIC_WORD_RE.sub("", text)
    for _ in range(5):  # malformed markup the parser left as text
        text, found = LEFTOVER_TEMPLATE_RE.subn("", text)
        if not found:
            break
    text = LEFTOVER_MARKUP_RE.sub("", text)
    text = EMPTY_PARENS_RE.sub("", text)
    lines = (line.strip() for line in text.split("\n"))
    kept = [line for line in lines if line and not _only_markup(line)]
    return "\n".join(kept)


def _only_markup(line: str) -> bool:
    """Lines left with nothing but list bullets, quote marks or pipes (e.g. from a dropped link)."""
    return not any(ch.isalnum() for ch in line)
