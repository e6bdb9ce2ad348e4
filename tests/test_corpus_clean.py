"""clean: each named rule drops what it should, thresholds come from the profile, the report shows samples."""
from __future__ import annotations

import json
import random

import numpy as np

from corpus_support import artifact_dir, read_docs, run_until, write_profile
from tasks.stages.clean import _repeat_fractions, _top_fractions, evaluate, CleanSettings
from tasks.corpus.text import tokenize

GOOD = [
    "北京举行新年音乐会。\n党和国家领导人与首都各界群众一起欣赏了新年音乐会的精彩演出。\n演出结束后，领导人走上舞台，亲切会见了全体演职人员。",
    "受暖湿气流影响，今天晚上到明天，江南和华南西部将有小到中雨。\n新疆北部、甘肃西部将有大风降温天气。（新华社记者摄）",
    "他说：「今年的工作重点是稳定增长。」\n会议要求各地认真落实各项措施，确保完成全年目标任务！",
]
BAD = {
    "min_chars": "太短了。",
    "min_cjk_fraction": "This is an English paragraph about the weather in the city, with no Chinese at all.",
    "min_line_punct_fraction": "今天的天气非常好\n我们一起去公园散步吧\n公园里有很多人在锻炼身体\n孩子们在草地上快乐地奔跑",
    "max_dup_line_fraction": "欢迎光临本店。\n欢迎光临本店。\n欢迎光临本店。\n本店今天有新品上市，欢迎大家选购。",
    "max_dup_ngram_fraction": "第一天：今天天气很好我们一起去公园散步吧。\n第二天：今天天气很好我们一起去公园散步吧。\n"
                              "第三天：今天天气很好我们一起去公园散步吧。\n第四天下雨了，大家都待在家里看书。",
    "max_top_ngram_fraction": "我爱你中国，我爱你长城，我爱你黄河，我爱你长江，我爱你人民。",
    "max_boilerplate_fraction": "版权所有 © 2024 某某网\n联系我们\n上一篇：春节放假通知\n下一篇：元宵节活动安排\n"
                                "本站提供最新的新闻资讯和生活服务信息，欢迎访问。\n我们致力于为读者带来有价值的内容。",
    "max_chars": "很长的文章。" * 40,
}


def test_each_rule_drops_its_document_and_counts_it(tmp_path):
    source = tmp_path / "docs.jsonl"
    records = [{"text": t, "title": "good"} for t in GOOD] + [{"text": t, "title": rule} for rule, t in BAD.items()]
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    profile = write_profile(tmp_path, {"docs": {"kind": "local", "path": str(source)}},
                            stages={"clean": {"max_chars": 200}})
    made, store = run_until(profile, "clean")
    manifest = made["clean"]
    assert manifest.dropped == {rule: 1 for rule in BAD}
    kept = read_docs(store, manifest)
    assert sorted(d["text"] for d in kept) == sorted(GOOD)
    report = (artifact_dir(store, manifest) / "report.md").read_text(encoding="utf-8")
    assert "| min_line_punct_fraction | 0.106 | 1 |" in report
    assert "| max_chars | 200 | 1 |" in report
    for rule in BAD:  # one dropped example per rule, with the document's id
        assert any(line.startswith(f"| {rule} | docs/docs.jsonl#") for line in report.splitlines()), rule
    assert manifest.extra["rules"]["max_dup_ngram_fraction"]["8"] == 0.198

    # Thresholds are the profile's: loosen two rules and their documents stay; the key changes.
    loose = write_profile(tmp_path, {"docs": {"kind": "local", "path": str(source)}},
                          stages={"clean": {"max_chars": 200, "min_chars": 2, "max_dup_line_fraction": None}},
                          name="loose")
    again, _ = run_until(loose, "clean")
    assert again["clean"].key != manifest.key and again["normalize"].key == made["normalize"].key
    # "太短了。" now passes; the repeated lines are still repeated n-grams, caught by the next rule
    expected = {rule: 1 for rule in BAD if rule not in ("min_chars", "max_dup_line_fraction")}
    expected["max_dup_ngram_fraction"] = 2
    assert again["clean"].dropped == expected
    assert again["clean"].counts["out"] == manifest.counts["out"] + 1


def reference_repeat_fraction(tokens: list[str], n: int) -> float:
    """Gopher's duplicate n-gram share, the plain way: characters of tokens inside any repeat."""
    seen, covered = set(), [False] * len(tokens)
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            covered[i:i + n] = [True] * n
        seen.add(gram)
    total = sum(len(t) for t in tokens)
    return sum(len(t) for t, c in zip(tokens, covered) if c) / max(total, 1)


def reference_top_fraction(tokens: list[str], n: int) -> float:
    counts: dict[tuple, int] = {}
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
    best = max((c * sum(len(t) for t in g) for g, c in counts.items() if c > 1), default=0)
    return best / max(sum(len(t) for t in tokens), 1)


def test_vectorized_ngram_statistics_match_a_plain_python_reference():
    import re

    rng = random.Random(7)
    words = ["中", "国", "人", "民", "好", "天", "气", "alpha", "beta", "gamma", "1998"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 60))) for _ in range(200)]
    texts += list(BAD.values()) + GOOD
    tokens = tokenize(texts)
    total = tokens.chars_per_doc()
    repeat = _repeat_fractions(tokens, total, [2, 5, 8])
    top = _top_fractions(tokens, total, [2, 3])
    split = re.compile(r"[\u4e00-\u9fff]|[a-z0-9]+")
    for i, text in enumerate(texts):
        plain = split.findall(text.lower())
        for n in (2, 5, 8):
            assert np.isclose(repeat[n][i], reference_repeat_fraction(plain, n)), (text, n)
        for n in (2, 3):
            assert np.isclose(top[n][i], reference_top_fraction(plain, n)), (text, n)


def test_rules_apply_in_order_and_report_the_measured_value():
    verdicts = evaluate(GOOD + list(BAD.values()), CleanSettings(max_chars=200))
    assert verdicts[: len(GOOD)] == [None] * len(GOOD)
    assert [v[0] for v in verdicts[len(GOOD):]] == list(BAD)
    assert verdicts[len(GOOD)][1] == 4  # "太短了。": 4 characters
