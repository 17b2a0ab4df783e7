"""Code tests for the evaluate stage's metrics, calibration and mistake files."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.tasks.text_classification import task


def test_metrics_on_a_known_table() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    truth = np.array([0, 1, 1, 1])
    result = task.metrics(probs, truth, ["neg", "pos"], bins=10)
    assert result["overall"]["accuracy"] == pytest.approx(0.75)
    # neg: P=1/2, R=1, F1=2/3; pos: P=1, R=2/3, F1=0.8
    assert result["overall"]["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert result["overall"]["weighted_f1"] == pytest.approx((2 / 3 * 1 + 0.8 * 3) / 4)
    assert result["per_class"]["pos"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )


def test_ece_of_a_calibrated_and_an_overconfident_model() -> None:
    truth = np.array([0] * 8 + [1] * 2)
    calibrated = np.tile([0.8, 0.2], (10, 1))  # 80 % confident, 80 % right
    assert task.expected_calibration_error(calibrated, truth, bins=10) == pytest.approx(0.0)
    overconfident = np.tile([0.99, 0.01], (10, 1))
    assert task.expected_calibration_error(overconfident, truth, bins=10) == pytest.approx(0.19)


def test_softmax_rows_sum_to_one_and_keep_the_order() -> None:
    probs = task.softmax(np.array([[1000.0, 0.0], [0.0, 2.0]]))
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert probs.argmax(axis=1).tolist() == [0, 1]


def test_temperature_scaling_lowers_ece_of_an_overconfident_model() -> None:
    from pipeline.tasks.text_classification import calibration

    rng = np.random.default_rng(0)
    # 70 % right, but logits far apart: about 99 % confident.
    truth = rng.integers(0, 2, 2000)
    predicted = np.where(rng.random(2000) < 0.7, truth, 1 - truth)
    logits = np.zeros((2000, 2))
    logits[np.arange(2000), predicted] = 5.0
    val, test = slice(0, 1000), slice(1000, 2000)
    result = calibration.calibration(logits[val], truth[val], logits[test], truth[test], 15)
    assert result["temperature"] > 1.5  # softened
    assert result["ece_after"] < result["ece_before"] / 5
    assert result["nll_after"] < result["nll_before"]
    # A well-calibrated model keeps a temperature near 1.
    sharp = np.zeros((1000, 2))
    sharp[np.arange(1000), predicted[:1000]] = np.log(0.7 / 0.3)
    assert calibration.fit_temperature(sharp, truth[:1000]) == pytest.approx(1.0, abs=0.15)
