"""DPO: the loss against a hand computation, held-out preference accuracy and margin rising above
the SFT model's, and exact resume after kill -9 (CPU, tiny model).

Pairs for the learning test come from chatterbot-corpus' real Q/A with a preference a tiny model
can learn and carry to unseen questions, against what SFT taught it: chosen = the answer in
traditional characters (zhconv, a project dependency), rejected = the same answer in simplified
characters, the script the model was fine-tuned on (a user who wants replies in traditional script). The demo's construction (rejected = another question's answer, see
tasks/stages/dpo.py) is tested for its invariants; judging relevance is beyond a 2-layer model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import load_hf_dir
from tasks.train.chats import PackedChats
from tasks.train.finetune import prepare
from tasks.train.pairs import PairBatches, PairValidation, encode_pairs, preference_metrics, sequence_logps_np
from tasks.train.preference import looped, looped_pairs, mismatched_pairs
from tasks.train.stage import held_out, load_tokenizer
from tasks.train import checkpoint as ckpt
from tasks.train.data import IGNORE
from tasks.train.engine import TrainConfig, train
from tasks.train.objectives import DPO, SFT, dpo_losses
from tests.chat_support import chatterbot_conversations, make_model_dir, make_tokenizer_dir
from tests.test_train_cuda import assert_compiled_runs_evaluate_and_resume, needs_cuda
from tests.test_train_resume import assert_kill_9_then_resume_is_identical, write_job

SEQ = 64
BETA = 0.1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model fine-tuned (SFT, 150 steps) on the Q/A, the reference and start of DPO."""
    root = tmp_path_factory.mktemp("dpo")
    tok_dir = make_tokenizer_dir(root / "tok")
    base = make_model_dir(root / "base", tok_dir)
    tok = load_tokenizer(base)
    convs = chatterbot_conversations()
    train_docs, _, _ = prepare(convs, tok, SEQ, 0.1, 0)
    cfg = TrainConfig(out_dir=str(root / "sft"), steps=100, seq_len=SEQ, micro_batch=8, lr=5e-3, warmup_steps=5,
                      schedule="cosine", log_every=50, threads=1)
    train(cfg, lambda: load_hf_dir(base)[0], SFT(), PackedChats(train_docs, SEQ, tok.pad_token_id, 0))
    sft = ckpt.export_hf(ckpt.latest_checkpoint(root / "sft" / "checkpoints"), tok_dir, root / "sft-hf")
    import zhconv

    from tasks.chat_data import PreferencePair

    pairs = [PreferencePair(c[:-1], zhconv.convert(c[-1]["content"], "zh-hant"), c[-1]["content"]) for c in convs]
    pairs = [p for p in pairs if p.chosen != p.rejected]
    held = held_out(len(pairs), 0.15, 0)
    reference = load_hf_dir(sft)[0]
    split = {}
    for name, keep in (("train", ~held), ("val", held)):
        arrays, _ = encode_pairs([p for p, h in zip(pairs, keep) if h], tok, SEQ)
        arrays["ref_chosen"], arrays["ref_rejected"] = sequence_logps_np(reference, arrays)
        split[name] = arrays
    return {"root": root, "sft": sft, "tok": tok, "convs": convs, **split}


def test_dpo_loss_matches_hand_computation():
    pc, pr, rc, rr = [-10.0, -3.0], [-12.0, -2.0], [-11.0, -2.5], [-11.5, -2.5]
    losses, margins = dpo_losses(*(torch.tensor(x) for x in (pc, pr, rc, rr)), beta=0.5)
    for i in range(2):
        m = 0.5 * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        assert margins[i].item() == pytest.approx(m)
        assert losses[i].item() == pytest.approx(math.log(1 + math.exp(-m)), rel=1e-6)
    assert margins[0].item() == pytest.approx(0.75) and margins[1].item() == pytest.approx(-0.5)


def test_dpo_objective_sums_reply_token_logprobs(setup):
    """The objective's loss on a real model = the formula over log-probs summed token by token."""
    model = load_hf_dir(setup["sft"])[0].eval()
    batch = {k: v[:3] for k, v in setup["val"].items()}
    batch["ref_chosen"] = batch["ref_chosen"] - 1.0  # a reference that differs from the policy
    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        got = DPO(beta=BETA).loss(model, t)["sum"].item()
        expected = 0.0
        for i in range(3):
            side = {}
            for s in ("chosen", "rejected"):
                logp = torch.log_softmax(model(t[f"{s}_ids"][i:i + 1])[0].double(), -1)
                side[s] = sum(logp[j, tok].item() for j, tok in enumerate(t[f"{s}_targets"][i].tolist()) if tok != IGNORE)
            m = BETA * ((side["chosen"] - batch["ref_chosen"][i]) - (side["rejected"] - batch["ref_rejected"][i]))
            expected += math.log1p(math.exp(-m))
    assert got == pytest.approx(expected, rel=1e-4)
    assert DPO().count(batch) == 3


