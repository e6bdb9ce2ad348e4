"""tasks/train: packing, validation rows, schedules, checkpoint files (CPU, fast)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import ModelConfig, Transformer
from tasks.train import checkpoint as ckpt
from tasks.train.data import IGNORE, ArrayDocuments, PackedBatches, PackedRows, ValidationRows, split_rows
from tasks.train.engine import param_groups
from tasks.train.metrics import read_metrics
from tasks.train.schedule import Schedule

EOS = 1


def docs_of(lengths, start=10):
    """Documents whose tokens are distinct running numbers, EOS appended."""
    out, n = [], start
    for length in lengths:
        out.append(np.append(np.arange(n, n + length), EOS).astype(np.uint16))
        n += length
    return out


def test_packing_keeps_every_token_once_without_padding():
    docs = docs_of([3, 40, 1, 7, 25, 2, 60, 5])  # one document longer than a row
    stream = np.concatenate(docs)
    packer = PackedRows(ArrayDocuments(docs, loop=False), seq_len=16)
    tokens, doc_ids = packer.next_rows(5)
    assert tokens.shape == (5, 17) and doc_ids.shape == (5, 17)
    # rows overlap by one token: row k = stream[16k : 16k + 17]
    for k in range(5):
        np.testing.assert_array_equal(tokens[k], stream[16 * k : 16 * k + 17])
    # targets (row[1:]) of all rows are the stream's tokens 1..80, each exactly once
    np.testing.assert_array_equal(tokens[:, 1:].reshape(-1), stream[1:81])
    # a document id changes exactly where a document ends (after its EOS)
    ends = np.cumsum([len(d) for d in docs])
    flat_ids = np.concatenate([doc_ids[0], *(row[1:] for row in doc_ids[1:])])
    changes = np.flatnonzero(np.diff(flat_ids)) + 1
    np.testing.assert_array_equal(changes, ends[ends < len(flat_ids)])


def test_document_mask_and_positions_reset_per_document():
    """What the model gets from a packed row: no attention across documents, RoPE from 0 per document."""
    docs = docs_of([3, 5, 9])
    batch = PackedBatches(ArrayDocuments(docs), seq_len=12).next_batch(1)
    cfg = ModelConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ids = torch.from_numpy(batch["input_ids"]).long()
    with torch.no_grad():
        packed = model(ids, document_ids=torch.from_numpy(batch["document_ids"]))
        # the second document alone (4 + 1 tokens: positions 4..9 of the row) gives the same logits
        alone = model(ids[:, 4:10])
    torch.testing.assert_close(packed[:, 4:10], alone, rtol=1e-5, atol=1e-5)


def test_packer_cursor_resumes_at_the_exact_token():
    docs = docs_of(np.random.default_rng(0).integers(1, 30, 50))
    a = PackedBatches(ArrayDocuments(docs, shuffle_seed=3), seq_len=8)
    a.next_batch(7)
    state = a.state_dict()
    expected = [a.next_batch(5) for _ in range(40)]  # crosses epochs (shuffled per epoch)
    b = PackedBatches(ArrayDocuments(docs, shuffle_seed=3), seq_len=8)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch(5)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_validation_rows_score_every_token_once_and_count_bytes():
    docs = docs_of([5, 12, 3])
    decode = lambda ids: "字" * sum(1 for i in ids if i != EOS)  # 3 UTF-8 bytes per token  # noqa: E731
    val = ValidationRows(iter(docs), seq_len=8, eos_id=EOS, max_tokens=10**6, decode=decode)
    total = sum(len(d) for d in docs)
    assert val.num_targets == total
    assert val.num_bytes == 3 * (5 + 12 + 3)
    scored = val.targets[val.targets != IGNORE]
    np.testing.assert_array_equal(scored, np.concatenate(docs))
    assert val.input_ids[0, 0] == EOS  # the leading EOS makes the first token a target too
    # every rank gets the same number of batches; the missing rows are fully masked
    per_rank = [list(val.batches(2, world=2, rank=r)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    counted = sum(int((b["targets"] != IGNORE).sum()) for bs in per_rank for b in bs)
    assert counted == total


def test_split_rows_partition_the_global_batch():
    batch = {"x": np.arange(24).reshape(12, 2)}
    parts = [m["x"][:, 0] for r in range(2) for m in split_rows(batch, micro_batch=3, accum=2, world=2, rank=r)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(0, 24, 2))


def test_schedules():
    wsd = Schedule("wsd", total_steps=100, warmup_steps=10, decay_fraction=0.2, min_ratio=0.1)
    assert wsd(0) == pytest.approx(0.1) and wsd(9) == pytest.approx(1.0)
    assert wsd(50) == 1.0 and wsd(79) == 1.0
    assert wsd(80) == pytest.approx(1.0) and wsd(90) == pytest.approx(0.55) and wsd(99) > 0.1
    assert all(wsd(s) >= wsd(s + 1) for s in range(10, 99))
    sq = Schedule("wsd", total_steps=100, decay_fraction=0.2, decay_shape="sqrt")
    assert sq(90) == pytest.approx(1 - math.sqrt(0.5))
    cos = Schedule("cosine", total_steps=100, warmup_steps=0, min_ratio=0.0)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(99) < 0.01
    with pytest.raises(ValueError, match="schedule 'linear'"):
        Schedule("linear", total_steps=10)


def test_param_groups_no_decay_for_norms_and_biases():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, attention_bias=True)
    model = Transformer(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert {names[id(p)].split(".")[-1] for p in no_decay["params"]} == {"weight", "bias"}
    assert all(names[id(p)].endswith(("norm.weight", "bias")) for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_checkpoint_is_atomic_and_keeps_the_last_k(tmp_path):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    model = Transformer(cfg)
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, model.state_dict(), cfg.to_dict(), {"state": {}}, {"step": step}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    # a save killed half-way leaves a .tmp that is never taken for a checkpoint, and the next save removes it
    (root / "step_00000004.tmp").mkdir()
    assert ckpt.latest_checkpoint(root).name == "step_00000003"
    ckpt.save_checkpoint(root, 5, model.state_dict(), cfg.to_dict(), {"state": {}}, {"step": 5}, keep_last=2)
    assert not (root / "step_00000004.tmp").exists()
    loaded = Transformer(cfg)
    loaded.load_state_dict(ckpt.load_weights(ckpt.latest_checkpoint(root)), strict=True)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()  # still tied
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_read_metrics_drops_the_interrupted_attempt_after_the_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        '{"kind": "start", "step": 0}',
        '{"kind": "train", "step": 1, "loss": 5.0}',
        '{"kind": "train", "step": 2, "loss": 4.0}',
        '{"kind": "train", "step": 3, "loss": 3.9}',
        '{"kind": "resume", "step": 2}',
        '{"kind": "train", "step": 3, "loss": 3.8}',
        '{"kind": "train", "st',  # torn by kill -9
    ]
    path.write_text("\n".join(lines))
    losses = [(r["step"], r["loss"]) for r in read_metrics(path) if r["kind"] == "train"]
    assert losses == [(1, 5.0), (2, 4.0), (3, 3.8)]


def test_optimizer_state_by_name_matches_torch_distributed_layout():
    """Our unsharded optimizer format is the one FSDP runs save, so checkpoints move between them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    model(torch.randint(0, 64, (2, 8))).square().mean().backward()
    opt.step()
    ours = ckpt.optimizer_state_by_name(model, opt)
    theirs = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for name, st in theirs["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(ours["state"][name][k]), torch.as_tensor(v))
    fresh = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    ckpt.load_optimizer_state_by_name(model, fresh, theirs)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_causal_lm_objective_sums_token_losses_and_adds_the_moe_aux_loss():
    from tasks.train.objectives import CausalLM

    docs = docs_of([5, 9, 30])
    batch = {k: torch.from_numpy(v) for k, v in PackedBatches(ArrayDocuments(docs), seq_len=16).next_batch(2).items()}
    dense = Transformer(ModelConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64))
    out = CausalLM().loss(dense, batch)
    assert set(out) == {"sum"}
    logits = dense(batch["input_ids"].long(), document_ids=batch["document_ids"])
    mean = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    torch.testing.assert_close(out["sum"], mean * 32)  # a sum over the 2 x 16 targets, not a mean
    moe = Transformer(ModelConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                  intermediate_size=64, num_experts=4, experts_per_token=2, router_aux_loss_coef=0.05))
    out = CausalLM().loss(moe, batch)
    torch.testing.assert_close(out["aux"], 0.05 * moe.aux_loss)
    (out["sum"] + out["aux"]).backward()
    assert moe.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_engine_runs_without_orchestration_libraries():
    """The GPU box has torch, numpy, safetensors, pyarrow, tokenizers, transformers, nothing else."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    code = textwrap.dedent("""
        import sys
        for name in ("prefect", "mlflow", "polars", "pydantic", "fsspec", "datasketch", "zhconv", "pandas"):
            sys.modules[name] = None  # any import of these now fails
        import tasks.train.engine, tasks.train.launch, tasks.shard_reader, model
        from tasks.train import TrainConfig, train, CausalLM, PackedBatches, ValidationRows
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


