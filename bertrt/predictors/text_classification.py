"""Text classification: a label and a calibrated score per text, long texts read as evaluated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, NotRequired, TypedDict

import numpy as np

from bertrt.engine import CHUNK, Engine
from bertrt.long_text import aggregate
from bertrt.predictors.base import Doc, EngineBacked, Option, softmax

# The task's name, in manifests, params.yaml and the registry.
TEXT_CLASSIFICATION = "text-classification"


class LabelScore(TypedDict):
    label: str
    score: float


class PredictionOut(TypedDict):
    label: str
    score: Annotated[float, Doc("softmax probability of the label")]
    top_k: NotRequired[list[LabelScore]]


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    top_k: list[tuple[str, float]] | None = None

    def as_dict(self) -> PredictionOut:
        out: PredictionOut = {"label": self.label, "score": self.score}
        if self.top_k is not None:
            out["top_k"] = [{"label": label, "score": score} for label, score in self.top_k]
        return out


@dataclass
class TextClassifier(EngineBacked):
    """Sequence classification: a label per text."""

    engine: Engine
    task = TEXT_CLASSIFICATION
    # The graph's outputs and their dynamic axes (a label per text: one row of logits per text).
    OUTPUTS: ClassVar[dict[str, dict[int, str]]] = {"logits": {0: "batch"}}
    LABELLED = True  # scores over labels.json (else over the tokenizer's vocabulary)
    OPTIONS = (
        Option(
            "top_k",
            int,
            default=None,
            help="also return the k best labels with their scores",
            minimum=1,
            maximum_labels=True,
        ),
    )
    RESULT = PredictionOut
    TEXTS = "texts to classify, in order"
    SCHEMA_NAME = "Predict"

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
            windows = self.engine.encode(texts[start : start + CHUNK], first=start)
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
