"""Calibration: how well a classifier's scores match how often it is right, and temperature
scaling (Guo et al., 2017) fitted on validation."""

from __future__ import annotations

import itertools

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


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


def nll(logits: np.ndarray, truth: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / temperature)."""
    scaled = logits / temperature
    shifted = scaled - scaled.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-log_probs[np.arange(len(truth)), truth].mean()) if len(truth) else 0.0


def fit_temperature(logits: np.ndarray, truth: np.ndarray) -> float:
    """The temperature that minimises validation NLL (Guo et al., 2017): one number, so the
    predicted labels never change, only how confident the scores are."""
    from scipy.optimize import minimize_scalar

    if not len(truth):
        return 1.0
    found = minimize_scalar(
        lambda log_t: nll(logits, truth, float(np.exp(log_t))),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return round(float(np.exp(found.x)), 6)


def calibration(
    val_logits: np.ndarray,
    val_truth: np.ndarray,
    logits: np.ndarray,
    truth: np.ndarray,
    bins: int,
) -> dict[str, float]:
    """Temperature fitted on validation; test ECE and NLL before and after applying it."""
    temperature = fit_temperature(val_logits, val_truth)
    before, after = softmax(logits), softmax(logits / temperature)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(before, truth, bins),
        "ece_after": expected_calibration_error(after, truth, bins),
        "nll_before": nll(logits, truth),
        "nll_after": nll(logits, truth, temperature),
    }
