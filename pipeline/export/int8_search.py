"""The int8 node search: the nodes whose quantisation moves the outputs most stay fp32 until
the label agreement with fp32 on calibration texts reaches its target."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertrt.contract import INT8_VARIANT, VARIANTS
from bertrt.engine import open_engine
from pipeline.export import graphs

log = logging.getLogger(__name__)


# Texts (their windows), fp32 outputs and valid positions the int8 search measures against.
Calibration = tuple[list[Any], np.ndarray, np.ndarray]


def search_int8(
    folder: Path,
    optimized: Path,
    calibration: Calibration,
    target: float,
    batch_size: int,
    variant: str = INT8_VARIANT,
    shift: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Quantise everything into `variant`'s file; while label agreement with fp32 on the
    calibration texts is below `target`, keep in fp32 the node whose int8 alone moves the outputs
    most (each node measured on its own, unless `shift` gives those figures from another int8
    variant's search), up to half of them. Returns what was measured, for the manifest."""
    dst = folder / VARIANTS[variant].file
    weights = VARIANTS[variant].weights or "int8"
    encodings, reference, mask = calibration

    nodes = graphs.quantizable(optimized)

    def measure(keep: Sequence[str] = (), only: str | None = None) -> tuple[float, float]:
        graphs.to_int8(optimized, dst, [n for n in nodes if n != only] if only else keep, weights)
        engine = open_engine(folder, device="cpu", variant=variant, verify=False)
        outputs, _ = engine.infer(encodings, batch_size)
        got, want = (outputs[mask], reference[mask]) if outputs.ndim == 3 else (outputs, reference)
        return float((got.argmax(-1) == want.argmax(-1)).mean()), float(np.abs(got - want).mean())

    agreement, _ = measure()
    result: dict[str, Any] = {"target": target, "all_int8_agreement": agreement, "kept_fp32": []}
    if agreement >= target:
        result["agreement"] = agreement
        return result
    if shift is None:
        shift = {node: measure(only=node)[1] for node in nodes}
        result["mean_abs_logit_shift"] = {n: round(v, 6) for n, v in shift.items()}
    else:  # the same nodes, ranked by another variant's figures
        result["shift_measured_on"] = INT8_VARIANT
        shift = {node: shift.get(node, 0.0) for node in nodes}
    keep: list[str] = []
    for node in sorted(nodes, key=shift.__getitem__, reverse=True)[: len(nodes) // 2]:
        keep.append(node)
        agreement, _ = measure(keep)
        log.info("%s: %s kept in fp32 -> agreement %.4f on calibration", variant, node, agreement)
        if agreement >= target:
            break
    if agreement < target:
        log.warning(
            "%s: agreement %.4f < %.4f, %d nodes in fp32", variant, agreement, target, len(keep)
        )
    result.update(kept_fp32=keep, agreement=agreement)
    graphs.to_int8(optimized, dst, keep, weights)
    return result
