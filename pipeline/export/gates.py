"""The gate a variant passes to ship: label agreement with the PyTorch reference and the task
metric's drop, on the test set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bertrt.contract import VARIANTS

# Accuracy drop is compared as a fraction; this absorbs float noise in 1/n steps.
EPS = 1e-9


def gate(
    outputs: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray,
    min_agreement: float,
    max_metric_drop: float,
    score: Callable[[np.ndarray], float] | None = None,
    reference_score: float | None = None,
) -> dict[str, Any]:
    """Label agreement with PyTorch where `mask` is valid, max |dlogit|, and the drop of the
    task metric (`score`: accuracy, entity F1) from the PyTorch outputs to these
    (`reference_score`: the reference's, when already scored)."""
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
        if reference_score is None:
            reference_score = score(reference)
        result["reference_score"] = float(reference_score)
        result["metric_drop"] = result["reference_score"] - result["score"]
        if result["metric_drop"] > max_metric_drop + EPS:
            reasons.append(f"metric drop {result['metric_drop']:.4f} > {max_metric_drop}")
    result["passed"] = not reasons
    if reasons:
        result["reason"] = "; ".join(reasons)
    return result


def table(report: dict[str, Any]) -> list[str]:
    """The export report's graphs as text rows: each one's gate against PyTorch (agreement, or
    parity for the exported graph), metric drop, size, and shipped or why not."""
    rows = [("variant", "agreement", "drop", "MB", "shipped")]
    found = {**report.get("variants", {}), **report.get("rejected_variants", {})}
    order = list(VARIANTS)  # the contract's order: the exported graph first
    for name in sorted(found, key=lambda n: order.index(n) if n in order else len(order)):
        result = found[name]
        agreement, drop = result.get("agreement"), result.get("metric_drop")
        rows.append(
            (
                name,
                "parity" if agreement is None else f"{agreement:.4f}",
                "" if drop is None else f"{drop:.4f}",
                f"{result['bytes'] / 2**20:.1f}" if "bytes" in result else "",
                "yes" if result.get("passed") else f"no: {result.get('reason', '')}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[4]
        for row in rows
    ]
