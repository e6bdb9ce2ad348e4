"""Fault injection, a sampled subset (the full sweep: scripts/fault_sweep.py). See fault_support.py.

Which scenarios run is drawn from SLM_FAULTS_SEED (default 15, printed in each test id's outcome):
SLM_FAULTS_KILLS kill -9 points (default 1), SLM_FAULTS_CORRUPTIONS damaged artifacts (default 3),
SLM_FAULTS_FULL disk-full stages (default 1; needs root to mount a tmpfs, skipped otherwise). With
the defaults the module takes about 3-4 minutes on 2 cores: one uninterrupted baseline run, then
one killed-and-resumed run, three repairs and one disk-full run.
"""
from __future__ import annotations

import os
import random

import pytest

from fault_support import STAGES, Home, can_mount_tmpfs, corrupt_one, disk_full, kill_inside

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(900)]

SEED = int(os.environ.get("SLM_FAULTS_SEED", "15"))


def sampled(kind: str, default: int) -> list[str]:
    count = min(len(STAGES), int(os.environ.get(f"SLM_FAULTS_{kind.upper()}", str(default))))
    return sorted(random.Random(f"{SEED}-{kind}").sample(STAGES, count), key=STAGES.index)


def scenario_seed(kind: str, stage: str) -> int:
    return random.Random(f"{SEED}-{kind}-{stage}").randrange(2**31)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted run of the fault profile: the artifacts every scenario is compared with."""
    home = Home(tmp_path_factory.mktemp("faults") / "baseline")
    log = home.root / "baseline.log"
    assert home.run(log) == 0, log.read_text(errors="replace")[-3000:]
    return home, home.manifests()


def test_mlflow_holds_each_stage_record(baseline):
    """The baseline run as MLflow shows it (read before any scenario changes that home): every stage
    that did work has a run under the flow's parent run with its params, its record files (the data
    report and plot, the tokenizer, _MANIFEST.json) and links.json to what stays in the artifact
    store (checkpoints); training stages also have system metrics."""
    import json

    from mlflow.tracking import MlflowClient

    home, manifests = baseline
    client = MlflowClient(tracking_uri=f"sqlite:///{home.root / 'slm' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("slm")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parent, = client.search_runs([experiment.experiment_id], "tags.`slm.flow` = 'slm'")
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("faults · slm · ")
    assert parent.data.params["stages.pretrain.steps"] == "40" and parent.data.params["runtime.workers"] == "1"
    runs = {r.data.tags["slm.stage"]: r for r in client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert set(runs) == set(STAGES)

    def files(run, path=None) -> set[str]:
        found = set()
        for item in client.list_artifacts(run.info.run_id, path):
            found |= files(run, item.path) if item.is_dir else {item.path}
        return found

    for stage, run in runs.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.params, stage
        assert run.data.tags["slm.key"] == manifests[stage].key
        assert {"_MANIFEST.json", "links.json"} <= files(run), stage
    assert "report.md" in files(runs["clean"])
    assert {"report.md", "report.png"} <= files(runs["dedup"])  # the data report of the whole corpus run
    assert {"tokenizer.json", "tokenizer_config.json"} <= files(runs["tokenizer"])
    assert runs["pretrain"].data.params["model.hidden_size"] == "64"
    links = json.loads(open(client.download_artifacts(runs["pretrain"].info.run_id, "links.json")).read())
    assert links["not_copied"]["checkpoint"]["uri"] == f"{links['artifact']}/checkpoint"
    assert links["not_copied"]["checkpoint"]["files"] >= 3
    assert not any(p.startswith("checkpoint/") for p in files(runs["pretrain"]))  # linked, not copied in part
    for stage in ("pretrain", "sft"):
        metrics = runs[stage].data.metrics
        assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
        assert "loss" in metrics
    assert not any(k.startswith("system/") for k in runs["clean"].data.metrics)  # data stages: not sampled


def report(outcome) -> None:
    print(f"{outcome.scenario} (seed {outcome.seed}): {outcome.detail}: {'recovered' if outcome.ok else 'FAILED'}")
    assert outcome.ok, "\n".join(outcome.problems)


@pytest.mark.parametrize("stage", sampled("kills", 1))
def test_kill_9_inside_a_stage_then_rerun_equals_an_uninterrupted_run(baseline, tmp_path, stage):
    _, expected = baseline
    report(kill_inside(Home(tmp_path / "killed"), stage, expected, scenario_seed("kill", stage)))


@pytest.mark.parametrize("stage", sampled("corruptions", 3))
def test_a_corrupted_artifact_is_detected_moved_aside_and_recomputed(baseline, stage):
    home, expected = baseline
    report(corrupt_one(home, stage, expected, scenario_seed("corrupt", stage)))


@pytest.mark.parametrize("stage", sampled("full", 1))
def test_a_full_disk_fails_clearly_and_commits_nothing(baseline, tmp_path, stage):
    why = can_mount_tmpfs(tmp_path / "probe")
    if why:
        pytest.skip(why)
    _, expected = baseline
    report(disk_full(tmp_path / "full", stage, expected, scenario_seed("full", stage)))
