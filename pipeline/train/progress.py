"""What the fine-tune prints while it trains: one progress bar and one line per evaluation.

The Trainer's own progress callback writes every logged step's dict under its bar (dozens of
lines a run) and opens a second bar per evaluation; the losses already go to MLflow and to the
stage's curves. transformers' load report (a table of every head key it initialised) becomes one
line of ours, as a new head on a base checkpoint is what fine-tuning means.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from transformers.trainer_callback import ProgressCallback

log = logging.getLogger(__name__)

# transformers logs its load report under this logger and with this title.
REPORT_LOGGER = "transformers.modeling_utils"
REPORT_TITLE = "LOAD REPORT"
EVAL_PREFIX = "eval_"
# Throughput fields of an evaluation: the stage reports its own timings.
EVAL_TIMINGS = ("runtime", "samples_per_second", "steps_per_second")


class StageProgress(ProgressCallback):
    """The Trainer's training bar, without its per-step dicts or its evaluation bar; each
    evaluation becomes one line written under the bar."""

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        return None

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        line = evaluation_line(logs or {}, state.epoch)
        if line and state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.write(line)


def evaluation_line(logs: dict[str, Any], epoch: float | None) -> str | None:
    """`epoch 2: validation loss 0.3936, accuracy 0.8217` from an evaluation's logs; None for
    the logs of a training step or of the run's end."""
    values = {
        key.removeprefix(EVAL_PREFIX): value
        for key, value in logs.items()
        if key.startswith(EVAL_PREFIX) and key.removeprefix(EVAL_PREFIX) not in EVAL_TIMINGS
    }
    if not values:
        return None
    shown = ", ".join(
        f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
        for name, value in values.items()
    )
    return f"epoch {epoch or 0:g}: validation {shown}"


class _DropReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return REPORT_TITLE not in str(record.msg)


@contextmanager
def load_report_as_one_line() -> Iterator[None]:
    """While a base checkpoint loads with `output_loading_info=True`: transformers' load report
    is dropped (its content is what `describe_loading` says in one line); its other records
    pass."""
    logger = logging.getLogger(REPORT_LOGGER)
    drop = _DropReport()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def describe_loading(info: dict[str, Any]) -> str:
    """One line from `from_pretrained(..., output_loading_info=True)`'s info: which weights the
    checkpoint did not have (initialised here), which it had that the model does not use, and
    which it had in another shape."""
    parts = []
    if info.get("missing_keys"):
        parts.append(f"initialised here: {_keys(info['missing_keys'])}")
    if info.get("mismatched_keys"):
        names = [
            entry[0] if isinstance(entry, tuple | list) else entry
            for entry in info["mismatched_keys"]
        ]
        parts.append(f"re-initialised (another shape in the checkpoint): {_keys(names)}")
    if info.get("unexpected_keys"):
        parts.append(f"not used from the checkpoint: {_keys(info['unexpected_keys'])}")
    return "; ".join(parts) if parts else "every weight loaded from the checkpoint"


def _keys(keys: Any, shown: int = 4) -> str:
    names = sorted(keys)
    listed = ", ".join(names[:shown])
    return listed if len(names) <= shown else f"{listed} and {len(names) - shown} more"