class TurnsNaN:
    """A causal-LM objective that diverges from its `after`-th call on: the loss becomes NaN ("loss"),
    or the loss stays finite while one gradient becomes NaN ("grad": d sqrt(u)/du at u = 0, times 0)."""

    def __init__(self, after: int, what: str):
        from tasks.train.objectives import CausalLM

        self.inner, self.calls, self.after, self.what = CausalLM(), 0, after, what

    def count(self, batch):
        return self.inner.count(batch)

    def loss(self, model, batch):
        self.calls += 1
        out = self.inner.loss(model, batch)
        if self.calls < self.after:
            return out
        if self.what == "loss":
            return {"sum": out["sum"] * float("nan")}
        return {"sum": out["sum"] + (model.lm_head.weight[0, 0] * 0).sqrt()}


@pytest.mark.parametrize("what", ["loss", "grad"])
@pytest.mark.parametrize("log_every", [1, 2, 5])
def test_a_diverging_run_stops_before_checkpointing_it(tmp_path, log_every, what):
    """Records are read from the device one step late; a checkpoint still never follows a NaN loss or
    gradient, whether or not the bad step was a log step, and every train record precedes its step's
    checkpoint."""
    from tasks.train.engine import TrainConfig, train

    cfg = TrainConfig(out_dir=str(tmp_path), steps=8, seq_len=16, micro_batch=2, global_batch=2, lr=1e-3,
                      warmup_steps=1, log_every=log_every, ckpt_every=1, keep_last=10, threads=1)
    model_cfg = ModelConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    data = PackedBatches(ArrayDocuments(docs_of([5, 9, 30, 7, 12])), seq_len=16)
    with pytest.raises(FloatingPointError, match="by step 4"):
        train(cfg, lambda: Transformer(model_cfg), TurnsNaN(after=4, what=what), data)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [f"step_0000000{i}" for i in (1, 2, 3)]
    records = read_metrics(tmp_path / "metrics.jsonl")
    logged = [r["step"] for r in records if r["kind"] == "train"]
    last_logged = 4 if what == "grad" else 3  # a finite loss is still logged at the bad step
    assert logged == [s for s in range(1, last_logged + 1) if s % log_every == 0]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    order = [(r["kind"], r["step"]) for r in records if r["kind"] in ("train", "checkpoint")]
    for s in logged:
        if s < 4:
            assert order.index(("train", s)) < order.index(("checkpoint", s))


class FailsAt:
    """A causal-LM objective that raises on its `at`-th call (an OOM or a data error mid-run)."""

    def __init__(self, at: int):
        from tasks.train.objectives import CausalLM

        self.inner, self.calls, self.at = CausalLM(), 0, at

    def count(self, batch):
        return self.inner.count(batch)

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("out of memory (simulated by the test objective)")
        return self.inner.loss(model, batch)


def test_the_last_logged_step_is_recorded_when_the_next_step_fails(tmp_path):
    """A step's record is written while the next step runs; if that step fails, the record still lands."""
    from tasks.train.engine import TrainConfig, train

    cfg = TrainConfig(out_dir=str(tmp_path), steps=8, seq_len=16, micro_batch=2, global_batch=2, lr=1e-3,
                      warmup_steps=1, log_every=1, ckpt_every=0, threads=1)
    model_cfg = ModelConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    data = PackedBatches(ArrayDocuments(docs_of([5, 9, 30, 7, 12])), seq_len=16)
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, lambda: Transformer(model_cfg), FailsAt(4), data)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3]
