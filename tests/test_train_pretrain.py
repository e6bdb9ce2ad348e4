"""The pretrain stage end to end on real text: tokenizer + shard stages -> pretrain (CPU, tiny model).

One pretraining run, interrupted the hard way: the stage process is killed with SIGKILL after
the first checkpoint; the engine notices, saves and exits; the stage run again resumes from
the checkpoint and commits an HF directory that stock transformers loads with our logits.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from storage.artifacts import ArtifactStore
from tasks.processes import alive
from tasks.registry import all_stages
from tasks.runner import open_tracker, run_stage
from tasks.train import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_corpus import corpus_records, documents_artifact  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# tiny and many steps: a kill after the first checkpoint lands mid-run on a fast machine too
SEQ, ROWS, STEPS = 32, 4, 200
PRETRAIN = {
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64},
    "seq_len": SEQ, "global_batch": ROWS, "micro_batch": ROWS, "steps": STEPS, "lr": 3e-3, "warmup_steps": 4,
    "eval_every": 100, "eval_tokens": 2000, "ckpt_every": 5, "log_every": 5, "threads": 1,
}


def profile_for(home: Path):
    from profiles.schema import profile_model

    return profile_model().model_validate({
        "name": "pretrain-test", "store": {"root": str(home / "artifacts")},
        "tracking": {"enabled": True, "uri": f"sqlite:///{home / 'mlflow.db'}", "experiment": "t"},
        "stages": {"tokenizer": {"vocab_size": 512, "sample_chars": 200_000, "heldout_chars": 10_000},
                   "shard": {"val_fraction": 0.05, "shard_mb": 0.1, "row_group_tokens": 4096},
                   "pretrain": PRETRAIN},
    })


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    home = tmp_path_factory.mktemp("pretrain-home")
    profile = profile_for(home)
    store = ArtifactStore(profile.store.root, home)
    records = corpus_records([f"corpus/song-ci-simplified/ci.song.{n}.json" for n in (0, 1000)])
    docs = documents_artifact(store, [records[: len(records) // 2], records[len(records) // 2 :]])
    stages = all_stages()
    tok = run_stage(stages["tokenizer"], profile, {"dedup": docs}, store)
    shard = run_stage(stages["shard"], profile, {"dedup": docs, "tokenizer": tok}, store)
    return home, profile, store, {"tokenizer": tok, "shard": shard}


def test_killed_stage_resumes_and_exports_a_model_transformers_loads(upstream, monkeypatch, tmp_path):
    home, profile, store, inputs = upstream
    stage = all_stages()["pretrain"]
    (home / "inputs.json").write_text(json.dumps({k: m.model_dump(mode="json") for k, m in inputs.items()}))
    script = textwrap.dedent(f"""
        import json, sys
        from storage.artifacts import ArtifactStore
        from storage.manifest import Manifest
        from tasks.registry import all_stages
        from tasks.runner import run_stage
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_train_pretrain import profile_for
        from pathlib import Path
        home = Path({str(home)!r})
        profile = profile_for(home)
        inputs = {{k: Manifest.model_validate(v) for k, v in json.loads((home / "inputs.json").read_text()).items()}}
        run_stage(all_stages()["pretrain"], profile, inputs, ArtifactStore(profile.store.root, home))
    """)
    first = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL)
    partial = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and first.poll() is None:
        found = list((home / "artifacts" / "pretrain").glob("*.partial/_work/engine/checkpoints/step_*"))
        found = [p for p in found if not p.name.endswith(".tmp")]
        if found:
            partial = found[0].parents[3]
            break
        time.sleep(0.05)
    assert partial is not None, "no checkpoint appeared"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    work = partial / "_work" / "engine"
    engine_pid = int((work / "engine.pid").read_text())
    deadline = time.monotonic() + 30
    while alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(engine_pid), "the engine outlived its stage process"
    stopped_at = ckpt.checkpoint_step(ckpt.latest_checkpoint(work / "checkpoints"))
    assert 5 <= stopped_at < STEPS

    tracker = open_tracker(profile)
    parent = tracker.pipeline_run(None, profile, "test")
    manifest = run_stage(stage, profile, inputs, store, tracker, parent)

    assert manifest.extra["resumed_from"] == f"step_{stopped_at:08d}"
    assert manifest.counts["steps"] == STEPS and manifest.counts["tokens"] == STEPS * ROWS * SEQ
    files = {f.path for f in manifest.files}
    assert {"hf/config.json", "hf/model.safetensors", "hf/tokenizer.json", "hf/tokenizer_config.json",
            "checkpoint/model.safetensors", "checkpoint/optimizer.pt", "checkpoint/trainer.pt"} <= files
    assert not any(p.startswith("_work") for p in files)
    assert 0 < manifest.extra["final_val"]["val_bpb"] < 8

    # MLflow got the engine's metrics through this process (the engine never imports mlflow)
    run = tracker.client.get_run(manifest.mlflow_run_id)
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib", "val_loss", "val_bpb"):
        assert name in run.data.metrics, name
    history = tracker.client.get_metric_history(manifest.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == list(range(5, STEPS + 1, 5))  # no duplicates from the killed attempt

    # the model is an MLflow LoggedModel of the stage's run, its files equal to the artifact's hf/
    import mlflow

    model_id = run.data.tags["slm.model_id"]
    logged = tracker.client.get_logged_model(model_id)
    assert logged.source_run_id == manifest.mlflow_run_id and logged.status.to_proto() == 2  # READY
    mlflow.set_tracking_uri(tracker.uri)
    copy = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_id}", dst_path=str(tmp_path / "logged")))
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (copy / name).read_bytes() == store.local_path(manifest, f"hf/{name}").read_bytes(), name

    # the export loads in stock transformers and gives our model's logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model import ModelConfig, Transformer

    hf_dir = store.local_path(manifest, "hf/config.json").parent
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ckpt_dir = store.local_path(manifest, "checkpoint/model.safetensors").parent
    ours = Transformer(ModelConfig.from_dict(ckpt.load_model_config(ckpt_dir)))
    ours.load_state_dict(ckpt.load_weights(ckpt_dir))
    ids = torch.tensor([tok.encode("春风又绿江南岸，明月何时照我还。")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.eval()(ids), rtol=1e-4, atol=1e-4)
    assert hf.config.eos_token_id == inputs["shard"].extra["eos_id"]


def test_continued_pretraining_starts_from_the_hf_model(upstream, tmp_path):
    from profiles.schema import profile_model

    from model import ModelConfig, Transformer, save_hf_dir
    from tasks.stages.pretrain import PretrainError, config
    from tasks.shard_reader import ShardReader
    from tasks.train import CausalLM, PackedBatches

    home, profile, store, inputs = upstream
    tok_dir = store.local_path(inputs["tokenizer"], "tokenizer.json").parent
    torch.manual_seed(1)
    base = Transformer(ModelConfig(vocab_size=inputs["shard"].extra["vocab_size"], hidden_size=48, num_layers=1,
                                   num_heads=4, num_kv_heads=2, intermediate_size=96, max_seq_len=64))
    hf_dir = save_hf_dir(base, tok_dir, tmp_path / "base")
    data = profile.model_dump(mode="json")
    data["stages"]["pretrain"] = {**PRETRAIN, "init_from": str(hf_dir), "steps": 4, "warmup_steps": 1,
                                  "eval_every": 0, "ckpt_every": 0, "log_every": 1}
    cont = profile_model().model_validate(data)
    tracker = open_tracker(cont)
    manifest = run_stage(all_stages()["pretrain"], cont, inputs, store, tracker, tracker.pipeline_run(None, cont, "test"))

    assert manifest.extra["init_from"] == str(hf_dir)
    assert manifest.extra["model_config"]["hidden_size"] == 48  # the HF model's shape, not stages.pretrain.model
    # the first step's loss is the HF model's loss on the first packed batch: its weights were loaded
    train_files = [str(store.local_path(inputs["shard"], s["path"]))
                   for s in inputs["shard"].extra["shards"] if s["split"] == "train"]
    batch = PackedBatches(ShardReader(train_files, seed=0), SEQ).next_batch(ROWS)
    with torch.no_grad():
        expected = CausalLM().loss(base, {k: torch.from_numpy(v) for k, v in batch.items()})["sum"].item() / (ROWS * SEQ)
    first = [m.value for m in tracker.client.get_metric_history(manifest.mlflow_run_id, "loss") if m.step == 1]
    assert first == [pytest.approx(expected, rel=1e-5)]
    exported = json.loads(store.local_path(manifest, "hf/config.json").read_text())
    assert exported["hidden_size"] == 48 and exported["num_hidden_layers"] == 1

    # the key follows what the directory holds; another tokenizer is refused before any training
    (hf_dir / "config.json").write_text((hf_dir / "config.json").read_text() + "\n")
    assert config(cont).init_digest != manifest.config["init_digest"]
    other = tmp_path / "other"
    other.mkdir()
    for f in hf_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    text = json.loads((other / "tokenizer.json").read_text())
    vocab = text["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(text))
    data["stages"]["pretrain"]["init_from"] = str(other)
    with pytest.raises(PretrainError, match="another tokenizer"):
        run_stage(all_stages()["pretrain"], profile_model().model_validate(data), inputs, store)
