"""Loading a model folder into the predictor of its task, and the text-classification predictor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bertrt.contract import FILL_MASK, TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION, VARIANT_FILES
from bertrt.engine import CHUNK, Engine, ModelFolderError, open_engine
from bertrt.long_text import aggregate
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


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    top_k: list[tuple[str, float]] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "score": self.score}
        if self.top_k is not None:
            out["top_k"] = [{"label": label, "score": score} for label, score in self.top_k]
        return out


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


@dataclass
class TextClassifier(EngineBacked):
    """Sequence classification: a label per text."""

    engine: Engine
    task = TEXT_CLASSIFICATION
    OPTIONS = ("top_k",)

    def logits(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Raw logits, one row per text, in the caller's order."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        texts = list(texts)
        result = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        how = self.engine.reading.aggregate
        for start in range(0, len(texts), CHUNK):
            windows = self.engine.encode(texts[start : start + CHUNK])
            # The windows of every text in one length-sorted pass, then one row per text.
            out, _ = self.engine.infer([w for per_text in windows for w in per_text], batch_size)
            result[start : start + len(windows)] = aggregate(out, [len(w) for w in windows], how)
        return result

    def predict(
        self, texts: Sequence[str], batch_size: int = 32, top_k: int | None = None
    ) -> list[Prediction]:
        """Label and calibrated softmax score per text (the logits divided by the manifest's
        temperature); `top_k` adds the k best labels with scores."""
        if top_k is not None and not 1 <= top_k <= len(self.labels):
            raise ValueError(f"top_k must be between 1 and {len(self.labels)}, got {top_k}")
        logits = self.logits(texts, batch_size).astype(np.float64)
        probs = softmax(logits / self.manifest.temperature)
        best = probs.argmax(axis=-1)
        predictions = []
        for row, label_id in zip(probs, best, strict=True):
            ranked = None
            if top_k is not None:
                ids = np.argsort(-row, kind="stable")[:top_k]
                ranked = [(self.labels[i], float(row[i])) for i in ids]
            predictions.append(Prediction(self.labels[label_id], float(row[label_id]), ranked))
        return predictions


def _predictors() -> dict[str, type]:
    from bertrt.fill_mask import FillMask
    from bertrt.token_classifier import TokenClassifier

    return {
        TEXT_CLASSIFICATION: TextClassifier,
        TOKEN_CLASSIFICATION: TokenClassifier,
        FILL_MASK: FillMask,
    }


def load(
    model_dir: str | Path,
    device: str = "auto",
    variant: str | None = None,
    threads: int = 0,
    tensorrt: bool = False,
    verify: bool = True,
) -> Any:
    """Open an exported model folder on `device` and return the predictor of its task.

    Args:
        device: "auto" (CUDA when a CUDA session really starts, else CPU), "cuda" or "cpu".
        variant: "fp32", "fp32-optimized", "fp16", "int8" or "int8-portable"; by default the
            shipped one built for the provider that runs a probe batch fastest at load
            (`engine.probe_s`).
        threads: intra-op threads on CPU; 0 lets ONNX Runtime decide.
        tensorrt: try TensorRT before CUDA where it loads.
        verify: check every file's sha256 against the manifest first.

    `model_dir` may also name a model bundled into this installation (`default`, `bundled`) or
    an MLflow registry URI (`models:/name@production`; needs mlflow).
    """
    if isinstance(model_dir, str):
        from bertrt.bundle import resolve_model

        model_dir = resolve_model(model_dir)
    engine = open_engine(model_dir, device, variant, threads, tensorrt, verify)
    predictor = _predictors().get(engine.manifest.task)
    if predictor is None:
        raise ModelFolderError(f"{model_dir}: task {engine.manifest.task!r} has no predictor")
    return predictor(engine)


__all__ = ["VARIANT_FILES", "Prediction", "Predictor", "TextClassifier", "load"]
