"""Sequence classification: one label per text."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

TEXT = "text"
LABEL = "label"
# Set up front: the model would set it on its first forward pass, so a run resumed after the
# last step would otherwise save a different config.json.
MODEL_KWARGS = {"problem_type": "single_label_classification"}


def model_class() -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def tokenize_batch(
    tokenizer: Any, batch: dict[str, list], max_length: int, label2id: dict[str, int]
) -> dict[str, list]:
    """Token ids without padding (the collator pads per batch) and integer labels."""
    encoded = tokenizer(batch[TEXT], truncation=True, max_length=max_length)
    encoded["labels"] = [label2id[label] for label in batch[LABEL]]
    return encoded


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """Accuracy and macro-F1, the Trainer's model-selection metrics."""
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred
    predicted = np.asarray(logits).argmax(axis=-1)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """ECE with equal-width confidence bins (scikit-learn has no ECE)."""
    confidence = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in itertools.pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)
