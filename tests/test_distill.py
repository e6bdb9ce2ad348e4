"""Distillation, white-box (distill) and black-box (distill_data + distill_sft), through the real stages
(runner, artifact store, engine child process, MLflow on SQLite) on CPU with tiny models.

The teacher is a 3-layer model fine-tuned for a few seconds on chatterbot-corpus' Chinese Q/A (a
project dependency) with the tokenizer stage's tokenizer and chat template (tests/chat_support.py).
Black-box: the project's own OpenAI-compatible server (serve/api.py) serves that teacher with uvicorn on
127.0.0.1 (a free port, in a thread) and requires an API key, which the stage reads from an
environment variable; the test then looks for the key in every file of the project home."""
from __future__ import annotations

import json
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model import ModelConfig, Transformer, load_hf_dir, save_hf_dir
from model.generate import Engine, SamplingParams
from storage.artifacts import ArtifactStore
from storage.keys import stage_key
from storage.manifest import Manifest, list_files
from tasks.chat_data import FitStats, encode_conversation, fit_length, load_conversations
from tasks.distill import DistillError
from tasks.distill_data import END_THINK, THINK, render, split_reasoning
from tasks.registry import all_stages
from tasks.runner import open_tracker, run_stage
from tasks.train.chats import PackedChats, heldout_assistant_loss
from tasks.train.finetune import prepare
from tasks.train.stage import load_tokenizer
from tasks.train import checkpoint as ckpt
from tasks.train.data import IGNORE
from tasks.train.engine import TrainConfig, train
from tasks.train.objectives import SFT, Distill
from tests.app_server import serving
from tests.chat_support import chatterbot_conversations, chatterbot_files, make_model_dir, make_tokenizer_dir

