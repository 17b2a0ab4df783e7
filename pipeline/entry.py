"""The shared shape of a stage's `main`: logging set up once, known errors as one clear line."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pipeline")

# Errors whose message already names the file, row or key and the fix: no traceback needed.
KNOWN = (ValueError, FileNotFoundError, RuntimeError)


def guarded(run: Callable[[], Any]) -> int:
    """Call `run`; return 0, or 1 with the error's message on stderr."""
    logging.basicConfig(
        level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        run()
    except KNOWN as exc:
        if os.environ.get("PIPELINE_TRACEBACK"):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
