"""MLflow glue: one parent run per flow run, one nested run per stage that does work.

Uses MlflowClient with explicit run ids (no global "active run"), so it is safe from
Prefect's worker threads and child processes. The default store is SQLite under the
project home; `make up` serves the same file over HTTP. MLflow is imported lazily:
the training engine must import on machines without it.

What a run holds:
  parent run   the resolved profile as params (flattened keys, runtime knobs included), each
               override as a tag `slm.override.<key>`, a name saying profile, flow, time and
               what was overridden; tag `prefect.flow_run_id` (a retried flow run reuses it);
  stage run    the stage's config slice as params, its counts and metrics, its record files
               copied (reports, plots, tokenizer, JSON facts: see record_files) with
               _MANIFEST.json, links.json pointing at what stays in the artifact store
               (checkpoints, corpus data), and for training stages system metrics (CPU, memory,
               disk, network; GPU when nvidia-ml-py is installed) sampled by MLflow's monitor.
The experiment is created as a classic ML experiment (`mlflow.experimentKind`), so the UI shows
runs, charts and models rather than its GenAI views. MLflow's usage telemetry is off unless the
user sets MLFLOW_DISABLE_TELEMETRY=false.

Never pass secrets here unredacted: params and tags go through storage/redact.py (callers pass
the config slice already redacted; the profile and overrides are redacted here).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from storage.redact import redact, redact_text

log = logging.getLogger(__name__)

# Read by MLflow when it is imported (mlflow/__init__.py starts its telemetry client then),
# so it is set before the lazy imports below. A user who wants telemetry sets it to false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# MLflow 3.17's limits (mlflow/utils/validation.py): param values 6000 characters (servers before
# 2.x took 500), keys 250, 100 params or tags per log_batch call.
MAX_PARAM_CHARS = 6000
MAX_KEY_CHARS = 250
BATCH = 100
EXPERIMENT_KIND = "mlflow.experimentKind"
CLASSIC_ML = "custom_model_development"  # MLflow's value for "not GenAI" (its UI and docs)


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists and scalars as JSON, values longer than MLflow
    takes cut and ended with "…"."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        out[_fit(prefix or "value", MAX_KEY_CHARS)] = _fit(text, MAX_PARAM_CHARS)
    return out


def settings_values(model: Any) -> Any:
    """A pydantic settings object as JSON-shaped data, fields marked exclude=True (runtime knobs,
    left out of stage keys and of model_dump) included: the whole resolved profile."""
    from pydantic import BaseModel
    from pydantic_core import to_jsonable_python

    if isinstance(model, BaseModel):
        return {name: settings_values(getattr(model, name)) for name in type(model).model_fields}
    if isinstance(model, dict):
        return {str(k): settings_values(v) for k, v in model.items()}
    if isinstance(model, (list, tuple)):
        return [settings_values(v) for v in model]
    return to_jsonable_python(model)


def run_name(profile: str, flow_name: str, overrides: list[str], now: datetime | None = None) -> str:
    """e.g. "demo · slm · 2026-12-04 15:30 · runtime.workers=8" (overrides redacted)."""
    when = (now or datetime.now()).strftime("%Y-%m-%d %H:%M")
    changed = ", ".join(redact_text(o) for o in overrides) if overrides else "defaults"
    return _fit(f"{profile} · {flow_name} · {when} · {changed}", 250)


def override_tags(overrides: list[str]) -> dict[str, str]:
    """["a.b=1", "c=x"] -> {"slm.override.a.b": "1", "slm.override.c": "x"}, redacted."""
    tags = {}
    for override in overrides:
        key, _, value = redact_text(override).partition("=")
        tags[_fit(f"slm.override.{key.strip()}", MAX_KEY_CHARS)] = _fit(value.strip(), 8000)
    return tags


# What a stage run gets a copy of: the files a person reads (reports, plots, JSON facts, the
# tokenizer), up to RECORD_MAX_BYTES each. Corpus data, shards and weights stay in the artifact
# store and are linked (links.json), so MLflow's store does not grow with the data.
RECORD_SUFFIXES = (".md", ".png", ".svg", ".html", ".json")
RECORD_MAX_BYTES = 8 << 20


@dataclass(frozen=True)
class Record:
    copy: list[str]  # relative paths to copy into the run
    link: dict[str, dict]  # top-level entry -> {"files": n, "bytes": n}: stays in the store


def record_files(files: list[tuple[str, int]], skip_under: str | None = None) -> Record:
    """Split an artifact's (path, size) list into files to copy and the rest, grouped by their
    top-level entry. A directory is copied whole or not at all (no lone config file of a
    checkpoint); `skip_under` (a logged model's directory) is linked, not copied."""
    groups: dict[str, list[tuple[str, int]]] = {}
    for path, size in files:
        if path != "_MANIFEST.json":
            groups.setdefault(path.split("/", 1)[0], []).append((path, size))
    copy, link = [], {}
    for name, members in groups.items():
        wanted = name != (skip_under or "").strip("/").split("/", 1)[0] and all(
            path.endswith(RECORD_SUFFIXES) and size <= RECORD_MAX_BYTES for path, size in members)
        if wanted:
            copy += [path for path, _ in members]
        else:
            link[name] = {"files": len(members), "bytes": sum(size for _, size in members)}
    return Record(copy, link)


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self._monitors: dict[str, Any] = {}
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location,
                                                               tags={EXPERIMENT_KIND: CLASSIC_ML})
        else:
            self.experiment_id = found.experiment_id
            kind = found.tags.get(EXPERIMENT_KIND)
            # No kind, or one the UI only guessed: say what it is (a kind a user chose is kept).
            if kind is None or kind.endswith("_inferred") or kind == "no_inferred_type":
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, CLASSIC_ML)

    def pipeline_run(self, flow_run_id: str | None, profile: Any, flow_name: str,
                     overrides: list[str] | None = None) -> str:
        """The parent run of this flow run; a retried flow run reuses its earlier parent.

        `profile` is the resolved profile (a pydantic model): its values become the params (redacted),
        the overrides tags and part of the run's name."""
        if flow_run_id:
            existing = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
                max_results=1,
            )
            if existing:
                run_id = existing[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
                return run_id
        overrides = list(overrides or [])
        tags = {"prefect.flow_run_id": flow_run_id or "", "slm.profile": profile.name, "slm.flow": flow_name,
                "slm.overrides": _fit(json.dumps([redact_text(o) for o in overrides], ensure_ascii=False), 8000),
                **override_tags(overrides)}
        run = self.client.create_run(self.experiment_id, tags=tags,
                                     run_name=run_name(profile.name, flow_name, overrides))
        self.log_params(run.info.run_id, redact(settings_values(profile)))
        return run.info.run_id

    def stage_run(self, parent_id: str | None, stage: str, key: str, config: dict,
                  system_metrics: bool = False) -> str:
        """A run for one stage; `config` is its (redacted) config slice. With `system_metrics`,
        MLflow's monitor samples CPU, memory, disk and network (and GPUs if nvidia-ml-py is there)
        until finish()."""
        tags = {"slm.stage": stage, "slm.key": key}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=stage)
        self.log_params(run.info.run_id, config)
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run.info.run_id, tracking_uri=self.uri)
            monitor.start()
            self._monitors[run.info.run_id] = monitor
        return run.info.run_id

    def log_params(self, run_id: str, values: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten("", values, {}).items()]
        for start in range(0, len(params), BATCH):
            self.client.log_batch(run_id, params=params[start : start + BATCH])

    def log_metrics(self, run_id: str, values: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(re.sub(r"[^\w\-. :/]", "_", k), float(v), now, step or 0) for k, v in values.items()]  # MLflow's name charset
        for start in range(0, len(metrics), 500):
            self.client.log_batch(run_id, metrics=metrics[start : start + 500])

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

    def log_dict(self, run_id: str, value: dict, name: str) -> None:
        self.client.log_dict(run_id, value, name)

    def log_model(self, run_id: str, name: str, local_dir: str, params: dict[str, str]) -> str:
        """An HF model directory -> an MLflow 3 LoggedModel linked to `run_id` (READY once every
        file is copied, FAILED if the copy breaks). Returns the model id."""
        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=run_id,
                                                params=params, model_type="hf-causal-lm")
        try:
            self.client.log_model_artifacts(model.model_id, local_dir)
        except BaseException:
            self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def stop_system_metrics(self, run_id: str) -> None:
        """Stop the run's monitor and log one last sample, so even a stage shorter than the
        sampling interval (10 s; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) has its figures."""
        monitor = self._monitors.pop(run_id, None)
        if monitor is None:
            return
        try:
            monitor.finish()
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as err:  # a last sample is not worth a stage, nor hiding why the stage failed
            log.warning("system metrics of MLflow run %s: the last sample was not logged (%s)", run_id, err)

    def finish(self, run_id: str, ok: bool) -> None:
        self.stop_system_metrics(run_id)
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