def test_demo_pairs_never_reject_with_the_own_answer(setup):
    pairs = mismatched_pairs(setup["convs"], seed=0)
    assert len(pairs) > 400
    assert all(p.chosen != p.rejected and p.prompt[-1]["role"] == "user" for p in pairs)
    answers = {p.chosen for p in pairs}
    assert all(p.rejected in answers for p in pairs)  # rejected replies are real answers too


def test_dpo_raises_heldout_accuracy_and_margin_above_sft(setup, tmp_path):
    val = setup["val"]
    before = preference_metrics(load_hf_dir(setup["sft"])[0], val, BETA)
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # the reference itself
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=60, seq_len=SEQ, micro_batch=8, lr=1e-3, warmup_steps=5,
                      schedule="cosine", log_every=20, threads=1, weight_decay=0.0)
    result = train(cfg, lambda: load_hf_dir(setup["sft"])[0], DPO(beta=BETA), PairBatches(setup["train"], 0),
                   PairValidation(val))
    ckpt.export_hf(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"), setup["sft"], tmp_path / "hf")
    after = preference_metrics(load_hf_dir(tmp_path / "hf")[0], val, BETA)
    print(f"held-out: SFT {before} -> DPO {after}; val DPO loss {result['val']['val_loss']:.4f}")
    assert after["logp_accuracy"] > before["logp_accuracy"] + 0.1
    assert after["logp_margin"] > before["logp_margin"] + 1.0
    assert after["reward_accuracy"] > 0.6 and after["reward_margin"] > 0.1
    assert result["val"]["val_loss"] < math.log(2)  # below the reference's loss, log 2


def dpo_run(setup, tmp_path, name: str, **train):
    """A run dir with the engine job of a DPO run (run.json) on the setup's pairs."""
    return pair_run(setup, tmp_path, name, {"init_from": str(setup["sft"])}, {"name": "dpo", "beta": BETA}, **train)


def pair_run(setup, tmp_path, name: str, model: dict, objective: dict, **train):
    """A run dir with an engine job (run.json) training `model` with `objective` on the setup's pairs."""
    for split in ("train", "val"):
        if not (tmp_path / f"{split}.npz").exists():
            np.savez(tmp_path / f"{split}.npz", **setup[split])
    data = {"builder": "pairs", "train": str(tmp_path / "train.npz"), "validation": str(tmp_path / "val.npz"), "seed": 1}
    return write_job(tmp_path / name, model, data, objective, **{"lr": 1e-3, **train})


def test_kill_9_then_resume_reproduces_dpo_exactly(setup, tmp_path):
    runs = [dpo_run(setup, tmp_path, name, deterministic=True, threads=1) for name in ("straight", "killed")]
    assert_kill_9_then_resume_is_identical(*runs)


@needs_cuda
def test_dpo_on_cuda_compiled_evaluates_and_resumes_after_kill_9(setup, tmp_path):
    """Compiled on the GPU, held-out pairs evaluated every 4 steps and at the end, kill -9 and resume."""
    assert_compiled_runs_evaluate_and_resume(lambda n, **train: dpo_run(setup, tmp_path, n, **train), 16, 5)


@needs_cuda
def test_reward_model_on_cuda_compiled_evaluates_and_resumes_after_kill_9(setup, tmp_path):
    """The reward model (a scalar head on the SFT backbone, Bradley-Terry loss) the same way."""
    model = {"builder": "reward_head", "init_from": str(setup["sft"]), "head_std": 0.02}
    assert_compiled_runs_evaluate_and_resume(
        lambda n, **train: pair_run(setup, tmp_path, n, model, {"name": "reward_bt"}, **train), 16, 5)


def test_looped_pairs_reject_the_answer_collapsing_into_a_loop():
    """The demo's pairs (profiles/demo.yaml, `rejected: looped`): every chatterbot answer against itself
    collapsing into one repeated character; preference files keep their own rejected replies."""
    from pydantic import ValidationError

    from tasks.train.settings import PreferenceData

    assert looped("我梦想我会变得富有") == "我梦想想想想想想想" and looped("好的") == "好好"
    convs = chatterbot_conversations()
    pairs = looped_pairs(convs)
    assert len(convs) - 10 < len(pairs) <= len(convs)  # only one-character answers (no loop to make) drop
    for p in pairs:
        keep = len(p.chosen) // 3 or 1
        assert p.rejected[:keep] == p.chosen[:keep] and set(p.rejected[keep - 1:]) == {p.chosen[keep - 1]}
        assert len(p.rejected) == len(p.chosen) and p.rejected != p.chosen
    with pytest.raises(ValidationError, match="format: chatterbot only"):
        PreferenceData(path="pairs.jsonl", format="preference", rejected="looped")
