"""Training on two nodes: two `slm`-like processes on 127.0.0.1 (CPU, gloo, one engine process
each), node 0 and node 1 of runtime.nnodes 2, run the pretrain stage on one shared store and
train like one node with the same global batch; node 1 commits nothing and returns node 0's
manifest."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from profiles.schema import profile_model
from storage.artifacts import ArtifactStore
from storage.errors import SlmError
from storage.tracking import Tracker
from tasks.registry import all_stages
from tasks.runner import run_stage
from tasks.train.launch import Nodes
from tasks.train.nodes import join_stage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_corpus import corpus_records, documents_artifact  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = "sqlite:///{tmp}/mlflow.db"  # one database, used by one process at a time
PRETRAIN = {
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64},
    "seq_len": 32, "global_batch": 4, "micro_batch": 2, "steps": 6, "lr": 3e-3, "warmup_steps": 2,
    "eval_every": 0, "eval_tokens": 500, "ckpt_every": 3, "log_every": 1, "threads": 1, "nproc": 1,
}


def profile_for(root: Path, runtime: dict | None = None):
    return profile_model().model_validate({
        "name": "nodes-test", "store": {"root": str(root)}, "tracking": {"enabled": False, "log_models": False},
        "runtime": runtime or {},
        "stages": {"tokenizer": {"vocab_size": 512, "sample_chars": 100_000, "heldout_chars": 5_000},
                   "shard": {"val_fraction": 0.05, "shard_mb": 0.1, "row_group_tokens": 4096},
                   "pretrain": PRETRAIN},
    })


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


NODE = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from storage.artifacts import ArtifactStore
from storage.manifest import Manifest
from storage.errors import SlmError
from storage.tracking import Tracker
from tasks.registry import all_stages
from tasks.runner import run_stage
from test_train_nodes import profile_for
profile = profile_for(Path({root!r}), {runtime!r})
inputs = {{k: Manifest.model_validate(v) for k, v in json.loads(Path({inputs!r}).read_text()).items()}}
tracker = Tracker({mlflow!r}, "t") if profile.runtime.node_rank == 0 else None
made = run_stage(all_stages()["pretrain"], profile, inputs, ArtifactStore(profile.store.root, Path({home!r})), tracker)
print("MANIFEST", made.key, made.mlflow_run_id)
"""


def test_two_nodes_train_like_one_with_the_same_global_batch(tmp_path):
    shared = tmp_path / "shared-store"  # the folder every node mounts at the same path
    store = ArtifactStore(str(shared), tmp_path / "home0")
    records = corpus_records([f"corpus/song-ci-simplified/ci.song.{n}.json" for n in (0,)])
    docs = documents_artifact(store, [records[: len(records) // 2], records[len(records) // 2:]])
    stages = all_stages()
    one = profile_for(shared)
    tok = run_stage(stages["tokenizer"], one, {"dedup": docs}, store)
    shard = run_stage(stages["shard"], one, {"dedup": docs, "tokenizer": tok}, store)
    # the reference: one node, one process, the same global batch (2 micro-batches of 2 rows accumulated)
    started = time.monotonic()
    single = run_stage(stages["pretrain"], one, {"tokenizer": tok, "shard": shard}, store,
                       tracker=Tracker(MLFLOW.format(tmp=tmp_path), "t"))
    store.move_aside("pretrain", single.key, "the one-node reference; the two nodes train the same key again")
    print(f"one node: {time.monotonic() - started:.1f} s")

    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"tokenizer": tok.model_dump(mode="json"), "shard": shard.model_dump(mode="json")}))

    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    nodes, started = [], time.monotonic()
    for rank in (1, 0):  # node 1 first: it waits for node 0's engine and joins it
        runtime = {"nnodes": 2, "node_rank": rank, "rdzv_endpoint": endpoint}
        script = NODE.format(tests=str(ROOT / "tests"), root=str(shared), runtime=runtime, inputs=str(inputs),
                             home=str(tmp_path / f"home{rank}"), mlflow=MLFLOW.format(tmp=tmp_path))
        nodes.append(subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    try:
        for proc in nodes:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in nodes:
            proc.kill()
    for proc, text in zip(nodes, outputs):
        assert proc.returncode == 0, text[-3000:]
    print(f"two nodes: {time.monotonic() - started:.1f} s")
    made = [line for text in outputs for line in text.splitlines() if line.startswith("MANIFEST")]
    assert len(made) == 2 and made[0] == made[1], outputs  # node 1 returns node 0's manifest
    two = store.load_manifest("pretrain", made[0].split()[1])
    assert two.counts["processes"] == 1  # per node
    work = shared / "pretrain" / f"{two.key[:16]}.partial"
    assert not work.exists()  # committed once, by node 0

    assert two.key == single.key  # runtime.* is not part of the key
    client = MlflowClient(MLFLOW.format(tmp=tmp_path))

    def losses(run_id: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]

    want, got = losses(single.mlflow_run_id), losses(two.mlflow_run_id)
    assert len(got) == len(want) == PRETRAIN["steps"]
    np.testing.assert_allclose(got, want, rtol=2e-5)  # same rows per step; only float sums differ


def test_a_training_node_k_refuses_an_object_store_root(s3, tmp_path):
    """Nodes K > 0 share the stage's working folder with node 0: an s3:// root cannot be that."""
    store = ArtifactStore(s3.url("artifacts"), tmp_path)
    with pytest.raises(SlmError, match="runtime.node_rank 1: .*store.root must be a folder mounted at the same "
                                       "path on every node"):
        join_stage("pretrain", "0" * 64, store, Nodes(2, 1, "127.0.0.1:29500"))
