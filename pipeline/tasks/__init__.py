"""What differs by task: model class, tokenisation with labels, metrics."""

from __future__ import annotations

from types import ModuleType


def get(task: str) -> ModuleType:
    """The module that implements `task` (only text classification so far)."""
    if task == "text-classification":
        from pipeline.tasks import text_classification

        return text_classification
    raise ValueError(f"base.task: {task!r} has no implementation; use text-classification")
