"""Compressed sources: every format (gz, bz2, xz, zst, zip) reads whole; cut short or corrupted, it
keeps the records before the damage, quarantines the rest of the file as one counted record, and
the extract stage completes. An invalid byte in a text file costs that line, not the file."""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import zipfile
from pathlib import Path

import pytest

from corpus_support import read_docs, run_until, write_profile
from tasks.corpus import readers

N = 3000


def records(tag: str) -> bytes:
    """N JSON lines of varied text (so the compressed stream is long enough to cut mid-way)."""
    lines = [json.dumps({"text": f"{tag}第{i}条：" + "".join(chr(0x4E00 + (i * 7919 + j * 104729) % 20000) for j in range(40))},
                        ensure_ascii=False) for i in range(N)]
    return ("\n".join(lines) + "\n").encode()


def zstd(data: bytes) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as stream:
        stream.write(data)
    return sink.getvalue().to_pybytes()


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


COMPRESS = {"gz": gzip.compress, "bz2": lambda data: bz2.compress(data, 1),  # 100 kB blocks: a cut keeps some
            "xz": lzma.compress, "zst": zstd, "zip": lambda data: zipped({"part.jsonl": data})}


def read_all(path: Path, fmt: str = "jsonl") -> list:
    return list(readers.read(fmt, path, 0, path.stat().st_size, 10**6))


@pytest.mark.parametrize("ext", sorted(COMPRESS))
def test_whole_and_truncated_archives(tmp_path, ext):
    data = records(ext)
    packed = COMPRESS[ext](data)
    whole = tmp_path / f"whole.jsonl.{ext}"
    whole.write_bytes(packed)
    assert readers.infer_format(whole.name) == "jsonl"
    full = read_all(whole)
    assert len(full) == N and all(isinstance(r, readers.Doc) for r in full)

    cut = tmp_path / f"cut.jsonl.{ext}"
    cut.write_bytes(packed[: len(packed) // 2])
    got = read_all(cut)
    docs = [r for r in got if isinstance(r, readers.Doc)]
    bad = [r for r in got if isinstance(r, readers.Bad)]
    assert [b.reason for b in bad] == ["truncated-archive"] and got[-1] is bad[0]
    assert "the rest of the file is quarantined" in bad[0].detail
    if ext == "zip":  # a zip's directory is at its end: a cut zip has no readable member
        assert docs == []
    else:  # what came before the cut is kept, with the same keys as in the whole file
        assert 0 < len(docs) < N
        assert [(d.key, d.text) for d in docs] == [(d.key, d.text) for d in full[: len(docs)]]


@pytest.mark.parametrize("ext", ["gz", "bz2", "xz", "zip"])
def test_corrupt_archive_quarantines_the_rest(tmp_path, ext):
    """A flipped byte mid-stream: the formats with checks (deflate, bz2 and xz checks, zip CRC)
    end the file with one counted record; nothing raises."""
    packed = bytearray(COMPRESS[ext](records(ext)))
    middle = len(packed) // 2
    packed[middle] ^= 0xFF
    path = tmp_path / f"flip.jsonl.{ext}"
    path.write_bytes(bytes(packed))
    got = read_all(path)
    bad = [r for r in got if isinstance(r, readers.Bad)]
    assert bad and bad[-1].reason in ("corrupt-archive", "truncated-archive") and got[-1] is bad[-1]


def test_zip_members_in_order_and_a_damaged_member_does_not_cost_the_others(tmp_path):
    first, second = records("甲"), records("乙")
    packed = bytearray(zipped({"b/second.jsonl": second, "a/first.jsonl": first}))
    path = tmp_path / "two.jsonl.zip"
    path.write_bytes(bytes(packed))
    got = read_all(path)
    assert [r.key for r in got[:1]] == ["a/first.jsonl:0"] and len(got) == 2 * N
    # Damage the second member's compressed data (it is stored after the first).
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("b/second.jsonl")
    packed[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(packed))
    got = read_all(path)
    kept = [r for r in got if isinstance(r, readers.Doc) and r.key.startswith("a/first.jsonl:")]
    bad = [r for r in got if isinstance(r, readers.Bad)]
    assert len(kept) == N  # the first member is whole
    # The damaged member: garbled lines are quarantined one by one, and its end is counted as corrupt.
    assert bad and all(b.key.startswith("b/second.jsonl:") for b in bad)
    assert got[-1] is bad[-1] and bad[-1].reason == "corrupt-archive"


def test_an_invalid_byte_in_a_text_file_costs_one_line(tmp_path):
    path = tmp_path / "essay.txt"
    path.write_bytes("第一行很好。\n".encode() + b"\xff\xfe broken\n" + "第三行也很好。\n".encode())
    got = read_all(path, "text")
    (bad,) = [r for r in got if isinstance(r, readers.Bad)]
    (doc,) = [r for r in got if isinstance(r, readers.Doc)]
    assert bad.reason == "invalid-utf8" and bad.key == "0@19"
    assert doc.text == "第一行很好。\n第三行也很好。" and doc.title == "essay"
    gz = tmp_path / "essay.txt.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [(type(r).__name__, getattr(r, "text", None)) for r in read_all(gz, "text")] == \
        [(type(r).__name__, getattr(r, "text", None)) for r in got]


def test_extract_completes_over_damaged_archives_and_counts_them(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for ext, compress in COMPRESS.items():
        packed = compress(records(ext))
        (folder / f"cut.jsonl.{ext}").write_bytes(packed[: len(packed) // 2])
    (folder / "good.jsonl.zst").write_bytes(zstd(records("好")))
    (folder / "essay.txt").write_bytes("第一行很好。\n".encode() + b"\xff\n" + "第三行也很好。\n".encode())
    profile = write_profile(tmp_path, {"mixed": {"kind": "local", "path": str(folder)}})
    made, store = run_until(profile, "extract")
    manifest = made["extract"]
    assert manifest.dropped["truncated-archive"] == 5
    assert manifest.dropped["invalid-utf8"] == 1
    docs = read_docs(store, manifest)
    files = {d["id"].split("#")[0].removeprefix("mixed/") for d in docs}
    assert {"cut.jsonl.gz", "cut.jsonl.bz2", "cut.jsonl.xz", "cut.jsonl.zst", "good.jsonl.zst", "essay.txt"} <= files
    assert sum(1 for d in docs if d["id"].startswith("mixed/good.jsonl.zst#")) == N
    assert any(d["text"] == "第一行很好。\n第三行也很好。" for d in docs)
    quarantined = [json.loads(line) for entry in manifest.files_under("quarantine")
                   for line in store.local_path(manifest, entry.path).read_text("utf-8").splitlines()]
    assert sorted(q["file"] for q in quarantined if q["reason"] == "truncated-archive") == \
        sorted(f"cut.jsonl.{ext}" for ext in COMPRESS)


def test_a_cut_parquet_source_is_quarantined_not_a_crash(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"第{i}篇" for i in range(100)]}), path)
    path.write_bytes(path.read_bytes()[:-40])  # the footer is gone
    (bad,) = read_all(path, "parquet")
    assert bad.reason == "corrupt-archive" and "not readable as parquet" in bad.detail
