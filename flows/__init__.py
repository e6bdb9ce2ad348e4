"""Prefect flows (`slm`, `slm-data`) and the `slm` command line."""
import os
from pathlib import Path

# No network for telemetry here or on most clusters; a user can still turn it on.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Without a server, each run starts Prefect's ephemeral API; on a fresh home its database
# migrations can take longer than Prefect's 20 s default on a slow or busy laptop.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

# Prefect's state lives beside our artifacts (as `make up` expects) unless the user
# already points Prefect somewhere.
if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
    from storage.home import project_home

    os.environ["PREFECT_HOME"] = str(project_home() / "prefect")
if "PREFECT_HOME" in os.environ:
    # Prefect does not create missing parents (a fresh clone has no .slm/ yet).
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
