"""The gate a variant passes to ship: label agreement with the PyTorch reference and the task
metric's drop, on the test set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

# Accuracy drop is compared as a fraction; this absorbs float noise in 1/n steps.
EPS = 1e-9


def gate(
    outputs: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray,
    min_agreement: float,
    max_metric_drop: float,
    score: Callable[[np.ndarray], float] | None = None,
) -> dict[str, Any]:
    """Label agreement with PyTorch where `mask` is valid, max |dlogit|, and the drop of the
    task metric (`score`: accuracy, entity F1) from the PyTorch outputs to these."""
    if outputs.shape != reference.shape:
        raise ValueError(f"outputs {outputs.shape} and reference {reference.shape} differ")
    got, want = (outputs[mask], reference[mask]) if outputs.ndim == 3 else (outputs, reference)
    n = len(want)
    if n == 0:
        return {"positions": 0, "passed": False, "reason": "not evaluated: nothing to gate on"}
    agree = got.argmax(-1) == want.argmax(-1)
    result: dict[str, Any] = {
        "positions": n,
        "agreement": float(agree.mean()),
        "label_disagreements": int((~agree).sum()),
        "max_abs_logit_diff": float(np.abs(got - want).max()),
        "min_agreement": min_agreement,
        "max_metric_drop": max_metric_drop,
        "score": None,
        "reference_score": None,
        "metric_drop": None,
    }
    reasons = []
    if result["agreement"] < min_agreement:
        reasons.append(f"agreement {result['agreement']:.4f} < {min_agreement}")
    if score is not None:
        result["score"] = float(score(outputs))
        result["reference_score"] = float(score(reference))
        result["metric_drop"] = result["reference_score"] - result["score"]
        if result["metric_drop"] > max_metric_drop + EPS:
            reasons.append(f"metric drop {result['metric_drop']:.4f} > {max_metric_drop}")
    result["passed"] = not reasons
    if reasons:
        result["reason"] = "; ".join(reasons)
    return result
