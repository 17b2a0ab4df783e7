"""What differs by task, behind one `Task` interface; the registry maps task names to them."""

from __future__ import annotations

import importlib

from bertrt.contract import FILL_MASK, TASKS, TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION
from pipeline.tasks.base import Task

# Task name (declared in bertrt.contract) -> "module:class" implementing it.
REGISTRY: dict[str, str] = {
    TEXT_CLASSIFICATION: "pipeline.tasks.text_classification:TextClassification",
    TOKEN_CLASSIFICATION: "pipeline.tasks.token_classification:TokenClassification",
    FILL_MASK: "pipeline.tasks.masked_lm:MaskedLM",
}


def get(name: str) -> Task:
    """The task implementation for `name` (a `base.task` value)."""
    if name not in REGISTRY:
        raise ValueError(f"base.task: {name!r} has no implementation; use one of {list(TASKS)}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["REGISTRY", "Task", "get"]
