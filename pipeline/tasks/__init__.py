"""What differs by task, behind one `Task` interface; the registry maps task names to them."""

from __future__ import annotations

from bertrt.predictors import FILL_MASK, TASKS, TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION
from pipeline.tasks.base import Task
from pipeline.tasks.masked_lm.task import MaskedLM
from pipeline.tasks.text_classification.task import TextClassification
from pipeline.tasks.token_classification.task import TokenClassification

# Task name (declared in bertrt.contract) -> the class implementing it.
REGISTRY: dict[str, type[Task]] = {
    TEXT_CLASSIFICATION: TextClassification,
    TOKEN_CLASSIFICATION: TokenClassification,
    FILL_MASK: MaskedLM,
}


def get(name: str) -> Task:
    """The task implementation for `name` (a `base.task` value)."""
    if name not in REGISTRY:
        raise ValueError(f"base.task: {name!r} has no implementation; use one of {list(TASKS)}")
    return REGISTRY[name]()


__all__ = ["REGISTRY", "Task", "get"]
