"""MLflow glue: one parent run per flow run, one nested run per stage that does work.

Uses MlflowClient with explicit run ids (no global "active run"), so it is safe from
Prefect's worker threads and child processes. The default store is SQLite under the
project home; `make up` serves the same file over HTTP. MLflow is imported lazily:
the training engine must import on machines without it.

Never pass secrets here: params are the stage's config slice, which by design holds
no credentials (tokens and keys come from the environment).
"""
from __future__ import annotations

import json
import re
import time
from typing import Any

MAX_PARAM_CHARS = 500


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"} (lists and long values as truncated JSON)."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        out[prefix or "value"] = text[:MAX_PARAM_CHARS]
    return out


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id if found
            else self.client.create_experiment(experiment, artifact_location=artifact_location)
        )

    def pipeline_run(self, flow_run_id: str | None, profile: str, flow_name: str) -> str:
        """The parent run of this flow run; a retried flow run reuses its earlier parent."""
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
        tags = {"prefect.flow_run_id": flow_run_id or "", "slm.profile": profile, "slm.flow": flow_name}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"{flow_name}-{profile}")
        return run.info.run_id

    def stage_run(self, parent_id: str | None, stage: str, key: str, config: dict) -> str:
        tags = {"slm.stage": stage, "slm.key": key}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=stage)
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten("", config, {}).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[start : start + 100])
        return run.info.run_id

    def log_metrics(self, run_id: str, values: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(re.sub(r"[^\w\-. :/]", "_", k), float(v), now, step or 0) for k, v in values.items()]  # MLflow's name charset
        for start in range(0, len(metrics), 500):
            self.client.log_batch(run_id, metrics=metrics[start : start + 500])

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

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

    def finish(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
