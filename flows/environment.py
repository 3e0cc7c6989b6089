"""Process-wide settings applied before Prefect, MLflow or DVC are imported: no telemetry, local state.

Each is a default: a value already in the environment wins.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure(root: Path | None = None) -> None:
    from tasks.register import project_root

    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(project_root(root) / ".prefect"))
