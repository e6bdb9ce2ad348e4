"""Prefect flows (`slm`, `slm-data`) and the `slm` command line."""
import os

# No network for telemetry here or on most clusters; a user can still turn it on.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
