"""Flow `slm-data`: only the data stages (download ... shard), for a CPU work pool."""
from __future__ import annotations

import flows  # noqa: F401
from prefect import flow

from flows.pipeline import run_pipeline


@flow(name="slm-data", log_prints=True)
def slm_data(profile: str = "demo", overrides: list[str] | None = None, until: str | None = None,
             only: str | None = None) -> dict[str, dict]:
    return run_pipeline("slm-data", profile, overrides, until=until, only=only, group="data")
