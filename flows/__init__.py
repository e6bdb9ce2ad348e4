"""Prefect flows (`slm`, `slm-data`) and the `slm` command line."""
import os

# No network for telemetry here or on most clusters; a user can still turn it on.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Prefect's state lives beside our artifacts (as `make up` expects) unless the user
# already points Prefect somewhere.
if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
    from storage.home import project_home

    os.environ["PREFECT_HOME"] = str(project_home() / "prefect")
