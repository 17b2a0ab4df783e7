"""What every task's predictor shares: the protocol the CLI and server use, the engine-backed
attributes, and the softmax."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bertrt.engine import Engine
from bertrt.manifest import Manifest


class Result(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


class Predictor(Protocol):
    """What the CLI and the server need of any task's predictor."""

    engine: Engine
    task: str
    OPTIONS: tuple[str, ...]  # the keyword options its predict() takes besides batch_size

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
