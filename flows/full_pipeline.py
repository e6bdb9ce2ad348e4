"""Flow `slm`: the whole pipeline for a profile (deployment `slm/full-pipeline`).

Parameters: profile (a name under profiles/ or a path), overrides (["path.to.key=value",
...]), until / only (a stage name). Stages come from the registry in DAG order.
"""
from __future__ import annotations

import flows  # noqa: F401  (sets Prefect defaults before prefect is imported)
from prefect import flow

from flows.pipeline import run_pipeline


def stop_training(flow, flow_run, state) -> None:
    """Cancel / crash hook: stop the training processes this flow-run process started. Each gets
    SIGTERM, saves a checkpoint and exits (a rerun resumes from it); one that does not exit within
    its grace period is killed with its process group."""
    from tasks.train.launch import stop_all

    stop_all()


@flow(name="slm", log_prints=True, on_cancellation=[stop_training], on_crashed=[stop_training])
def slm(profile: str = "demo", overrides: list[str] | None = None, until: str | None = None,
        only: str | None = None) -> dict[str, dict]:
    return run_pipeline("slm", profile, overrides, until=until, only=only)


if __name__ == "__main__":
    slm()
