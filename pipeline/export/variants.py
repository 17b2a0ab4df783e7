"""Optimised fp32, fp16 and int8 variants of the exported graph, each gated against PyTorch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertrt import manifest as manifest_io
from bertrt.contract import BASE_VARIANT, INT8_WEIGHTS, OPTIONAL_VARIANTS, VARIANT_FILES
from bertrt.engine import Engine, open_engine
from bertrt.manifest import Manifest
from bertrt.session import CPU, CUDA, DeviceError, int8_kernels
from pipeline.export import gates, graphs, int8_search, smoothing

log = logging.getLogger(__name__)


PRECISIONS = {"fp32-optimized": "fp32", "fp16": "fp16", "int8": "int8", "int8-portable": "int8"}


# The providers each variant is built for; the runtime picks fp16 on CUDA, fp32-optimized on CPU.
PROVIDERS = {"fp32-optimized": [CUDA, CPU], "fp16": [CUDA], "int8": [CPU], "int8-portable": [CPU]}


def _open(folder: Path, name: str) -> tuple[Engine | None, str]:
    """An engine on the variant's own device; fp16 tries CUDA first, then the CPU."""
    if name != "fp16":
        return open_engine(folder, device="cpu", variant=name, verify=False), ""
    try:
        return open_engine(folder, device="cuda", variant=name, verify=False), ""
    except DeviceError:
        log.info("fp16: no CUDA session starts here; gating it on the CPU instead")
    try:
        return open_engine(folder, device="cpu", variant=name, verify=False), ""
    except Exception as exc:  # any failure to start is the recorded reason it is not shipped
        return None, f"not evaluated: no CUDA, and the CPU cannot run it ({exc})"


def _evaluate(
    folder: Path,
    name: str,
    encodings: list[Any],
    reference: np.ndarray,
    mask: np.ndarray,
    score: Callable[[np.ndarray], float] | None,
    min_agreement: float,
    max_metric_drop: float,
    batch_size: int,
) -> dict[str, Any]:
    engine, reason = _open(folder, name)
    size = (folder / VARIANT_FILES[name]).stat().st_size
    if engine is None:
        return {"positions": 0, "bytes": size, "provider": None, "passed": False, "reason": reason}
    outputs, _ = engine.infer(encodings, batch_size)
    result = gates.gate(outputs, reference, mask, min_agreement, max_metric_drop, score)
    result.update(bytes=size, provider=engine.provider)
    if name == "fp16" and engine.provider == CPU:
        # ORT's CPU provider wraps most fp16 nodes in Casts to fp32: this checks the fp16 weights
        # and the tensors between nodes, not the CUDA kernels' fp16 arithmetic.
        result["note"] = "gated on CPU (no CUDA here); CUDA fp16 kernels not exercised"
    return result


def add_variants(
    folder: Path,
    manifest: Manifest,
    names: Sequence[str],
    encodings: list[Any],
    reference: np.ndarray,
    mask: np.ndarray,
    score: Callable[[np.ndarray], float] | None,
    num_heads: int,
    hidden_size: int,
    min_agreement: float,
    max_metric_drop: float,
    batch_size: int = 32,
    calibration: int8_search.Calibration | None = None,
    int8_search_agreement: float = 0.0,
    int8_smooth_alpha: float = 0.0,
) -> list[str]:
    """Build, gate and keep or delete each named variant in `folder`; return the shipped files.

    Shipped variants join manifest.variants, rejected ones go to manifest.rejected_variants with
    their gate; the caller re-writes manifest.files so its sha256 covers the shipped ones.
    """
    unknown = [name for name in names if name not in OPTIONAL_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(OPTIONAL_VARIANTS)}")
    base = folder / VARIANT_FILES[BASE_VARIANT]
    optimized = folder / VARIANT_FILES["fp32-optimized"]
    fused = {"cpu": graphs.optimize(base, optimized, num_heads, hidden_size, for_cpu=True)}
    names = list(dict.fromkeys(names))
    if "fp16" in names:
        full = folder / "model.fused.tmp.onnx"  # not shipped: the fp16 graph's fp32 source
        try:
            fused["fp16"] = graphs.optimize(base, full, num_heads, hidden_size)
            graphs.to_fp16(full, folder / VARIANT_FILES["fp16"])
        finally:
            full.unlink(missing_ok=True)
    candidates = {
        name: {
            "file": VARIANT_FILES[name],
            "precision": PRECISIONS[name],
            "providers": PROVIDERS[name],
            "fused_operators": fused.get(name, fused["cpu"]),
        }
        for name in names
    }
    # The runtime reads the manifest, so the candidates are listed before int8 is searched for
    # and each variant is gated.
    manifest.variants.update(candidates)
    manifest_io.write(folder, manifest)
    int8s = [name for name in INT8_WEIGHTS if name in candidates]
    if int8s:
        source = optimized
        try:
            smoothed = None
            if calibration is not None and int8_smooth_alpha > 0:
                source = folder / "model.smoothed.tmp.onnx"  # not shipped: int8's fp32 source
                ranges = smoothing.activation_ranges(folder, optimized, calibration[0], batch_size)
                smoothed = smoothing.smooth(optimized, source, ranges, int8_smooth_alpha)
                log.info("int8: smoothed activations %s", smoothed)
            shift = None
            for name in int8s:
                entry = candidates[name]
                entry["int8_weights"] = INT8_WEIGHTS[name]
                # The gate's int8 arithmetic is this CPU's, which the runtime compares with its
                # own; uint8 weights are summed exactly everywhere.
                entry["gated_int8_kernels"] = int8_kernels() if name == "int8" else "exact"
                if smoothed is not None:
                    entry["smoothing"] = smoothed
                if calibration is not None and int8_search_agreement > 0:
                    entry["search"] = int8_search.search_int8(
                        folder,
                        source,
                        calibration,
                        int8_search_agreement,
                        batch_size,
                        name,
                        shift,
                    )
                    # int8-portable ranks its nodes by int8's figures where int8's sums were
                    # exact: the same nodes and activations, only the weights' rounding differs.
                    # Where they saturate, int8's figures measure the saturation: it measures
                    # its own.
                    if name == "int8" and entry["gated_int8_kernels"] == "exact":
                        shift = entry["search"].get("mean_abs_logit_shift")
                else:
                    graphs.to_int8(
                        source, folder / VARIANT_FILES[name], weights=INT8_WEIGHTS[name]
                    )
        finally:
            if source != optimized:
                source.unlink(missing_ok=True)
    if "fp32-optimized" not in candidates:
        optimized.unlink()
    shipped = []
    for name, entry in candidates.items():
        entry["gate"] = _evaluate(
            folder,
            name,
            encodings,
            reference,
            mask,
            score,
            min_agreement,
            max_metric_drop,
            batch_size,
        )
        entry["shipped"] = entry["gate"]["passed"]
        if entry["shipped"]:
            shipped.append(entry["file"])
            log.info("variant %s shipped: %s", name, _summary(entry["gate"]))
            continue
        (folder / entry["file"]).unlink()
        manifest.rejected_variants[name] = manifest.variants.pop(name)
        log.warning("variant %s NOT shipped: %s", name, entry["gate"]["reason"])
    return shipped


def _summary(result: dict[str, Any]) -> str:
    drop = result["metric_drop"]
    return (
        f"agreement {result['agreement']:.4f} on {result['positions']} positions, metric drop "
        f"{'n/a' if drop is None else f'{drop:.4f}'}, max |dlogit| "
        f"{result['max_abs_logit_diff']:.2e}, {result['bytes']} bytes, on {result['provider']}"
    )
