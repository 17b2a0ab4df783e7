"""MLflow calls during training that must not lose the training: the first failure ends them,
the rest are counted, and the stage says so once its model and reports are safely written.

A tracking server that dies an hour into training should cost a `make relog`, not the hour.
Everything MLflow would have received is also in the stage's reports (the curves, the summary),
so `pipeline.ops.relog` can fill the run in from them once the store answers again.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# MLflow retries an unreachable server for minutes by default (7 tries, doubling waits); a few
# seconds is enough to tell a dead server from a blip. The user's own settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingGap(RuntimeError):
    """Training finished and was saved, but some of it never reached MLflow."""


def short_retries() -> None:
    """Retry a dead tracking server for seconds, not minutes (unless the user set otherwise)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


class Gap:
    """Calls into MLflow that may fail without failing the stage; after the first failure the
    rest are skipped (each would wait out its retries again) and counted."""

    def __init__(self) -> None:
        self.first_failure: str | None = None
        self.failed_at: str | None = None
        self.skipped = 0

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.first_failure is not None:
            self.skipped += 1
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # any client or store error: training goes on without MLflow
            self.first_failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            self.failed_at = what
            self.skipped = 1
            log.warning(
                "MLflow stopped answering (%s: %s); training goes on and keeps everything in "
                "its reports; `make relog` fills the run in once the store is back",
                what,
                self.first_failure,
            )
            return None

    def as_dict(self) -> dict[str, Any] | None:
        """What the stage's report says of the gap (None when every call went through)."""
        if self.first_failure is None:
            return None
        return {"failed_at": self.failed_at, "error": self.first_failure, "skipped": self.skipped}


def mlflow_callback(gap: Gap) -> Any:
    """The Trainer's MLflow callback with every call made through `gap`, synchronously (an
    asynchronous queue would report a dead server only after the stage has finished)."""
    import mlflow
    from transformers.integrations import MLflowCallback

    class GuardedMLflowCallback(MLflowCallback):
        def setup(self, args: Any, state: Any, model: Any) -> None:
            self._initialized = True  # set first: a failed setup is not retried at every log
            gap.call("training params", super().setup, args, state, model)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any, **kwargs: Any) -> None:
            if not self._initialized:
                self.setup(args, state, kwargs.get("model"))
            if not state.is_world_process_zero:
                return
            metrics = {
                re.sub(r"[^0-9A-Za-z_\-\. :/]", "_", key): float(value)
                for key, value in logs.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            }
            gap.call(f"metrics at step {state.global_step}", mlflow.log_metrics, metrics,
                     step=state.global_step)  # fmt: skip

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            gap.call("checkpoint artifacts", super().on_save, args, state, control, **kwargs)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            """The stage ends the run itself, after the model is saved."""

        def __del__(self) -> None:
            """No end_run at garbage collection (the stage owns the run)."""

    return GuardedMLflowCallback()
