"""The project home: where artifacts, the MLflow database and Prefect state live by default.

`SLM_HOME` wins; otherwise `./.slm` under the current directory (the checkout, for
`make run`). Nothing else in the project decides paths on its own.
"""
from __future__ import annotations

import os
from pathlib import Path


def project_home() -> Path:
    return Path(os.environ.get("SLM_HOME", ".slm")).resolve()