SEQ = 64
STUDENT = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 96}
CHATTERBOT = [{"package": "chatterbot_corpus", "path": "data/chinese/*.yml", "format": "chatterbot"}]
GREETINGS = [{"package": "chatterbot_corpus", "path": "data/chinese/greetings.yml", "format": "chatterbot"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tokenizer, and a teacher (hidden 96, 3 layers) fine-tuned 100 steps on the Q/A (one
    thread: tiny matrices are fastest so, and immune to other processes on a busy 2-core box)."""
    root = tmp_path_factory.mktemp("distill")
    tok_dir = make_tokenizer_dir(root / "tok")
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    shape = ModelConfig(vocab_size=len(tok), hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                        intermediate_size=256, max_seq_len=256)
    init = save_hf_dir(Transformer(shape), tok_dir, root / "teacher-init")
    docs, _, _ = prepare(chatterbot_conversations(), tok, SEQ, 0.05, 0)
    cfg = TrainConfig(out_dir=str(root / "teacher-run"), steps=100, seq_len=SEQ, micro_batch=16, lr=1e-2,
                      warmup_steps=5, schedule="cosine", log_every=50, threads=1)
    train(cfg, lambda: load_hf_dir(init)[0], SFT(), PackedChats(docs, SEQ, tok.pad_token_id, 0))
    teacher = ckpt.export_hf(ckpt.latest_checkpoint(root / "teacher-run" / "checkpoints"), tok_dir, root / "teacher")
    return SimpleNamespace(root=root, tok_dir=tok_dir, tok=tok, teacher=teacher)


def artifact(store: ArtifactStore, stage: str, src: Path, under: str = "hf") -> Manifest:
    """Commit a directory as `stage`'s artifact (files under `under`/): the upstream a stage reads."""
    key = stage_key(stage, 1, {"fixture": str(src)}, {})
    out = store.begin(stage, key)
    shutil.copytree(src, out.path / under if under else out.path, dirs_exist_ok=True)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = Manifest(stage=stage, key=key, stage_version=1, files=list_files(out.path), counts={}, config={},
                        upstream={}, versions={}, started_at=now, finished_at=now, seconds=0.0, extra={"hf_dir": under})
    store.commit(out, manifest)
    return manifest


def profile(home: Path, tracking: bool = False, **stages):
    from profiles.schema import profile_model

    return profile_model().model_validate({
        "name": "distill-test", "store": {"root": str(home / "artifacts")},
        "tracking": {"enabled": tracking, "uri": f"sqlite:///{home / 'mlflow.db'}", "experiment": "t"},
        "stages": stages,
    })


def train_settings(steps: int, **more) -> dict:
    return {"seq_len": SEQ, "steps": steps, "global_batch": 8, "micro_batch": 8, "warmup_steps": min(5, steps),
            "schedule": "cosine", "threads": 1, "log_every": 10, "ckpt_every": 0, **more}


# --------------------------------------------------------------------------- objectives and templates


def test_distill_loss_and_special_token_weights_match_hand_computation(models):
    """Distill's loss = alpha CE + (1 - alpha) T^2 KL token by token; SFT with per-token weights counts
    a weighted token's loss `weight` times; a reasoning answer renders as the chat template's
    reasoning_content does, with <think> / </think> as single learnt tokens."""
    tok = models.tok
    answer, reasoning = split_reasoning("<think>先想一想问题</think>\n\n你好，很高兴认识你")
    assert (answer, reasoning) == ("你好，很高兴认识你", "先想一想问题")
    assert split_reasoning("只有结尾标记</think>答案") == ("答案", "只有结尾标记")  # R1 style: <think> in the prompt
    assert split_reasoning("没有推理") == ("没有推理", None)
    prompt = [{"role": "user", "content": "你好吗"}]
    ids, mask = encode_conversation(tok, prompt + [{"role": "assistant", "content": render(answer, reasoning)}])
    via_template, _ = encode_conversation(tok, prompt + [{"role": "assistant", "content": answer,
                                                          "reasoning_content": reasoning}])
    np.testing.assert_array_equal(ids, via_template)
    think, end = tok.convert_tokens_to_ids([THINK, END_THINK])

    data = PackedChats([(ids, mask)], len(ids) - 1, tok.pad_token_id, 0, token_weights={think: 3.0, end: 3.0})
    batch = {k: torch.from_numpy(v) for k, v in data.next_batch(1).items()}
    targets, weights = batch["targets"][0], batch["weights"][0]
    special = (targets == think) | (targets == end)
    assert special.sum() == 2 and (weights[special] == 3.0).all() and (weights[~special] == 1.0).all()

    teacher = load_hf_dir(models.teacher)[0].eval()
    torch.manual_seed(1)
    student = Transformer(ModelConfig(vocab_size=len(tok), max_seq_len=256, **STUDENT)).eval()
    with torch.no_grad():
        s_logits = student(batch["input_ids"], document_ids=batch["document_ids"])[0].double()
        t_logits = teacher(batch["input_ids"], document_ids=batch["document_ids"])[0].double()
        plain = {k: v for k, v in batch.items() if k != "weights"}
        nll = -torch.log_softmax(s_logits, -1).gather(-1, targets.clamp(min=0)[:, None])[:, 0]
        nll = torch.where(targets != IGNORE, nll, 0.0)
        assert SFT().loss(student, plain)["sum"].item() == pytest.approx(nll.sum().item(), rel=1e-4)
        assert SFT().loss(student, batch)["sum"].item() == pytest.approx((nll + 2 * nll * special).sum().item(), rel=1e-4)

        T, alpha = 2.0, 0.3
        obj = Distill(str(models.teacher), temperature=T, alpha=alpha)
        assert not any(p.requires_grad for p in obj.teacher.parameters()) and not obj.teacher.training
        expected = 0.0
        for j in torch.nonzero(targets != IGNORE)[:, 0].tolist():
            p_t = torch.softmax(t_logits[j] / T, -1)
            kl = (p_t * (torch.log(p_t) - torch.log_softmax(s_logits[j] / T, -1))).sum().item()
            expected += alpha * nll[j].item() + (1 - alpha) * T * T * kl
        assert obj.loss(student, plain)["sum"].item() == pytest.approx(expected, rel=1e-4)
        with_teacher = Distill(str(models.teacher), temperature=T, alpha=0.0).loss(teacher, plain)
        assert with_teacher["sum"].item() == pytest.approx(0.0, abs=1e-3)  # a model is its own perfect student


# --------------------------------------------------------------------------- white-box


def test_white_box_distill_lowers_the_kl_to_the_teacher_on_heldout_chats(models, slm_home):
    store = ArtifactStore(str(slm_home / "artifacts"), slm_home)
    dpo = artifact(store, "dpo", models.teacher)
    p = profile(slm_home, tracking=True, distill={
        "data": CHATTERBOT, "student": STUDENT, "temperature": 2.0, "alpha": 0.2, "val_fraction": 0.1,
        **train_settings(80, lr=5e-3)})
    tracker = open_tracker(p)
    m = run_stage(all_stages()["distill"], p, {"dpo": dpo}, store, tracker)
    before, after = m.extra["heldout_before"], m.extra["heldout_after"]
    print(f"held-out KL to the teacher {before['kl']:.3f} -> {after['kl']:.3f}; student NLL "
          f"{before['student_nll']:.3f} -> {after['student_nll']:.3f}, teacher {after['teacher_nll']:.3f}")
    assert after["kl"] < 0.4 * before["kl"]  # measured here: 1.40 -> 0.28 nats/token
    assert after["student_nll"] < before["student_nll"] - 0.5  # and it predicts the real answers better too
    assert m.counts["student_params"] < m.counts["teacher_params"] / 3 and m.counts["val"] > 20
    student = load_hf_dir(store.local_path(m, "hf/config.json").parent)[1]
    assert (student.hidden_size, student.num_layers) == (32, 2)
    assert (store.local_path(m, "hf/tokenizer.json").read_bytes() == (models.teacher / "tokenizer.json").read_bytes())

    run = tracker.client.get_run(m.mlflow_run_id)
    assert run.data.metrics["heldout_kl"] == pytest.approx(after["kl"])
    history = tracker.client.get_metric_history(m.mlflow_run_id, "heldout_kl")
    assert sorted((h.step, round(h.value, 6)) for h in history) == [(0, round(before["kl"], 6)), (80, round(after["kl"], 6))]
    assert len(tracker.client.get_metric_history(m.mlflow_run_id, "kl")) == 8  # the engine's KL at T, every 10 steps


def test_tokenizer_mismatch_and_a_student_that_is_not_smaller_fail_clearly(models, slm_home, tmp_path):
    from tests.tinychat import make_tokenizer

    store = ArtifactStore(str(slm_home / "artifacts"), slm_home)
    dpo = artifact(store, "dpo", models.teacher)
    stage = all_stages()["distill"]

    def distill(**settings):
        return run_stage(stage, profile(slm_home, distill={"data": GREETINGS, **train_settings(2), **settings}),
                         {"dpo": dpo}, store)

    other_vocab = make_model_dir(tmp_path / "other-vocab", make_tokenizer_dir(tmp_path / "tok500", vocab_size=500))
    with pytest.raises(DistillError, match=r"mismatch: the teacher .* vocabulary of 600 tokens, the student .* 500"):
        distill(init_from=str(other_vocab))

    make_tokenizer(tmp_path / "tok-reviews", vocab_size=600)  # same size, trained on other text
    same_size = make_model_dir(tmp_path / "same-size", tmp_path / "tok-reviews")
    assert load_tokenizer(same_size).vocab_size == models.tok.vocab_size
    with pytest.raises(DistillError, match=r"both have 600 tokens but different tokenizer.json files"):
        distill(init_from=str(same_size))

    with pytest.raises(DistillError, match=r"is not smaller than the teacher"):
        distill(student={"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                         "intermediate_size": 256})


# --------------------------------------------------------------------------- black-box


@pytest.fixture()
def server(models):
    """serve/api.py serving the teacher on 127.0.0.1 (a free port), API key required."""
    from serve.api import ServeConfig, create_app

    secret = f"sk-slm-test-{uuid.uuid4().hex}"
    app = create_app(models.teacher, ServeConfig(model_name="teacher-chat", api_key=secret, max_prompt_tokens=160),
                     device="cpu")
    with serving(app) as url:
        yield SimpleNamespace(url=url + "/v1", key=secret)


def test_black_box_distillation_from_an_openai_compatible_server(models, server, slm_home, tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_TEST_TEACHER_KEY", server.key)
    long_prompt = tmp_path / "long.jsonl"  # over the server's 160-token prompt limit: a 400, quarantined
    long_prompt.write_text(json.dumps({"messages": [{"role": "user", "content": "请详细解释" * 120},
                                                    {"role": "assistant", "content": "好的"}]}, ensure_ascii=False) + "\n")
    data = GREETINGS + [{"path": str(long_prompt), "format": "openai"}]
    max_new = 24
    p = profile(slm_home, tracking=True,
                distill_data={"data": data, "teacher_url": server.url, "teacher_model": "teacher-chat",
                              "api_key_env": "SLM_TEST_TEACHER_KEY", "max_new_tokens": max_new, "temperature": 0.0,
                              "concurrency": 3, "retries": 1},
                distill_sft={"special_token_weight": 2.0, "val_fraction": 0.2, **train_settings(40, lr=3e-3)})
    tracker = open_tracker(p)
    store = ArtifactStore(str(slm_home / "artifacts"), slm_home)
    made = run_stage(all_stages()["distill_data"], p, {"dpo": artifact(store, "dpo", models.teacher)}, store, tracker)

    convs, _ = load_conversations([f for f in chatterbot_files() if f[0].endswith("greetings.yml")])
    prompts = list({json.dumps(c[:-1], ensure_ascii=False): c[:-1] for c in convs}.values())
    assert made.counts["prompts"] == len(prompts) + 1 and made.counts["failures"] == 1
    assert made.counts["answers"] == len(prompts) and made.counts["duplicates"] == len(convs) - len(prompts)
    assert made.dropped == {"teacher: BadRequestError": 1, **({"duplicate prompt": made.counts["duplicates"]}
                                                            if made.counts["duplicates"] else {})}
    failed = [json.loads(line) for line in store.local_path(made, "failed_prompts.jsonl").read_text().splitlines()]
    assert len(failed) == 1 and "400" in failed[0]["reason"] and "up to 160 tokens" in failed[0]["reason"]

    records = [json.loads(line) for line in store.local_path(made, "data/train.jsonl").read_text().splitlines()]
    assert [r["messages"][:-1] for r in records] == prompts  # prompt order, the failed one left out
    reference = Engine.from_dir(models.teacher, device="cpu")
    greedy = SamplingParams(max_new_tokens=max_new, temperature=0.0)
    for r in records:
        assert r["messages"][-1]["role"] == "assistant"
        assert r["messages"][-1]["content"] == reference.chat(r["messages"][:-1], greedy).text

    # the student (a small random model with the same tokenizer stage files) learns those answers
    student = make_model_dir(tmp_path / "student", models.tok_dir)
    inputs = {"tokenizer": artifact(store, "tokenizer", models.tok_dir, under=""),
              "pretrain": artifact(store, "pretrain", student), "distill_data": made}
    tuned = run_stage(all_stages()["distill_sft"], p, inputs, store, tracker)
    docs = [fit_length(*encode_conversation(models.tok, r["messages"]), SEQ + 1, FitStats()) for r in records]
    docs = [d for d in docs if d is not None]
    before = heldout_assistant_loss(student, docs, SEQ, models.tok.pad_token_id)
    after = heldout_assistant_loss(store.local_path(tuned, "hf/config.json").parent, docs, SEQ, models.tok.pad_token_id)
    print(f"student loss on the teacher's answers {before:.3f} -> {after:.3f} nats/token")
    assert after < before - 1.0
    assert tuned.extra["heldout_loss_after"] < tuned.extra["heldout_loss_before"]
    assert tuned.extra["teacher"] == {"kind": "endpoint", "url": server.url, "model": "teacher-chat",
                                      "api_key_env": "SLM_TEST_TEACHER_KEY"}

    # the key reached the server (every answer needed it) but nothing the pipeline keeps
    assert tracker.client.get_run(made.mlflow_run_id).data.params["teacher_url"] == server.url
    secret = server.key.encode()
    kept = [f for f in slm_home.rglob("*") if f.is_file()]
    assert any(f.name == "mlflow.db" for f in kept) and any(f.name == "_MANIFEST.json" for f in kept)
    assert [f for f in kept if secret in f.read_bytes()] == []


def test_hf_teacher_answers_are_the_engines_and_reasoning_is_split(models, slm_home):
    """An HF teacher (model/generate.py Engine, batched): a seeded sample of the prompts, each answer =
    Engine.chat's greedy reply; generated ids holding a <think> block split into reasoning and answer."""
    from tasks.distill_data import decode_reply

    store = ArtifactStore(str(slm_home / "artifacts"), slm_home)
    p = profile(slm_home, distill_data={"data": GREETINGS, "teacher": str(models.teacher), "max_new_tokens": 16,
                                        "batch_size": 3, "max_prompts": 8, "reasoning": True})
    made = run_stage(all_stages()["distill_data"], p, {"dpo": artifact(store, "dpo", models.teacher)}, store)
    records = [json.loads(line) for line in store.local_path(made, "data/train.jsonl").read_text().splitlines()]
    assert made.counts["prompts"] == 8 and len(records) == made.counts["answers"] == 8 - made.counts["failures"] >= 6
    reference = Engine.from_dir(models.teacher, device="cpu")
    for r in records:
        expected = reference.chat(r["messages"][:-1], SamplingParams(max_new_tokens=16, temperature=0.0)).text
        assert r["messages"][-1]["content"] == expected
    assert made.extra["teacher"] == {"kind": "hf", "path": str(models.teacher)}

    ids = models.tok.encode(render("答案是这样", "先想一想"), add_special_tokens=False)
    assert models.tok.convert_tokens_to_ids(THINK) in ids
    text, reasoning = decode_reply(models.tok, ids)
    assert (text, reasoning.strip()) == ("答案是这样", "先想一想")


def test_endpoint_credentials_stay_out_of_the_profile(models, slm_home, monkeypatch):
    """A key belongs in the environment: credentials in teacher_url, or a key pasted as api_key_env, are
    refused when the profile is read; a named variable that is not set stops the stage before any request."""
    from pydantic import ValidationError

    from tasks.distill_data import DistillDataError

    endpoint = {"teacher_url": "http://127.0.0.1:9/v1", "teacher_model": "m"}
    with pytest.raises(ValidationError, match="must not carry credentials"):
        profile(slm_home, distill_data={**endpoint, "teacher_url": "https://user:sk-abc@api.example.com/v1"})
    with pytest.raises(ValidationError, match="NAME of an environment variable"):
        profile(slm_home, distill_data={**endpoint, "api_key_env": "sk-0123456789abcdef0123456789"})
    with pytest.raises(ValidationError, match="teacher_url needs teacher_model"):
        profile(slm_home, distill_data={"teacher_url": "http://127.0.0.1:9/v1"})
    monkeypatch.delenv("SLM_TEST_UNSET_KEY", raising=False)
    store = ArtifactStore(str(slm_home / "artifacts"), slm_home)
    p = profile(slm_home, distill_data={**endpoint, "data": GREETINGS, "api_key_env": "SLM_TEST_UNSET_KEY"})
    with pytest.raises(DistillDataError, match="SLM_TEST_UNSET_KEY, which is not set"):
        run_stage(all_stages()["distill_data"], p, {"dpo": artifact(store, "dpo", models.teacher)}, store)
