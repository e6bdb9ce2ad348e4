"""SFT: assistant-only targets from the chat template, counted truncation, packing, held-out
likelihood rising with training, and exact resume after kill -9 (CPU, tiny model, real Q/A data)."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from tasks.chat_data import FitStats, encode_conversation, fit_length
from tasks.train.chats import ChatValidation, PackedChats, heldout_assistant_loss, save_conversations
from tasks.train.finetune import prepare
from tasks.train.stage import load_tokenizer
from tasks.train import checkpoint as ckpt
from tasks.train.data import IGNORE
from tasks.train.engine import TrainConfig, train
from tasks.train.objectives import SFT
from tests.chat_support import chatterbot_conversations, make_model_dir, make_tokenizer_dir
from tests.test_train_cuda import assert_compiled_runs_evaluate_and_resume, needs_cuda
from tests.test_train_resume import assert_kill_9_then_resume_is_identical, write_job

SEQ = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tok_dir = make_tokenizer_dir(root / "tok")
    model = make_model_dir(root / "model", tok_dir)
    tok = load_tokenizer(model)
    train_docs, val_docs, stats = prepare(chatterbot_conversations(), tok, SEQ, 0.1, 0)
    return {"root": root, "model": model, "tok": tok, "train": train_docs, "val": val_docs, "stats": stats}


def test_targets_are_the_assistant_replies_only(setup):
    tok = setup["tok"]
    messages = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好吗"},
                {"role": "assistant", "content": "我很好"}, {"role": "user", "content": "再见"},
                {"role": "assistant", "content": "下次见"}]
    ids, mask = encode_conversation(tok, messages)
    data = PackedChats([(ids, mask)], len(ids) - 1, tok.pad_token_id, seed=0)
    batch = data.next_batch(1)
    learnt = batch["targets"][0][batch["targets"][0] != IGNORE]
    assert tok.decode(learnt) == "我很好<|im_end|>下次见<|im_end|>"
    assert SFT().count(batch) == len(learnt)


def test_truncation_is_counted_never_silent(setup):
    tok = setup["tok"]
    long = [{"role": "user", "content": "问" * 10}, {"role": "assistant", "content": "答" * 200}]
    stats = FitStats()
    ids, mask = encode_conversation(tok, long)
    first = int(np.argmax(mask))  # the reply's first token
    cut = fit_length(ids, mask, first + 5, stats)
    assert len(cut[0]) == first + 5 and cut[1].sum() == 5 and stats.truncated == 1
    assert stats.tokens_cut == len(ids) - first - 5 and stats.labels_cut == int(mask[first + 5:].sum()) > 0
    only_prompt = fit_length(ids, mask, first, stats)  # the cut leaves no reply token: dropped, counted
    assert only_prompt is None and stats.dropped_no_labels == 1
    s = setup["stats"]
    assert s.truncated > 0 and s.labels_cut > 0  # the real data has long replies at SEQ=64


def test_packing_resume_cursor_is_exact(setup):
    a = PackedChats(setup["train"], SEQ, 0, seed=3)
    a.next_batch(5)
    state = a.state_dict()
    expected = a.next_batch(7)
    b = PackedChats(setup["train"], SEQ, 0, seed=3)
    b.load_state_dict(state)
    got = b.next_batch(7)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    assert (expected["document_ids"].max(axis=1) >= 1).all()  # rows hold several conversations


def test_sft_raises_heldout_likelihood(setup, tmp_path):
    from model import load_hf_dir

    pad = setup["tok"].pad_token_id
    before = heldout_assistant_loss(setup["model"], setup["val"], SEQ, pad)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=150, seq_len=SEQ, micro_batch=8, lr=5e-3, warmup_steps=5,
                      schedule="cosine", log_every=20, threads=1)
    result = train(cfg, lambda: load_hf_dir(setup["model"])[0], SFT(), PackedChats(setup["train"], SEQ, pad, 0),
                   ChatValidation(setup["val"], SEQ, pad))
    ckpt.export_hf(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"), setup["model"], tmp_path / "hf")
    after = heldout_assistant_loss(tmp_path / "hf", setup["val"], SEQ, pad)
    print(f"held-out assistant NLL {before:.3f} -> {after:.3f} nats/token")
    assert after < before - 1.0
    assert abs(result["val"]["val_loss"] - after) < 1e-3  # the engine's eval is the same measure


def sft_run(setup, tmp_path, name: str, objective: dict | None = None, **train):
    """A run dir with the engine job of an SFT run (run.json) on the setup's conversations (or of
    another objective on them: distillation)."""
    for split in ("train", "val"):
        if not (tmp_path / f"{split}.npz").exists():
            save_conversations(tmp_path / f"{split}.npz", setup[split])
    data = {"builder": "chats", "train": str(tmp_path / "train.npz"), "validation": str(tmp_path / "val.npz"),
            "pad_id": setup["tok"].pad_token_id, "seed": 1}
    return write_job(tmp_path / name, {"init_from": str(setup["model"])}, data, objective or {"name": "sft"},
                     **{"lr": 3e-3, **train})


def test_kill_9_then_resume_reproduces_sft_exactly(setup, tmp_path):
    runs = [sft_run(setup, tmp_path, name, deterministic=True, threads=1) for name in ("straight", "killed")]
    assert_kill_9_then_resume_is_identical(*runs)


@needs_cuda
def test_sft_on_cuda_compiled_evaluates_and_resumes_after_kill_9(setup, tmp_path):
    """Compiled on the GPU, held-out chats evaluated every 4 steps and at the end, kill -9 and resume."""
    assert_compiled_runs_evaluate_and_resume(lambda n, **train: sft_run(setup, tmp_path, n, **train), 16, 20)


@needs_cuda
def test_distill_on_cuda_compiled_evaluates_and_resumes_after_kill_9(setup, tmp_path):
    """White-box distillation (a frozen teacher inside the objective, here the student's own start) the same way."""
    distill = {"name": "distill", "teacher": str(setup["model"]), "temperature": 2.0, "alpha": 0.5}
    assert_compiled_runs_evaluate_and_resume(lambda n, **train: sft_run(setup, tmp_path, n, distill, **train), 16, 20)


def test_lora_trains_adapters_only_and_merges_to_the_same_hf_format(setup, tmp_path):
    """LoRA through the engine's run.json (model.lora): base weights frozen, held-out loss falls,
    the merged HF directory computes what the adapted model computes."""
    from model import load_hf_dir
    from tasks.train.engine import run_from_config
    from tasks.train.lora import apply_lora, export_lora_hf

    pad = setup["tok"].pad_token_id
    # LoRA adapts a trained model: a few full steps first give the tiny random model usable embeddings
    cfg = TrainConfig(out_dir=str(tmp_path / "base"), steps=30, seq_len=SEQ, micro_batch=8, lr=5e-3, threads=1)
    train(cfg, lambda: load_hf_dir(setup["model"])[0], SFT(), PackedChats(setup["train"], SEQ, pad, 5))
    base_dir = ckpt.export_hf(ckpt.latest_checkpoint(tmp_path / "base" / "checkpoints"), setup["model"], tmp_path / "base-hf")
    save_conversations(tmp_path / "train.npz", setup["train"])
    lora = {"rank": 8, "alpha": 64.0, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    spec = {"train": dict(out_dir=str(tmp_path / "run"), steps=100, seq_len=SEQ, micro_batch=8, lr=1e-2,
                          warmup_steps=5, schedule="cosine", log_every=20, threads=1, weight_decay=0.0),
            "model": {"init_from": str(base_dir), "lora": lora},
            "data": {"builder": "chats", "train": str(tmp_path / "train.npz"), "pad_id": pad},
            "objective": {"name": "sft"}}
    run_from_config(spec)
    final = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    weights = ckpt.load_weights(final)
    base = load_hf_dir(base_dir)[0].state_dict()
    assert torch.equal(weights["layers.0.self_attn.q_proj.base_layer.weight"], base["layers.0.self_attn.q_proj.weight"])
    assert torch.equal(weights["embed_tokens.weight"], base["embed_tokens.weight"])  # not a target: frozen
    assert weights["layers.0.mlp.up_proj.lora_B.default.weight"].abs().sum() > 0  # the adapters learnt

    export_lora_hf(final, lora, setup["model"], tmp_path / "hf")
    merged = load_hf_dir(tmp_path / "hf")[0].eval()
    adapted = apply_lora(load_hf_dir(base_dir)[0], **lora).eval()
    adapted.load_state_dict(weights, strict=True)
    x = torch.from_numpy(setup["train"][0][0][None, :-1].astype(np.int64))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), atol=1e-4, rtol=1e-4)
    before = heldout_assistant_loss(base_dir, setup["val"], SEQ, pad)
    after = heldout_assistant_loss(tmp_path / "hf", setup["val"], SEQ, pad)
    print(f"LoRA held-out assistant NLL {before:.3f} -> {after:.3f}")
    assert after < before - 0.03  # a 64-wide model adapts little through rank-8 adapters; still a real drop
