"""GRPO: group advantages and the loss against hand computations, rollout rows, the stage raising
the reward of a rule a tiny policy can learn (held-out prompts, before vs after), and a kill -9 in
the middle of training continuing from the last checkpoint with the same rollouts: bitwise the
uninterrupted run (CPU, deterministic).

The policy: tests/rl_support.py (a 2-layer model SFT-trained on chatterbot-corpus' real Q/A). The
rule: tasks/rewards.py `length` with a short target: the policy learns to end its replies early
(its <|im_end|> token), which GRPO can teach it in a few dozen steps."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from storage.artifacts import ArtifactStore
from tasks.stages.grpo import GrpoConfig, run
from tasks.train.data import IGNORE
from tasks.train.metrics import read_metrics
from tasks.train.objectives import GRPO, clipped_policy_loss, k3_kl, masked_row_mean
from tasks.train.rollout import group_advantages, reply_rows
from tests.rl_support import CHATTERBOT, SEQ, sft_policy
from tests.test_train_resume import assert_kill_9_then_resume_is_identical, losses

SHORT = [{"rule": "length", "target_chars": 4}]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return sft_policy(tmp_path_factory)


def test_group_advantages_by_hand():
    adv = group_advantages(np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0]), group=2)
    assert adv.shape == (10,)
    s = math.sqrt(0.5)  # std (ddof 1) of {1, 0}
    np.testing.assert_allclose(adv[:4], [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4)], rtol=1e-6)
    np.testing.assert_allclose(adv[4:8], 0.0)  # a group of equal rewards teaches nothing
    np.testing.assert_allclose(adv[8:], [-1.5 / (math.sqrt(4.5) + 1e-4), 1.5 / (math.sqrt(4.5) + 1e-4)], rtol=1e-6)
    with pytest.raises(ValueError):
        group_advantages(np.zeros(4), group=1)


def test_grpo_loss_by_hand():
    # two replies: 2 and 1 tokens; the rest of the rows is prompt / padding
    logp = torch.tensor([[0.0, -1.0, -2.0], [0.0, 0.0, -0.5]])
    old = torch.tensor([[0.0, -1.5, -1.0], [0.0, 0.0, -0.5]])
    ref = torch.tensor([[0.0, -1.0, -2.5], [0.0, 0.0, -1.5]])
    targets = torch.tensor([[IGNORE, 5, 6], [IGNORE, IGNORE, 7]])
    adv = torch.tensor([[0.0, 2.0, 2.0], [0.0, 0.0, -1.0]])
    batch = {"old_logp": old, "ref_logp": ref, "advantages": adv, "targets": targets}
    eps, beta = 0.2, 0.1
    per_token, mask, clipped, kl = GRPO(clip_eps=eps, beta=beta).token_losses(logp, batch)

    def k3(lp, rf):
        return math.exp(rf - lp) - (rf - lp) - 1

    # row 0, token 1: ratio e^0.5 = 1.6487 > 1.2 with A = 2 -> the clipped term 1.2 * 2 is the min
    t01 = -min(math.exp(0.5) * 2, 1.2 * 2) + beta * k3(-1.0, -1.0)
    # row 0, token 2: ratio e^-1 = 0.3679 < 0.8 with A = 2 -> the unclipped 0.3679 * 2 is the min
    t02 = -min(math.exp(-1.0) * 2, 0.8 * 2) + beta * k3(-2.0, -2.5)
    # row 1, token 2: ratio 1, A = -1
    t12 = 1.0 + beta * k3(-0.5, -1.5)
    assert per_token[0, 1].item() == pytest.approx(t01, rel=1e-6)
    assert per_token[0, 2].item() == pytest.approx(t02, rel=1e-6)
    assert per_token[1, 2].item() == pytest.approx(t12, rel=1e-6)
    assert clipped[mask].tolist() == [True, False, False]
    rows = masked_row_mean(per_token, mask)
    assert rows.tolist() == pytest.approx([(t01 + t02) / 2, t12], rel=1e-6)  # a reply's loss: mean over its tokens
    assert kl[1, 2].item() == pytest.approx(math.exp(-1.0) + 1.0 - 1.0) and k3_kl(torch.zeros(1), torch.zeros(1)).item() == 0.0
    assert clipped_policy_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), 0.2)[0].item() == -1.0


def test_reply_rows_put_targets_on_the_reply_only():
    inp, tgt = reply_rows([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], seq_len=6, pad_id=0)
    assert inp.tolist() == [[1, 2, 3, 7, 0, 0], [4, 9, 10, 0, 0, 0]]
    assert tgt.tolist() == [[IGNORE, IGNORE, 7, 8, IGNORE, IGNORE], [9, 10, 11, IGNORE, IGNORE, IGNORE]]
    with pytest.raises(ValueError):
        reply_rows([[1, 2, 3]], [[4, 5, 6, 7, 8]], seq_len=6, pad_id=0)


def _config(policy, **kw):
    settings = dict(init_from=str(policy), data=[CHATTERBOT], rewards=SHORT, seq_len=SEQ, max_new_tokens=16,
                    prompts_per_rollout=4, group_size=4, global_batch=16, micro_batch=16, steps=16, lr=3e-3,
                    beta=0.02, val_fraction=0.1, eval_prompts=16, eval_samples=2, ckpt_every=0, threads=2)
    return GrpoConfig(**{**settings, **kw})


def test_grpo_raises_the_reward_of_a_learnable_rule(policy, tmp_path):
    store = ArtifactStore(str(tmp_path / "artifacts"), tmp_path)
    out = store.begin("grpo", "test-key")
    result = run(_config(policy), {}, out)
    print(result.summary)
    before, after = result.extra["heldout_before"], result.extra["heldout_after"]
    assert after["reward"] > before["reward"] + 0.3, (before, after)
    assert after["reply_tokens"] < before["reply_tokens"]  # it learnt to stop early
    records = [r for r in read_metrics(out.scratch / "engine" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 17))  # every step logged
    first, last = records[0]["reward"], np.mean([r["reward"] for r in records[-4:]])  # the reference's rollout
    assert last > first + 0.3  # (after one step the policy has already moved: a mean over two would blur the start)
    assert all(k in records[0] for k in ("kl", "entropy", "clip_frac", "reply_tokens"))
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout comes from the reference itself
    assert records[-1]["kl"] > 0.0
    assert (out.path / "hf" / "config.json").is_file() and result.counts["rollouts"] == 16
    logged = {k for values, _ in out.metrics for k in values}
    assert {"reward", "kl", "entropy", "clip_frac", "heldout_reward"} <= logged


def test_kill_9_then_resume_continues_grpo_from_its_checkpoint(policy, tmp_path):
    from tasks.train.rl import read_prompts, tokenize_prompts
    from tasks.train.stage import load_tokenizer

    cfg = _config(policy, epochs=2, global_batch=8, micro_batch=8, steps=12)
    prompts, _ = read_prompts(cfg, "grpo")
    prompts, _ = tokenize_prompts(prompts[:64], load_tokenizer(policy), cfg)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False))

    def config(name):
        out = tmp_path / name
        out.mkdir()
        spec = {"train": dict(out_dir=str(out), steps=12, seq_len=SEQ, micro_batch=8, global_batch=8, lr=2e-3,
                              schedule="constant", log_every=1, ckpt_every=3, keep_last=3, deterministic=True, threads=1),
                "model": {"init_from": str(policy)},
                "data": {"builder": "rollouts", "algo": "grpo",
                         "prompts": str(tmp_path / "prompts.json"), "tokenizer": str(policy), "reference": str(policy),
                         "rewards": SHORT, "prompts_per_rollout": 4, "group_size": 4, "epochs": 2,
                         "max_new_tokens": 20, "seed": 3, "pad_id": 0},
                "objective": {"name": "grpo", "clip_eps": 0.2, "beta": 0.02}}
        (out / "run.json").write_text(json.dumps(spec))
        return out

    # killed after the step-6 checkpoint: inside a rollout (4 steps per rollout: 16 replies, 2 passes of 8).
    # Deterministic CPU run: the continued run samples the same rollouts and takes the same steps, bit
    # for bit (the rollout being served when it was killed comes back from the checkpoint).
    straight, killed = config("straight"), config("killed")
    resumed_from = assert_kill_9_then_resume_is_identical(straight, killed)
    assert 0 < resumed_from < 12
    assert sorted(losses(killed)) == list(range(1, 13))


def test_rule_rewards():
    from tasks.rewards import Scorer, exact_match, length, think_format

    assert think_format("<think>先想一想</think>答案是四") == 1.0
    assert think_format("<think>先想一想</think>  ") == 0.0  # no answer after the reasoning
    assert think_format("答案是四") == 0.0 and think_format("<think></think>四") == 0.0
    assert exact_match("<think>二加二</think> 四。", "四") == 1.0  # the answer after </think>, final punctuation dropped
    assert exact_match("四", None) == 0.0 and exact_match("五", "四") == 0.0
    assert length("一二三四", 4) == 1.0 and length("一二", 4) == 0.5 and length("一" * 40, 4) == -1.0
    scorer = Scorer([{"rule": "length", "target_chars": 4, "weight": 0.5}, {"rule": "exact_match", "weight": 2.0}])
    total, parts = scorer([[]] * 2, ["一二三四", "一二"], ["一二三四", None])
    assert total.tolist() == pytest.approx([0.5 * 1.0 + 2.0, 0.5 * 0.5])
    assert parts["exact_match"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="reward_model"):
        Scorer([{"rule": "reward_model"}])
