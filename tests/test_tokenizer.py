"""tokenizer stage: byte-level BPE trained on a bounded sample, exact round trips, ChatML with
an assistant mask through stock transformers, compression reported on held-out documents.

Runs the stage through tasks.runner.run_stage on a real documents artifact (Tang poems,
Song ci, Alpaca answers from ../shared/data) committed as `dedup`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from storage.artifacts import ArtifactStore
from tasks.stages import tokenizer as stage
from tasks.runner import run_stage
from token_corpus import EDGE_CASES, corpus_records, documents_artifact, stage_profile

FILES = ["corpus/song-ci-simplified/ci.song.0.json", "corpus/song-ci-simplified/ci.song.1000.json",
         "corpus/tang-traditional/poet.tang.0.json", "corpus/tang-traditional/poet.tang.1000.json"]
SETTINGS = {"vocab_size": 2048, "sample_chars": 300_000, "heldout_chars": 40_000}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(store, documents manifest, tokenizer manifest, tokenizer directory)"""
    home = tmp_path_factory.mktemp("tok-home")
    store = ArtifactStore(str(home / "artifacts"), home)
    records = corpus_records(FILES, alpaca=500)
    records += [{"id": f"edge-{i}", "source": "edge", "title": "", "text": t} for i, t in enumerate(EDGE_CASES)]
    docs = documents_artifact(store, [records[: len(records) // 2], records[len(records) // 2:]])
    manifest = run_stage(stage.STAGE, stage_profile(store.root, tokenizer=SETTINGS), {"dedup": docs}, store)
    return store, docs, manifest, Path(store._dir("tokenizer", manifest.key))


def test_round_trip_is_exact_for_any_text(trained):
    _, _, _, directory = trained
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    texts = EDGE_CASES + [r["text"] for r in corpus_records(FILES[:1])[:300]]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    # every byte is in the vocabulary: an unseen script still encodes, and round trips
    unseen = "ᚠᛇᚻ᛫ᛒᛦᚦ ꦲꦏ꧀ꦱꦫ 𓀀𓁐"
    assert tok.decode(tok.encode(unseen).ids) == unseen
    assert tok.normalizer is None  # nothing may change the text


def test_vocab_special_tokens_and_manifest(trained):
    _, _, manifest, directory = trained
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert tok.get_vocab_size() == SETTINGS["vocab_size"] == manifest.extra["vocab_size"]
    named = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<think>", "</think>"]
    for i, token in enumerate(named + [f"<|reserved_{k}|>" for k in range(8)]):
        assert tok.token_to_id(token) == i
        assert manifest.extra["special_tokens"][token] == i
    assert (manifest.extra["eos_id"], manifest.extra["pad_id"], manifest.extra["im_end_id"]) == (0, 3, 2)
    # a special token is one id in chat text
    assert tok.encode("<|im_start|>user").ids[0] == 1
    assert {e.path for e in manifest.files} == {"tokenizer.json", "tokenizer_config.json", "report.md"}
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == stage.CHAT_TEMPLATE and config["eos_token"] == "<|endoftext|>"


def test_chat_template_and_assistant_mask_through_autotokenizer(trained):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(trained[3]))
    messages = [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "床前明月光的下一句是什么？"},
        {"role": "assistant", "content": "疑是地上霜。"},
        {"role": "user", "content": "作者是谁？"},
        {"role": "assistant", "content": "李白，唐代诗人。"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "不客气 :)"},
    ]
    expected = (
        "<|im_start|>system\n你是一个乐于助人的助手。<|im_end|>\n"
        "<|im_start|>user\n床前明月光的下一句是什么？<|im_end|>\n"
        "<|im_start|>assistant\n疑是地上霜。<|im_end|>\n"
        "<|im_start|>user\n作者是谁？<|im_end|>\n"
        "<|im_start|>assistant\n李白，唐代诗人。<|im_end|>\n"
        "<|im_start|>user\nThanks!<|im_end|>\n"
        "<|im_start|>assistant\n不客气 :)<|im_end|>\n"
    )
    assert hf.apply_chat_template(messages, tokenize=False) == expected
    prompt = hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\n床前明月光的下一句是什么？<|im_end|>\n<|im_start|>assistant\n")

    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert hf.decode(ids) == expected
    spans, current = [], []
    for token, flag in zip(ids, mask):
        if flag:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [hf.decode(s) for s in spans] == replies  # exactly the replies and their end tokens
    assert all(s[-1] == hf.convert_tokens_to_ids("<|im_end|>") for s in spans)


def test_sample_is_bounded_and_spread_over_the_corpus(trained):
    store, docs, manifest, _ = trained
    corpus = manifest.extra["corpus"]
    assert corpus["chars"] > SETTINGS["sample_chars"]  # the corpus is larger than the bound
    assert SETTINGS["sample_chars"] * 0.9 <= manifest.counts["sample_chars"] <= SETTINGS["sample_chars"]
    # the stream the trainer consumed: bounded, and drawn from the whole corpus (both files)
    cfg = stage.TokenizerSettings(**SETTINGS)
    paths = [store.local_path(docs, rel) for rel in stage.document_files(docs)]
    out = store.begin("tokenizer", "s" * 64)  # a working directory of its own: the units' files go there
    _, train_files, _ = stage.draw_sample(out, paths, cfg)
    taken = {"docs": 0, "chars": 0}
    sample = list(stage.training_texts(train_files, cfg, taken))
    assert sum(map(len, sample)) == taken["chars"] == manifest.counts["sample_chars"]
    first, second = (set(r["text"] for r in part) for part in _records_of(store, docs))
    assert sum(t in first for t in sample) > 100 and sum(t in second for t in sample) > 100


def test_compression_is_reported_on_held_out_documents(trained):
    _, _, manifest, directory = trained
    comp = manifest.extra["compression"]
    assert comp["chars"] >= SETTINGS["heldout_chars"] * 0.9 and comp["docs"] > 50
    assert set(comp["by_source"]) >= {"alpaca", "song-ci-simplified", "tang-traditional"}
    # a 2048 vocabulary over CJK text: about one character per token, ~2.6 UTF-8 bytes per token
    assert 0.8 < comp["chars_per_token"] < 2.0 and 2.0 < comp["bytes_per_token"] < 5.0
    assert manifest.counts["sample_chars"] + comp["chars"] <= manifest.extra["corpus"]["chars"]
    report = (directory / "report.md").read_text(encoding="utf-8")
    assert "chars/token" in report and "alpaca" in report


def test_split_is_llama_cpps_qwen2_and_multi_character_tokens_exist(trained):
    from model.gguf_export import llama_cpp_pre_tokenizer

    directory = trained[3]
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    text = "中华人民共和国成立了，2024年 Hello world's\n\n  ok"
    pieces = [text[a:b] for _, (a, b) in tok.pre_tokenizer.pre_tokenize_str(text)]
    assert pieces == ["中华人民共和国成立了", "，", "2", "0", "2", "4", "年", " Hello", " world", "'s", "\n\n", " ", " ok"]
    # the GGUF export finds the llama.cpp pre-tokenizer that splits the same (tests/test_export.py runs it)
    assert llama_cpp_pre_tokenizer(json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))) == "qwen2"
    words = [tok.decode([i]) for i in range(tok.get_vocab_size())]
    multi = [w for w in words if len(w) >= 2 and all("\u4e00" <= c <= "\u9fff" for c in w)]
    assert len(multi) > 50, multi[:20]


