"""PPO: GAE and the clipped value loss against hand computations, a real rollout's rewards and
returns (the score on the last reply token, the KL penalty on every token), and the stage raising
the reward of a rule a tiny policy can learn (held-out prompts, before vs after; CPU).

Policy and rule as tests/test_grpo.py (a 2-layer SFT model; replies of about 4 characters)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.reward import engine_model
from storage.artifacts import ArtifactStore
from tasks.ppo import VALUE_HEAD, PpoConfig, run
from tasks.train.data import IGNORE
from tasks.train.engine import TrainConfig
from tasks.train.metrics import read_metrics
from tasks.train.objectives import clipped_value_loss
from tasks.train.rollout import RolloutBatches, gae
from tests.rl_support import CHATTERBOT, SEQ, sft_policy

SHORT = [{"rule": "length", "target_chars": 4}]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return sft_policy(tmp_path_factory)


def test_gae_by_hand():
    # row 0: a 3-token reply at positions 2..4; row 1: a 2-token reply at 1..2, then padding whose
    # (junk) rewards and values must not leak in
    rewards = torch.tensor([[0.0, 0.0, -0.1, 0.2, 1.0], [0.0, 0.5, 2.0, 9.0, 9.0]])
    values = torch.tensor([[7.0, 7.0, 0.5, 0.4, 0.3], [7.0, 1.0, 1.5, 9.0, 9.0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    g, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, g, lam)
    a4 = 1.0 - 0.3
    a3 = (0.2 + g * 0.3 - 0.4) + g * lam * a4
    a2 = (-0.1 + g * 0.4 - 0.5) + g * lam * a3
    b2 = 2.0 - 1.5
    b1 = (0.5 + g * 1.5 - 1.0) + g * lam * b2
    np.testing.assert_allclose(adv.numpy(), [[0, 0, a2, a3, a4], [0, b1, b2, 0, 0]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ret.numpy(), [[0, 0, a2 + 0.5, a3 + 0.4, a4 + 0.3], [0, b1 + 1.0, b2 + 1.5, 0, 0]],
                               rtol=1e-6, atol=1e-7)
    # gamma = lam = 1 and zero values: every token's advantage is the sum of the rewards from it on
    adv1, _ = gae(rewards, torch.zeros_like(values), mask, 1.0, 1.0)
    np.testing.assert_allclose(adv1[0, 2:].numpy(), [1.1, 1.2, 1.0], rtol=1e-6)


def test_clipped_value_loss_by_hand():
    v, old, ret = torch.tensor([1.0, 0.6, 0.0, 1.2]), torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([0.0, 1.0, 1.0, 1.0])
    got = clipped_value_loss(v, old, ret, clip=0.2).tolist()
    # max(unclipped, clipped) squared errors, halved: clip(V - V_old) keeps V within V_old +- 0.2
    expected = [0.5 * max(1.0, 0.7 ** 2), 0.5 * max(0.4 ** 2, 0.4 ** 2), 0.5 * max(1.0, 0.7 ** 2), 0.5 * max(0.2 ** 2, 0.3 ** 2)]
    assert got == pytest.approx(expected, rel=1e-6)


def test_ppo_rollout_puts_the_score_on_the_last_token_and_the_kl_on_every_token(policy, tmp_path):
    from tasks.train.rl import read_prompts, tokenize_prompts
    from tasks.train.stage import load_tokenizer

    cfg = PpoConfig(data=[CHATTERBOT], seq_len=SEQ, max_new_tokens=16)
    prompts, _ = read_prompts(cfg, "ppo")
    prompts, _ = tokenize_prompts(prompts[:16], load_tokenizer(policy), cfg)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False))
    spec = {"algo": "ppo", "prompts": str(tmp_path / "prompts.json"), "tokenizer": str(policy), "reference": str(policy),
            "rewards": SHORT, "prompts_per_rollout": 8, "group_size": 1, "epochs": 1, "max_new_tokens": 16,
            "seed": 0, "pad_id": 0, "kl_coef": 0.5, "gamma": 1.0, "lam": 1.0, "whiten": False}
    data = RolloutBatches(spec, TrainConfig(out_dir=str(tmp_path), steps=1, seq_len=SEQ, micro_batch=8))
    model = engine_model({"init_from": str(policy)})  # value head at zero
    data.attach_model(model)
    batch = data.next_batch(8)
    mask = batch["targets"] != IGNORE
    assert mask.any(1).all() and np.abs(batch["old_values"]).max() == 0.0
    # the policy is the reference: no KL penalty, so each token's return is the reply's score
    np.testing.assert_allclose(batch["old_logp"][mask], batch["ref_logp"][mask], atol=1e-5)
    expected = np.broadcast_to(batch["scores"][:, None], mask.shape)[mask]
    np.testing.assert_allclose(batch["returns"][mask], expected, atol=1e-4)
    # a policy that moved away from the reference pays kl_coef * (log pi - log ref) per token
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    data.buffer, data.served = None, 0
    moved = data.next_batch(8)
    m = moved["targets"] != IGNORE
    penalty = -0.5 * (moved["old_logp"] - moved["ref_logp"]) * m
    to_go = np.flip(np.cumsum(np.flip(penalty, 1), 1), 1)  # gamma = lam = 1: the sum from each token on
    np.testing.assert_allclose(moved["returns"][m], (to_go + moved["scores"][:, None])[m], rtol=1e-4, atol=1e-4)
    assert np.abs(penalty).sum() > 0.1


def test_ppo_raises_the_reward_of_a_learnable_rule(policy, tmp_path):
    store = ArtifactStore(str(tmp_path / "artifacts"), tmp_path)
    out = store.begin("ppo", "test-key")
    cfg = PpoConfig(init_from=str(policy), data=[CHATTERBOT], rewards=SHORT, seq_len=SEQ, max_new_tokens=16,
                    prompts_per_rollout=16, group_size=1, epochs=2, global_batch=8, micro_batch=8, steps=16, lr=3e-3,
                    kl_coef=0.02, vf_coef=0.1, val_fraction=0.1, eval_prompts=16, eval_samples=2, ckpt_every=0,
                    threads=2)
    result = run(cfg, {}, out)
    print(result.summary)
    before, after = result.extra["heldout_before"], result.extra["heldout_after"]
    assert after["reward"] > before["reward"] + 0.3, (before, after)
    assert after["reply_tokens"] < before["reply_tokens"]
    records = [r for r in read_metrics(out.scratch / "engine" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 17))
    first, last = np.mean([r["reward"] for r in records[:4]]), np.mean([r["reward"] for r in records[-4:]])
    assert last > first + 0.3
    assert all(k in records[-1] for k in ("kl", "entropy", "clip_frac", "value_loss"))
    assert max(r["clip_frac"] for r in records) > 0  # the second pass over a rollout is off-policy
    assert (out.path / "hf" / "config.json").is_file() and (out.path / VALUE_HEAD).is_file()
    assert result.counts["rollouts"] == 4
