"""One predictor per task; the registry maps a manifest's task to its class. A predictor
declares its task's name, its graph's outputs, its options and its results: the export, the
server and the CLI read them from here."""

from __future__ import annotations

from bertrt.contract import INPUT_AXES
from bertrt.predictors.base import Doc, EngineBacked, Option, Predictor, Result, softmax
from bertrt.predictors.fill_mask import FILL_MASK, FillMask
from bertrt.predictors.text_classification import TEXT_CLASSIFICATION, Prediction, TextClassifier
from bertrt.predictors.token_classification import (
    TOKEN_CLASSIFICATION,
    Entity,
    Tagging,
    TokenClassifier,
)

REGISTRY: dict[str, type[Predictor]] = {
    cls.task: cls for cls in (TextClassifier, TokenClassifier, FillMask)
}
TASKS: tuple[str, ...] = tuple(REGISTRY)


def output_names(task: str) -> tuple[str, ...]:
    """The graph's output names for `task`."""
    return tuple(REGISTRY[task].OUTPUTS)


def dynamic_axes(input_names: tuple[str, ...], task: str) -> dict[str, dict[int, str]]:
    """Batch and sequence axes on every input; the task's axes on every output."""
    axes: dict[str, dict[int, str]] = {name: dict(INPUT_AXES) for name in input_names}
    axes.update({name: dict(out) for name, out in REGISTRY[task].OUTPUTS.items()})
    return axes


__all__ = [
    "FILL_MASK",
    "REGISTRY",
    "TASKS",
    "TEXT_CLASSIFICATION",
    "TOKEN_CLASSIFICATION",
    "Doc",
    "EngineBacked",
    "Entity",
    "FillMask",
    "Option",
    "Prediction",
    "Predictor",
    "Result",
    "Tagging",
    "TextClassifier",
    "TokenClassifier",
    "dynamic_axes",
    "output_names",
    "softmax",
]
