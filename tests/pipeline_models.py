"""Shared by test_eval.py and test_export.py (not a test module): the real upstream of eval and
export, built once per test process.

upstream(tmp_path_factory) -> Upstream with
  tokenizer, shard  the tokenizer and shard stages run through the runner on real text (Song ci and
                    Alpaca answers from ../shared/data, committed as a `dedup` artifact);
  pretrain          the real pretrain stage: a tiny Qwen3-shaped model trained for 60 steps on CPU;
  sft, dpo          artifacts shaped like those stages' (model_artifact: ArtifactStore.begin/commit
                    of an hf/ directory written by model.save_hf_dir), with random weights;
  final             a `dpo`-shaped artifact holding a copy of the trained model, for export.
`profile(**stages)` gives a validated profile with these settings and any eval/export settings.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from storage.artifacts import ArtifactStore
from storage.keys import stage_key
from storage.manifest import Manifest, list_files
from tasks.registry import all_stages
from tasks.runner import run_stage
from token_corpus import corpus_records, documents_artifact

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CMMLU = DATA / "eval" / "cmmlu-dev"
PRETRAIN = {
    "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 160},
    "seq_len": 128, "global_batch": 8, "micro_batch": 8, "steps": 60, "lr": 3e-3, "warmup_steps": 4,
    "eval_every": 0, "eval_tokens": 4000, "ckpt_every": 0, "log_every": 20, "threads": 2,
}


@dataclass
class Upstream:
    home: Path
    store: ArtifactStore
    tokenizer: Manifest
    shard: Manifest
    pretrain: Manifest  # trained
    sft: Manifest  # random weights
    dpo: Manifest  # random weights
    final: Manifest  # a `dpo` artifact holding the trained model: what export exports

    def models(self, **chosen: Manifest) -> dict[str, Manifest]:
        """Inputs for eval: the model stages and reward (these fixtures unless `chosen`), tokenizer, shard."""
        found = {"pretrain": self.pretrain, "sft": self.sft, "dpo": self.dpo, **chosen}
        from tasks.stages.eval import MODEL_STAGES  # later model stages (ppo, grpo, distill, ...): random-weight artifacts

        found.update({s: model_artifact(self.store, s, self.tokenizer, seed=10 + i)
                      for i, s in enumerate([*MODEL_STAGES, "reward"]) if s not in found})
        return {**found, "tokenizer": self.tokenizer, "shard": self.shard}

    def profile(self, tracking: bool = False, **stages):
        from profiles.schema import profile_model

        return profile_model().model_validate({
            "name": "model-test", "store": {"root": str(self.home / "artifacts")},
            "tracking": {"enabled": tracking, "uri": f"sqlite:///{self.home / 'mlflow.db'}", "experiment": "t"},
            "stages": {"tokenizer": TOKENIZER, "shard": SHARD, "pretrain": PRETRAIN, **stages},
        })


TOKENIZER = {"vocab_size": 2048, "sample_chars": 300_000, "heldout_chars": 10_000}
SHARD = {"val_fraction": 0.05, "shard_mb": 0.2, "row_group_tokens": 4096}
_built: dict[str, Upstream] = {}


def model_artifact(store: ArtifactStore, stage: str, tok: Manifest, source: Manifest | None = None,
                   seed: int = 0, init_std: float = 0.02) -> Manifest:
    """Commit an artifact shaped like a model stage's (`stage`: pretrain, sft, dpo): hf/ holds a copy
    of `source`'s hf/ (another model artifact) or, without one, a random-weights Qwen3 model with a
    1024-token context, with the tokenizer stage's files."""
    from model import ModelConfig, Transformer, save_hf_dir

    config = {"fixture": "model", "source": source.key if source else None, "seed": seed, "init_std": init_std}
    key = stage_key(stage, 1, config, {"tokenizer": tok.key})
    found = store.load_manifest(stage, key)
    if found is not None:
        return found
    out = store.begin(stage, key)
    if source is not None:
        shutil.copytree(Path(store.local_path(source, "hf/config.json")).parent, out.path / "hf")
    else:
        torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=int(tok.extra["vocab_size"]), hidden_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, intermediate_size=160, max_seq_len=1024, init_std=init_std,
                          extra={"eos_token_id": int(tok.extra["eos_id"]), "pad_token_id": int(tok.extra["pad_id"])})
        save_hf_dir(Transformer(cfg), Path(store.local_path(tok, "tokenizer.json")).parent, out.path / "hf")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = Manifest(stage=stage, key=key, stage_version=1, files=list_files(out.path), counts={},
                        config=config, upstream={"tokenizer": tok.key}, versions={}, started_at=now,
                        finished_at=now, seconds=0.0, extra={"hf_dir": "hf"})
    store.commit(out, manifest)
    return manifest


def upstream(tmp_path_factory) -> Upstream:
    if "up" in _built:
        return _built["up"]
    home = tmp_path_factory.mktemp("model-upstream")
    store = ArtifactStore(str(home / "artifacts"), home)
    up = Upstream(home, store, None, None, None, None, None, None)  # type: ignore[arg-type]
    profile = up.profile()
    records = corpus_records([f"corpus/song-ci-simplified/ci.song.{n}.json" for n in (0, 1000)], alpaca=1000)
    docs = documents_artifact(store, [records[: len(records) // 2], records[len(records) // 2:]], name="models")
    stages = all_stages()
    up.tokenizer = run_stage(stages["tokenizer"], profile, {"dedup": docs}, store)
    up.shard = run_stage(stages["shard"], profile, {"dedup": docs, "tokenizer": up.tokenizer}, store)
    up.pretrain = run_stage(stages["pretrain"], profile, {"tokenizer": up.tokenizer, "shard": up.shard}, store)
    up.sft = model_artifact(store, "sft", up.tokenizer, seed=1)
    up.dpo = model_artifact(store, "dpo", up.tokenizer, seed=2)
    up.final = model_artifact(store, "dpo", up.tokenizer, source=up.pretrain)
    _built["up"] = up
    return up
