"""Text helpers shared by normalize, clean and dedup.

clean_unicode(text)    NFC; control, zero-width, bidi and BOM characters removed; every kind
                       of space -> " ", runs collapsed, lines stripped, at most one blank line;
                       a space between two Han characters (or CJK punctuation) removed; full-width ASCII letters and
                       digits -> ASCII (optional). Chinese full-width punctuation (，。！？：；「」
                       『』（）etc.) is kept as it is.
Converter(target, backend)  traditional -> simplified with zhconv (default) or OpenCC. Both
                       would turn 「」『』 into “”‘’; they are shielded so they stay.
script_lang(text)      "zh" for Han text, "und-Latn" for Latin-script text, "und" otherwise.
tokenize(texts)        vectorized tokens for a batch of documents: each Han character is a
                       token, each run of letters/digits of other scripts is a token (lower
                       case); punctuation and spaces are not tokens. Token ids are 64-bit
                       polynomial hashes of the word's code points (a Han token's id is its
                       code point). No Python loop per token.
ngram_hashes(tokens,n) 64-bit hashes of every n consecutive tokens inside one document
                       (murmur3's fmix64 over a polynomial combination), vectorized.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np

HAN_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F))
HAN_CLASS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
HAN_RE = re.compile(f"[{HAN_CLASS}]")
LATIN_RE = re.compile(r"[A-Za-z\u00c0-\u024f]")
TERMINAL = frozenset("。！？!?.…")  # a line "ends a sentence" with one of these
CLOSERS = "」』”’\"'）)》〉】"  # may follow the terminal mark: 他说：「好。」

# --- Unicode cleanup --------------------------------------------------------------------------
_REMOVE = [c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)] + list(range(0x7F, 0xA0)) + [
    0x00AD, 0x061C, 0x180E, 0x200B, 0x200C, 0x200D, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D,
    0x202E, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0x2066, 0x2067, 0x2068, 0x2069, 0xFEFF,
    *range(0xFDD0, 0xFDF0),  # noncharacters: reserved below as placeholders
]
_SPACES = [0x09, 0x00A0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000]
_NEWLINES = [0x0B, 0x0C, 0x2028, 0x2029, 0x0D]
_TABLE: dict[int, str | None] = {c: None for c in _REMOVE}
_TABLE.update({c: " " for c in _SPACES})
_TABLE.update({c: "\n" for c in _NEWLINES})
_HALFWIDTH = {c: chr(c - 0xFEE0) for c in [*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B)]}
_TABLE_HALF = {**_TABLE, **_HALFWIDTH}
_CRLF = re.compile(r"\r\n?")
_SPACE_RUN = re.compile(r" {2,}")
_LINE_EDGE = re.compile(r" *\n *")
_BLANK_RUN = re.compile(r"\n{3,}")
_CJK = HAN_CLASS + "\u3000-\u303f\uff00-\uffef\u2018-\u201d\u2026\u2014"  # Han and CJK punctuation
_HAN_GAP = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}])")


def clean_unicode(text: str, halfwidth_alnum: bool = True) -> str:
    text = unicodedata.normalize("NFC", _CRLF.sub("\n", text))
    text = text.translate(_TABLE_HALF if halfwidth_alnum else _TABLE)
    text = _SPACE_RUN.sub(" ", text)
    text = _LINE_EDGE.sub("\n", text)
    text = _HAN_GAP.sub("", text)
    text = _BLANK_RUN.sub("\n\n", text)
    return text.strip()


# --- traditional -> simplified ----------------------------------------------------------------
_SHIELD = {ord(c): chr(0xFDD0 + i) for i, c in enumerate("「」『』｢｣")}
_UNSHIELD = {v: chr(k) for k, v in ((k, ord(v)) for k, v in _SHIELD.items())}
_OPENCC_CONFIG = {"zh-hans": "t2s", "zh-cn": "tw2sp"}


class Converter:
    """Traditional -> simplified. target: zh-cn (mainland wording too), zh-hans (script only), none."""

    def __init__(self, target: str, backend: str = "zhconv"):
        self.target, self.backend = target, backend
        self._opencc = None
        if target == "none":
            return
        if backend == "opencc":
            import opencc

            self._opencc = opencc.OpenCC(_OPENCC_CONFIG[target])
        elif backend == "zhconv":
            import zhconv

            self._zhconv = zhconv.convert
        else:
            raise ValueError(f"unknown conversion backend {backend!r}")

    def __call__(self, text: str) -> str:
        if self.target == "none" or not text:
            return text
        shielded = text.translate(_SHIELD)
        if self._opencc is not None:
            converted = self._opencc.convert(shielded)
        else:
            converted = self._zhconv(shielded, self.target)
        return converted.translate(_UNSHIELD)


def script_lang(text: str) -> str:
    han = len(HAN_RE.findall(text))
    latin = len(LATIN_RE.findall(text))
    if han == 0 and latin == 0:
        return "und"
    return "zh" if 3 * han >= latin else "und-Latn"


def han_count(text: str) -> int:
    return len(HAN_RE.findall(text))


def ends_sentence(line: str) -> bool:
    """Does the line end a sentence? 。！？!?.… maybe followed by closing quotes, or such a
    sentence followed by a note in brackets: ……气氛。（新华社记者摄）"""
    line = line.rstrip()
    if line.endswith(("）", ")")):
        opening = max(line.rfind("（"), line.rfind("("))
        if opening > 0 and _ends(line[:opening]):
            return True
    return _ends(line)


def _ends(line: str) -> bool:
    line = line.rstrip().rstrip(CLOSERS)
    return bool(line) and line[-1] in TERMINAL


# --- vectorized tokens and n-grams --------------------------------------------------------------
_M = np.uint64(0x100000001B3)  # odd multiplier of the word hash (FNV prime)
MAX_WORD = 64  # characters of a word that its hash covers
_Q = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier combining token ids into n-grams
_S33 = np.uint64(33)
_F1 = np.uint64(0xFF51AFD7ED558CCD)
_F2 = np.uint64(0xC4CEB9FE1A85EC53)


def fmix64(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finalizer: full avalanche, so nearby inputs give unrelated outputs."""
    h = h ^ (h >> _S33)
    h = h * _F1
    h ^= h >> _S33
    h *= _F2
    h ^= h >> _S33
    return h


