"""Chat data normalizers: Alpaca, ShareGPT, OpenAI, chatterbot and preference records -> messages /
pairs; bad records quarantined with reasons; the real sample files of ../shared/data all load."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.chat_data import (BadRecord, ChatDataError, add_system, load_conversations, load_pairs, reason_counts, to_messages,
                             to_pair)
from tests.chat_support import chatterbot_files

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_alpaca_with_input_system_and_history():
    rec = {"instruction": "翻译", "input": "hello", "output": "你好", "system": "你是翻译",
           "history": [["在吗", "在的"]]}
    assert to_messages(rec, "alpaca") == [
        {"role": "system", "content": "你是翻译"}, {"role": "user", "content": "在吗"},
        {"role": "assistant", "content": "在的"}, {"role": "user", "content": "翻译\nhello"},
        {"role": "assistant", "content": "你好"}]


def test_sharegpt_and_openai_multi_turn():
    share = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                               {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}
    openai = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                           {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                           {"role": "assistant", "content": "d"}]}
    assert to_messages(share, "sharegpt") == to_messages(openai, "openai")
    assert [m["role"] for m in to_messages(openai, "openai")] == ["system", "user", "assistant", "user", "assistant"]


def test_default_system_prompt_only_where_none_is_given():
    plain = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    own = [{"role": "system", "content": "own"}] + plain
    assert add_system(plain, "default")[0] == {"role": "system", "content": "default"}
    assert add_system(own, "default") == own and add_system(plain, None) == plain


@pytest.mark.parametrize("rec, fmt, reason", [
    ({"instruction": "", "output": "x"}, "alpaca", "empty or non-text instruction"),
    ({"instruction": "q"}, "alpaca", "empty or non-text output"),
    ({"conversations": [{"from": "gpt", "value": "x"}]}, "sharegpt", "turn 1 is assistant, expected user"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "sharegpt", "ends with a user turn"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt", "unknown role 'robot'"),
    ({"messages": "hi"}, "openai", "no `messages` list"),
    (["only a question"], "chatterbot", "needs a question and an answer"),
])
def test_bad_records_say_why(rec, fmt, reason):
    with pytest.raises(BadRecord, match=reason.replace("(", r"\(")):
        to_messages(rec, fmt)


def test_preference_pairs_as_objects_or_strings():
    objects = {"conversations": [{"from": "human", "value": "问"}], "chosen": {"from": "gpt", "value": "好"},
               "rejected": {"from": "gpt", "value": "坏"}}
    strings = {"messages": [{"role": "user", "content": "问"}], "chosen": "好", "rejected": "坏"}
    a, b = to_pair(objects), to_pair(strings)
    assert a == b and a.prompt == [{"role": "user", "content": "问"}] and (a.chosen, a.rejected) == ("好", "坏")
    with pytest.raises(BadRecord, match="same text"):
        to_pair({**strings, "rejected": "好"})
    with pytest.raises(BadRecord, match="no `rejected`"):
        to_pair({"prompt": "问", "chosen": "好"})


def test_files_quarantine_bad_lines_and_reject_broken_files(tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"messages": []}) + "\n")
    convs, bad = load_conversations([(str(f), "openai")])
    assert len(convs) == 1 and [q["record"] for q in bad] == [1, 2]
    assert bad[0]["file"] == str(f) and bad[0]["reason"].startswith("not JSON (line 2:")
    assert reason_counts(bad) == {"not JSON": 1, "no user or assistant turn": 1}
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ChatDataError, match="broken.json"):
        load_conversations([(str(broken), "alpaca")])


def test_chatterbot_yaml_conversations():
    convs, bad = load_conversations(chatterbot_files())
    assert len(convs) > 400 and all(c[-1]["role"] == "assistant" for c in convs)
    assert all(len(c) % 2 == 0 for c in convs)


def test_real_sample_files_load():
    if not (DATA / "sft").is_dir():
        pytest.skip(f"{DATA} is absent (the shared real-data folder beside the project)")
    convs, bad = load_conversations([(str(DATA / "sft" / "alpaca_zh_demo.json"), "alpaca"),
                                     (str(DATA / "sft" / "identity.json"), "alpaca"),
                                     (str(DATA / "sft" / "sharegpt_zh_1K_format.jsonl"), "sharegpt")])
    assert len(convs) + len(bad) == 2091 and len(convs) > 2000
    assert max(len(c) for c in convs) > 4  # multi-turn ShareGPT conversations
    pairs, bad_pairs = load_pairs([str(DATA / "preference" / "dpo_zh_demo.json"),
                                   str(DATA / "preference" / "dpo_zh_500.jsonl")])
    assert len(pairs) + len(bad_pairs) == 800 and len(pairs) > 780