def test_same_settings_train_the_same_tokenizer(trained, tmp_path):
    store, docs, manifest, directory = trained
    other = ArtifactStore(str(tmp_path / "other"), tmp_path)
    docs2 = documents_artifact(other, _records_of(store, docs))
    again = run_stage(stage.STAGE, stage_profile(other.root, tokenizer=SETTINGS), {"dedup": docs2}, other)
    assert again.key == manifest.key
    assert {e.path: e.sha256 for e in again.files} == {e.path: e.sha256 for e in manifest.files}


def _records_of(store, docs):
    import pyarrow.parquet as pq

    parts = []
    for rel in stage.document_files(docs):
        parts.append(pq.read_table(store.local_path(docs, rel), columns=["id", "source", "title", "text"]).to_pylist())
    return parts


def test_empty_corpus_fails_naming_the_upstream(tmp_path):
    store = ArtifactStore(str(tmp_path / "a"), tmp_path)
    docs = documents_artifact(store, [[{"id": "1", "source": "s", "title": "", "text": ""}]], name="empty")
    with pytest.raises(stage.TokenizerError, match=r"dedup/[0-9a-f]{16}: the corpus has no text"):
        run_stage(stage.STAGE, stage_profile(store.root, tokenizer=SETTINGS), {"dedup": docs}, store)
    assert [a for a in store.list_artifacts() if a[0] == "tokenizer" and a[2]] == []
