"""What every task's predictor shares: the protocol the CLI and server use, the declarations of
its options and results they are built from, the engine-backed attributes, and the softmax."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from bertrt.engine import Engine
from bertrt.manifest import Manifest

OPTION_TYPES = (int, str, bool)


@dataclass(frozen=True)
class Option:
    """One keyword option of a predictor's predict(), declared once: the server's request field
    and the CLI's flag are built from it.

    Args:
        type: int, str or bool.
        default: what predict() takes when the option is not given (None: off).
        help: what it does, one line; the server's field description and the CLI's help.
        choices: the values a str option takes.
        minimum: the least an int option takes.
        maximum: the most an int option takes.
        maximum_labels: at most the loaded model's label count (known only once it is loaded).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    maximum_labels: bool = False

    def __post_init__(self) -> None:
        if self.type not in OPTION_TYPES:
            raise TypeError(f"option {self.name}: type must be one of {OPTION_TYPES}")
        if self.choices and self.type is not str:
            raise TypeError(f"option {self.name}: only a str option has choices")
        bounded = self.minimum is not None or self.maximum is not None or self.maximum_labels
        if bounded and self.type is not int:
            raise TypeError(f"option {self.name}: only an int option has bounds")
        if self.choices and self.default not in self.choices:
            raise ValueError(f"option {self.name}: default {self.default!r} not in its choices")


@dataclass(frozen=True)
class Doc:
    """The description of a field of a RESULT TypedDict: `Annotated[float, Doc("probability")]`."""

    text: str


class Result(Protocol):
    def as_dict(self) -> Mapping[str, Any]: ...


class Predictor(Protocol):
    """What the CLI and the server need of any task's predictor."""

    engine: Engine
    task: str
    OPTIONS: ClassVar[tuple[Option, ...]]  # the keyword options of predict() but batch_size
    RESULT: ClassVar[type]  # the TypedDict of what its results' as_dict() returns
    TEXTS: ClassVar[str]  # what the texts it takes are, e.g. "texts to classify, in order"
    OUTPUTS: ClassVar[dict[str, dict[int, str]]]  # the graph's outputs -> their dynamic axes
    LABELLED: ClassVar[bool]  # its outputs score labels.json (not the vocabulary)
    SCHEMA_NAME: ClassVar[str]  # the server's schemas are {SCHEMA_NAME}Request and ...Response

    def predict(self, texts: Sequence[str], batch_size: int = 32, **options: Any) -> list[Any]: ...

    def metadata(self) -> dict[str, Any]: ...


class EngineBacked:
    """The attributes every predictor shares, read from its engine."""

    engine: Engine

    @property
    def folder(self) -> Path:
        return self.engine.folder

    @property
    def manifest(self) -> Manifest:
        return self.engine.manifest

    @property
    def variant(self) -> str:
        return self.engine.variant

    @property
    def provider(self) -> str:
        return self.engine.provider

    @property
    def labels(self) -> list[str]:
        return self.engine.labels

    def metadata(self) -> dict[str, Any]:
        return self.engine.metadata()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
