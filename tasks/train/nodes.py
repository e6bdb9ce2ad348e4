"""A training node K > 0 (runtime.node_rank): it joins the training engines node 0 starts, nothing else.

join_stage(stage, key, store, nodes, poll_seconds) -> Manifest
  Every node runs the same `slm run` with its own runtime.node_rank. Node 0 runs every stage as on
  one machine; for a training stage, its torchrun is node 0 of runtime.nnodes (tasks/train/launch.py)
  and writes `torchrun-nodes.json` (the run.json to train, the processes per node) into the stage's
  working directory `<store.root>/<stage>/<key>.partial/_work/engine/` first, anew at every attempt.
  Node K computes nothing and commits nothing: for each stage it waits until the artifact is
  committed (and returns node 0's manifest) while joining every attempt of node 0's engine it sees
  (torchrun with node rank K on the same run.json; its log is `engine-node<K>.log` there). A join
  that fails (node 0 stopped, the rendezvous timed out) is logged and the node waits for node 0's
  next attempt or the artifact.
Needs   store.root a local path on a folder that every node mounts at the same path: the nodes
        share run.json, the checkpoints (written by rank 0, resumed by every rank) and the ranks'
        RNG files through it.
Fails   with an SlmError naming store.root when the root is an object-store URL.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from storage.artifacts import ArtifactStore
from storage.errors import SlmError
from storage.keys import short
from storage.manifest import Manifest
from tasks.train.launch import JOIN_FILE, Nodes, run_engine

ENGINE_DIR = "_work/engine"  # where every training stage runs its engine (out.scratch / "engine")


def engine_dir(store: ArtifactStore, stage: str, key: str) -> Path:
    return Path(store.partial_path(stage, key)) / ENGINE_DIR


def join_stage(stage: str, key: str, store: ArtifactStore, nodes: Nodes, poll_seconds: float = 1.0) -> Manifest:
    if not store.is_local:
        raise SlmError(f"runtime.node_rank {nodes.node_rank}: the training nodes share the stage's working "
                       f"directory, so store.root must be a folder mounted at the same path on every node, "
                       f"not {store.root}")
    work = engine_dir(store, stage, key)
    joined: float | None = None  # mtime of the torchrun-nodes.json last joined
    announced = False
    while True:
        manifest = store.load_manifest(stage, key)
        if manifest is not None:
            return manifest
        join = work / JOIN_FILE
        try:
            stamp = join.stat().st_mtime_ns
            plan = json.loads(join.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not there yet (or being replaced)
            stamp = None
        if stamp is not None and stamp != joined:
            joined = stamp
            print(f"{stage}/{short(key)}: node {nodes.node_rank} joins node 0's training "
                  f"({plan['nnodes']} nodes x {plan['nproc']} processes)", flush=True)
            code = run_engine(Path(plan["config"]), work, nproc=int(plan["nproc"]), poll_seconds=poll_seconds,
                              log_path=work / f"engine-node{nodes.node_rank}.log", nodes=nodes)
            if code != 0:
                print(f"{stage}/{short(key)}: node {nodes.node_rank}'s engine exited with status {code} (see "
                      f"{work / f'engine-node{nodes.node_rank}.log'}); waiting for node 0", flush=True)
            continue
        if not announced:
            print(f"{stage}/{short(key)}: node {nodes.node_rank} waits for node 0 to commit it", flush=True)
            announced = True
        time.sleep(poll_seconds)