@dataclass
class Tokens:
    ids: np.ndarray  # uint64 [T] token hash
    doc: np.ndarray  # int64 [T] index of the document in the batch (ascending)
    length: np.ndarray  # int64 [T] characters in the token
    n_docs: int

    def per_doc(self) -> np.ndarray:
        return np.bincount(self.doc, minlength=self.n_docs)

    def chars_per_doc(self) -> np.ndarray:
        return np.bincount(self.doc, weights=self.length, minlength=self.n_docs).astype(np.int64)


def _in_ranges(cp: np.ndarray, ranges) -> np.ndarray:
    mask = np.zeros(cp.shape, dtype=bool)
    for lo, hi in ranges:
        mask |= (cp >= lo) & (cp <= hi)
    return mask


_WORD_RANGES = ((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x24F),
                (0x370, 0x3FF), (0x400, 0x52F), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0xFF10, 0xFF19),
                (0xFF21, 0xFF3A), (0xFF41, 0xFF5A))


def tokenize(texts: list[str]) -> Tokens:
    """Tokens of a batch of documents, in document order. Memory: ~40 bytes per character."""
    if not texts:
        empty = np.zeros(0, dtype=np.int64)
        return Tokens(empty.astype(np.uint64), empty, empty, 0)
    joined = "\x00".join(t.replace("\x00", "") for t in texts)
    cp = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    is_han = _in_ranges(cp, HAN_RANGES)
    is_word = _in_ranges(cp, _WORD_RANGES)
    cp = np.where((cp >= 0x41) & (cp <= 0x5A), cp + 32, cp)  # ASCII lower case
    edges = np.diff(is_word.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    word_start = np.flatnonzero(edges == 1)
    word_len = np.flatnonzero(edges == -1) - word_start
    is_start = is_han.copy()
    is_start[word_start] = True
    positions = np.flatnonzero(is_start)  # token starts, already in text order
    id_at = np.zeros(len(cp), dtype=np.uint64)
    id_at[is_han] = cp[is_han]  # a Han token's id is its code point
    id_at[word_start] = _word_hashes(cp, word_start, word_len)
    len_at = np.zeros(len(cp), dtype=np.int64)
    len_at[is_han] = 1
    len_at[word_start] = word_len
    doc = np.cumsum(cp == 0)[positions]
    return Tokens(ids=id_at[positions], doc=doc.astype(np.int64), length=len_at[positions], n_docs=len(texts))


def _word_hashes(cp: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Polynomial hash (mod 2^64) of each word's code points, mixed with its length.

    Horner's rule over all words at once, longest first; the first MAX_WORD characters count.
    """
    out = np.zeros(len(starts), dtype=np.uint64)
    if not len(starts):
        return out
    order = np.argsort(-lengths, kind="stable")
    s, n = starts[order], np.minimum(lengths[order], MAX_WORD)
    h = np.zeros(len(s), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(int(n[0])):
            active = int(np.searchsorted(-n, -k, side="left"))  # the words longer than k: a prefix
            h[:active] = h[:active] * _M + cp[s[:active] + k]
        h = h * _M + lengths[order].astype(np.uint64)
    out[order] = h
    return out


def ngram_hashes(tokens: Tokens, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash uint64[G], doc int64[G], first token index int64[G]) of all n-grams within documents."""
    count = len(tokens.ids) - n + 1
    if count <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty.astype(np.uint64), empty, empty
    with np.errstate(over="ignore"):
        h = tokens.ids[:count].copy()
        for k in range(1, n):
            h = h * _Q + tokens.ids[k:count + k]
        h = fmix64(h)
    first = np.arange(count, dtype=np.int64)
    inside = tokens.doc[:count] == tokens.doc[n - 1:count + n - 1]
    return h[inside], tokens.doc[:count][inside], first[inside]


def short_doc_hashes(tokens: Tokens, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One hash per document that has 1..n-1 tokens (all its tokens combined): (hash, doc)."""
    per_doc = tokens.per_doc()
    short = np.flatnonzero((per_doc > 0) & (per_doc < n))
    if not len(short):
        return np.zeros(0, dtype=np.uint64), short
    first = np.concatenate([[0], np.cumsum(per_doc)])[short]
    hashes = np.zeros(len(short), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n - 1):
            valid = per_doc[short] > k
            hashes[valid] = hashes[valid] * _Q + tokens.ids[first[valid] + k]
        hashes = fmix64(hashes)
    return hashes, short
