"""What MLflow holds about a pipeline run, read back through MlflowClient from a real SQLite store:
the parent run (the resolved profile as params, overrides as tags, a name that says what ran), the
experiment's kind (classic ML, not GenAI) and telemetry off by default. A stage run's record (params,
files, links, system metrics) is checked after a whole `slm run` in tests/faults/test_faults.py,
which reuses that module's pipeline run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from profiles.loader import load_profile
from storage.tracking import CLASSIC_ML, EXPERIMENT_KIND, MAX_PARAM_CHARS, RECORD_MAX_BYTES, Tracker, flatten, record_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one runs MLflow's migrations: seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_the_parent_run_holds_the_resolved_profile_and_the_overrides(make_profile, tmp_path, store_uri):
    corpus = tmp_path / "notes.txt"
    corpus.write_text("今天天气很好。\n", encoding="utf-8")
    path = make_profile({"sources": {"notes": {"kind": "local", "path": str(corpus), "format": "lines"}}}, "rec")
    secret = "PWparent5d1c"
    overrides = ["runtime.workers=3", "stages.pretrain.micro_batch=2",
                 f"sources.web={{kind: http, format: lines, url: 'http://ann:{secret}@127.0.0.1:9/a.txt'}}"]
    profile = load_profile(str(path), overrides)
    tracker = Tracker(store_uri, "slm")
    run = tracker.client.get_run(tracker.pipeline_run("flow-run-1", profile, "slm", overrides))

    params = run.data.params
    assert len(params) > 100  # more than one log_batch call takes
    assert params["runtime.workers"] == "3"
    assert params["stages.pretrain.micro_batch"] == "2"  # a runtime knob: not in any stage key, still recorded
    assert params["stages.pretrain.model.hidden_size"] == str(profile.stages.pretrain.model.hidden_size)
    assert params["sources.web.url"] == "http://***@127.0.0.1:9/a.txt"
    tags = run.data.tags
    assert tags["slm.override.runtime.workers"] == "3"
    assert tags["slm.override.stages.pretrain.micro_batch"] == "2"
    assert tags["slm.profile"] == "rec" and tags["prefect.flow_run_id"] == "flow-run-1"
    name = run.info.run_name
    assert name.startswith("rec · slm · ") and "runtime.workers=3" in name and "stages.pretrain.micro_batch=2" in name
    everything = " ".join([name, *params.values(), *tags.values()])
    assert secret not in everything and "***" in tags["slm.override.sources.web"]

    # a retried flow run continues the same parent run
    assert tracker.pipeline_run("flow-run-1", profile, "slm", overrides) == run.info.run_id


def test_long_values_are_cut_to_what_mlflow_takes():
    flat = flatten("", {"a": {"b": "x" * (MAX_PARAM_CHARS + 10), "c": [1, 2]}}, {})
    assert len(flat["a.b"]) == MAX_PARAM_CHARS and flat["a.b"].endswith("…")
    assert flat["a.c"] == "[1, 2]"


def test_the_experiment_is_a_classic_ml_experiment(store_uri):
    uri = store_uri
    tracker = Tracker(uri, "slm")
    assert tracker.client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND] == CLASSIC_ML
    # an experiment made before (no kind, or one the UI guessed) is marked; a kind a user chose is kept
    old = tracker.client.create_experiment("old")
    chosen = tracker.client.create_experiment("chosen", tags={EXPERIMENT_KIND: "genai_development"})
    assert Tracker(uri, "old").client.get_experiment(old).tags[EXPERIMENT_KIND] == CLASSIC_ML
    assert Tracker(uri, "chosen").client.get_experiment(chosen).tags[EXPERIMENT_KIND] == "genai_development"


def test_mlflow_telemetry_is_off_unless_the_user_turns_it_on():
    # MLflow itself stays quiet under pytest and CI: those variables are removed to see our default.
    quiet = {"PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}
    env = {k: v for k, v in os.environ.items() if k not in quiet}
    env["PYTHONPATH"] = str(ROOT)
    probe = ("import os, storage.tracking\n"
             "from mlflow.telemetry import get_telemetry_client\n"
             "from mlflow.telemetry.utils import is_telemetry_disabled\n"
             "print(get_telemetry_client() is None, is_telemetry_disabled())\n"
             "os.environ['MLFLOW_DISABLE_TELEMETRY'] = 'false'\n"  # what a user sets to turn it on
             "print(is_telemetry_disabled())\n")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True", "False"]


def test_a_stage_run_copies_record_files_and_links_the_rest():
    record = record_files([("_MANIFEST.json", 9), ("report.md", 10), ("report.png", 20), ("tokenizer.json", 30),
                           ("checkpoint/model.safetensors", 1000), ("checkpoint/model_config.json", 5),
                           ("hf/config.json", 5), ("hf/model.safetensors", 900), ("docs/00.parquet", 400),
                           ("huge.json", RECORD_MAX_BYTES + 1), ("plots/a.png", 3), ("plots/b.svg", 4)],
                          skip_under="hf")
    assert record.copy == ["report.md", "report.png", "tokenizer.json", "plots/a.png", "plots/b.svg"]
    # a directory goes whole or not at all: no lone config file of a checkpoint
    assert record.link == {"checkpoint": {"files": 2, "bytes": 1005}, "hf": {"files": 2, "bytes": 905},
                           "docs": {"files": 1, "bytes": 400}, "huge.json": {"files": 1, "bytes": RECORD_MAX_BYTES + 1}}
