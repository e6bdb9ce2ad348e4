"""normalize: traditional -> simplified (zhconv, OpenCC), Unicode cleanup that keeps Chinese punctuation."""
from __future__ import annotations

import json

import pytest

from corpus_support import TANG, need, read_docs, run_until, write_profile
from tasks.corpus.text import Converter, clean_unicode, script_lang


def test_unicode_cleanup_keeps_chinese_punctuation_and_removes_invisible_characters():
    raw = "\ufeff  第一行：你\u200b好\u200d，世界\u3000！\r\n\r\n\r\n\t「引号」『书名』（括号）；？  \x07\x00 ＡＢＣ１２３ \u00a0end\u2028下一行 "
    assert clean_unicode(raw) == "第一行：你好，世界！\n\n「引号」『书名』（括号）；？ ABC123 end\n下一行"
    assert clean_unicode("ＡＢＣ１２３，。", halfwidth_alnum=False) == "ＡＢＣ１２３，。"
    assert clean_unicode("中 文 字 hello  world") == "中文字 hello world"  # spaces only go between Han characters
    assert clean_unicode(" \u200b \n\t ") == ""


@pytest.mark.parametrize("backend", ["zhconv", "opencc"])
def test_conversion_keeps_corner_brackets_and_follows_the_target(backend):
    cn = Converter("zh-cn", backend)
    hans = Converter("zh-hans", backend)
    text = "「頭髮」與『發展』，後來他說：「軟體與資訊」。"
    for convert in (cn, hans):
        out = convert(text)
        assert "「" in out and "」" in out and "『" in out and "』" in out
        assert "头发" in out and "发展" in out and "后来" in out
    assert "软件" in cn(text)  # zh-cn: mainland wording too
    assert "软体" in hans(text)  # zh-hans: characters only
    assert Converter("none", backend)(text) == text


def test_script_lang():
    assert script_lang("白日依山尽，黄河入海流。") == "zh"
    assert script_lang("Anarchism is a political philosophy.") == "und-Latn"
    assert script_lang("我用 Python 写代码") == "zh"
    assert script_lang("123，。") == "und"


def traditional_only() -> frozenset:
    """zhconv's list of characters that only traditional text uses."""
    from zhconv import zhconv as tables

    tables.getdict("zh-hans")
    return tables.zhcdicts["TRADONLY"]


@pytest.mark.parametrize("backend", ["zhconv", "opencc"])
def test_tang_poems_come_out_simplified(tmp_path, backend):
    profile = write_profile(tmp_path, {"tang": {"kind": "local", "path": str(need(TANG)), "format": "json"}},
                            stages={"extract": {"shard_mb": 2}, "normalize": {"target": "zh-hans", "backend": backend}},
                            workers=2)
    made, store = run_until(profile, "normalize")
    before = {d["id"]: d for d in read_docs(store, made["extract"])}
    after = read_docs(store, made["normalize"])
    assert len(after) == len(before) == 20377
    traditional = traditional_only()
    changed = residual = chars = 0
    for doc in after:
        source = before[doc["id"]]
        residual += sum(ch in traditional for ch in doc["text"] + doc["title"])
        chars += len(doc["text"]) + len(doc["title"])
        assert doc["lang"] == "zh"
        assert doc["text"].count("，") == source["text"].count("，") and doc["text"].count("。") == source["text"].count("。")
        assert doc["meta"] == source["meta"]
        changed += doc["text"] != source["text"]
    assert changed > 20000
    input_traditional = sum(ch in traditional for d in before.values() for ch in d["text"])
    assert input_traditional > 0.2 * chars  # the input really is traditional ...
    assert residual < 0.001 * chars  # ... and what is left are characters also used in simplified text (乾坤, 覆)
    poem = next(d for d in after if d["id"] == "tang/tangshi-300.json#1")
    assert poem["text"] == "前不见古人，后不见来者。\n念天地之悠悠，独怆然而涕下。"
    assert poem["title"] == "登幽州台歌" and json.loads(poem["meta"])["author"] == "陳子昂"  # meta is left as it came
    assert made["normalize"].extra["lineage"][0]["stage"] == "extract"
