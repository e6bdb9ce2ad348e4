"""reward: the score is read at the reply's end-of-turn token, the Bradley-Terry loss against a hand
computation, the stage learning a preference it can carry to held-out pairs (accuracy well above
chance), and the saved model (HF backbone + head file) loading back with the same scores.

Pairs: chatterbot-corpus' real Q/A; chosen = the answer in traditional characters (zhconv), rejected
= the same answer in simplified characters (as tests/test_dpo.py): a preference a tiny reward model
can learn from the text itself and carry to unseen questions."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from model import load_hf_dir
from model.reward import RewardModel, load_reward_model
from storage.artifacts import ArtifactStore
from tasks.train.pairs import encode_pairs
from tasks.reward import RewardConfig, pair_metrics, run
from tasks.train.stage import load_tokenizer
from tasks.train.metrics import read_metrics
from tasks.train.objectives import RewardBT, reply_end
from tests.chat_support import chatterbot_conversations, make_model_dir, make_tokenizer_dir

SEQ = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import zhconv

    root = tmp_path_factory.mktemp("reward")
    tok_dir = make_tokenizer_dir(root / "tok")
    base = make_model_dir(root / "base", tok_dir)
    records = []
    for conv in chatterbot_conversations():
        simplified = conv[-1]["content"]
        traditional = zhconv.convert(simplified, "zh-hant")
        if traditional != simplified:
            records.append({"messages": conv[:-1], "chosen": traditional, "rejected": simplified})
    pairs_file = root / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return {"root": root, "base": base, "tok": load_tokenizer(base), "pairs": pairs_file, "n": len(records)}


def test_reward_is_read_at_the_replys_end_of_turn_token(setup):
    tok = setup["tok"]
    from tasks.chat_data import PreferencePair

    pair = PreferencePair([{"role": "user", "content": "你好吗"}], "我很好", "不好")
    arrays, counts = encode_pairs([pair], tok, SEQ)
    assert counts["pairs"] == 1
    end = reply_end(torch.from_numpy(arrays["chosen_targets"]))
    row = arrays["chosen_ids"][0]
    assert tok.decode([int(row[end[0]])]) == "<|im_end|>"
    assert tok.decode(row[: int(end[0]) + 1]).endswith("我很好<|im_end|>")


def test_bradley_terry_loss_matches_hand_computation(setup):
    torch.manual_seed(0)
    model = RewardModel.from_backbone(load_hf_dir(setup["base"])[0], head_std=0.5).eval()
    from tasks.chat_data import PreferencePair

    pairs = [PreferencePair([{"role": "user", "content": q}], c, r)
             for q, c, r in (("你好", "你好呀", "再见"), ("今天天气怎么样", "晴天", "我不知道你在说什么"))]
    arrays, _ = encode_pairs(pairs, setup["tok"], SEQ)
    batch = {k: torch.from_numpy(v) for k, v in arrays.items()}
    with torch.no_grad():
        got = RewardBT().loss(model, batch)
        expected, wins = 0.0, 0
        for i in range(2):
            r = {}
            for side in ("chosen", "rejected"):
                ids, tgt = arrays[f"{side}_ids"][i], arrays[f"{side}_targets"][i]
                last = int(np.nonzero(tgt != -100)[0][-1]) + 1  # the input position of the last reply token
                r[side] = model.scores(torch.from_numpy(ids[None]).long())[0, last].item()
            expected += math.log1p(math.exp(-(r["chosen"] - r["rejected"])))
            wins += r["chosen"] > r["rejected"]
    assert got["sum"].item() == pytest.approx(expected, rel=1e-5)
    assert got["stats"]["accuracy"].item() == pytest.approx(wins / 2)
    assert RewardBT().count(arrays) == 2


def test_reward_stage_learns_a_preference_it_carries_to_heldout_pairs(setup, tmp_path):
    store = ArtifactStore(str(tmp_path / "artifacts"), tmp_path)
    out = store.begin("reward", "test-key")
    cfg = RewardConfig(init_from=str(setup["base"]), data=[{"path": str(setup["pairs"]), "format": "preference"}],
                       seq_len=SEQ, steps=60, global_batch=16, micro_batch=16, lr=2e-3, warmup_steps=5,
                       val_fraction=0.15, log_every=10, ckpt_every=0, threads=2)
    result = run(cfg, {}, out)
    before, after = result.extra["heldout_before"], result.extra["heldout_after"]
    print(result.summary)
    assert result.counts["pairs"] == setup["n"] and result.counts["val_pairs"] > 40
    assert before["accuracy"] == 0.5 and before["margin"] == 0.0  # a zero head: every pair a tie
    assert after["accuracy"] >= 0.8 and after["margin"] > 0.5
    # the saved model: an HF backbone loadable as a causal LM, a head file, the same held-out scores
    assert (out.path / "model" / "config.json").is_file() and (out.path / "head.safetensors").is_file()
    load_hf_dir(out.path / "model")
    arrays = dict(np.load(out.scratch / "engine" / "val.npz"))  # the held-out rows the stage scored
    again = pair_metrics(load_reward_model(out.path), arrays)
    assert again["accuracy"] == pytest.approx(after["accuracy"]) and again["margin"] == pytest.approx(after["margin"], rel=1e-4)
    # what the RL stages read: the reward_model rule scores prompt + reply where the stage scores pairs
    from tasks.rewards import Scorer

    recs = [json.loads(line) for line in setup["pairs"].read_text(encoding="utf-8").splitlines()[:6]]
    scorer = Scorer([{"rule": "reward_model", "weight": 2.0}], out.path)
    total, parts = scorer([r["messages"] for r in recs], [r["chosen"] for r in recs], [None] * 6)
    from tasks.chat_data import PreferencePair
    from tasks.reward import pair_scores

    rows, _ = encode_pairs([PreferencePair(r["messages"], r["chosen"], r["rejected"]) for r in recs], setup["tok"], SEQ)
    np.testing.assert_allclose(parts["reward_model"], pair_scores(load_reward_model(out.path), rows)[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(total, 2.0 * parts["reward_model"], rtol=1e-6)
    # the engine logged the objective's statistics at every log step (MLflow gets the same)
    records = [r for r in read_metrics(next(out.path.rglob("metrics.jsonl"))) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert records[-1]["accuracy"] > records[0]["accuracy"]
    logged = {k for values, _ in out.metrics for k in values}
    assert {"loss", "accuracy", "margin", "heldout_accuracy", "heldout_margin"} <= logged
