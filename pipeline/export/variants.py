"""Optimised fp32, fp16 and int8 variants of the exported graph, each gated against PyTorch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertrt import manifest as manifest_io
from bertrt.contract import BASE_VARIANT, CPU, OPTIMIZED_VARIANT, VARIANTS
from bertrt.engine import Engine, open_engine
from bertrt.manifest import Manifest, VariantEntry
from bertrt.session import DeviceError, int8_kernels
from pipeline.export import gates, graphs, int8_search, smoothing
from pipeline.export.options import ExportOptions, Reference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """The encoder's attention shape, which ONNX Runtime's fusions need."""

    num_heads: int
    hidden_size: int


def _open(folder: Path, name: str) -> tuple[Engine | None, str]:
    """An engine on the variant's own device: a GPU-only variant (fp16) tries CUDA first, then
    the CPU."""
    if CPU in VARIANTS[name].providers:
        return open_engine(folder, device="cpu", variant=name, verify=False), ""
    try:
        return open_engine(folder, device="cuda", variant=name, verify=False), ""
    except DeviceError:
        log.info("%s: no CUDA session starts here; gating it on the CPU instead", name)
    try:
        return open_engine(folder, device="cpu", variant=name, verify=False), ""
    except Exception as exc:  # any failure to start is the recorded reason it is not shipped
        return None, f"not evaluated: no CUDA, and the CPU cannot run it ({exc})"


def _evaluate(
    folder: Path, name: str, reference: Reference, options: ExportOptions
) -> dict[str, Any]:
    engine, reason = _open(folder, name)
    size = (folder / VARIANTS[name].file).stat().st_size
    if engine is None:
        return {"positions": 0, "bytes": size, "provider": None, "passed": False, "reason": reason}
    outputs, _ = engine.infer(reference.encodings, options.batch_size)
    result = gates.gate(
        outputs,
        reference.outputs,
        reference.mask,
        options.min_agreement,
        options.max_metric_drop,
        reference.score,
    )
    result.update(bytes=size, provider=engine.provider)
    if engine.provider not in VARIANTS[name].providers:
        # ORT's CPU provider wraps most fp16 nodes in Casts to fp32: this checks the fp16 weights
        # and the tensors between nodes, not the CUDA kernels' fp16 arithmetic.
        result["note"] = f"gated on CPU (no CUDA here); CUDA {name} kernels not exercised"
    return result


def add_variants(
    folder: Path,
    manifest: Manifest,
    options: ExportOptions,
    reference: Reference,
    shape: Shape,
    calibration: int8_search.Calibration | None = None,
) -> list[str]:
    """Build, gate and keep or delete each of `options.variants` in `folder`; return the
    shipped files.

    Shipped variants join manifest.variants, rejected ones go to manifest.rejected_variants with
    their gate; the caller re-writes manifest.files so its sha256 covers the shipped ones.
    """
    names = list(dict.fromkeys(options.variants))
    base = folder / VARIANTS[BASE_VARIANT].file
    optimized = folder / VARIANTS[OPTIMIZED_VARIANT].file
    heads, hidden = shape.num_heads, shape.hidden_size
    fused = {CPU: graphs.optimize(base, optimized, heads, hidden, for_cpu=True)}
    half = [name for name in names if VARIANTS[name].precision == "fp16"]
    for name in half:
        full = folder / "model.fused.tmp.onnx"  # not shipped: the fp16 graph's fp32 source
        try:
            fused[name] = graphs.optimize(base, full, heads, hidden)
            graphs.to_fp16(full, folder / VARIANTS[name].file)
        finally:
            full.unlink(missing_ok=True)
    candidates = {
        name: VariantEntry.of(name, fused_operators=fused.get(name, fused[CPU])) for name in names
    }
    # The runtime reads the manifest, so the candidates are listed before int8 is searched for
    # and each variant is gated.
    manifest.variants.update(candidates)
    manifest_io.write(folder, manifest)
    int8s = [name for name in names if VARIANTS[name].weights]
    if int8s:
        _add_int8(folder, optimized, int8s, candidates, options, calibration)
    if OPTIMIZED_VARIANT not in candidates:
        optimized.unlink()
    shipped = []
    for name, entry in candidates.items():
        entry.gate = _evaluate(folder, name, reference, options)
        entry.shipped = entry.gate["passed"]
        if entry.shipped:
            shipped.append(entry.file)
            log.info("variant %s shipped: %s", name, _summary(entry.gate))
            continue
        (folder / entry.file).unlink()
        manifest.rejected_variants[name] = manifest.variants.pop(name)
        log.warning("variant %s NOT shipped: %s", name, entry.gate["reason"])
    return shipped


def _add_int8(
    folder: Path,
    optimized: Path,
    names: list[str],
    entries: dict[str, VariantEntry],
    options: ExportOptions,
    calibration: int8_search.Calibration | None,
) -> None:
    """Write the int8 graphs from the optimised one: smoothed first when asked, with the nodes
    the search keeps in fp32, or everything int8."""
    source = optimized
    try:
        smoothed = None
        if calibration is not None and options.int8_smooth_alpha > 0:
            source = folder / "model.smoothed.tmp.onnx"  # not shipped: int8's fp32 source
            ranges = smoothing.activation_ranges(
                folder, optimized, calibration[0], options.batch_size
            )
            smoothed = smoothing.smooth(optimized, source, ranges, options.int8_smooth_alpha)
            log.info("int8: smoothed activations %s", smoothed)
        shift = None
        for name in names:
            entry = entries[name]
            weights = VARIANTS[name].weights
            entry.int8_weights = weights
            # The gate's int8 arithmetic is this CPU's, which the runtime compares with its own;
            # uint8 weights are summed exactly everywhere.
            entry.gated_int8_kernels = int8_kernels() if weights == "int8" else "exact"
            entry.smoothing = smoothed
            if calibration is None or options.int8_search_agreement <= 0:
                graphs.to_int8(source, folder / entry.file, weights=weights)
                continue
            entry.search = int8_search.search_int8(
                folder,
                source,
                calibration,
                options.int8_search_agreement,
                options.batch_size,
                name,
                shift,
            )
            # uint8-weight variants rank their nodes by an int8-weight variant's figures where
            # its sums were exact: the same nodes and activations, only the weights' rounding
            # differs. Where they saturate, those figures measure the saturation: each
            # measures its own.
            if weights == "int8" and entry.gated_int8_kernels == "exact":
                shift = entry.search.get("mean_abs_logit_shift")
    finally:
        if source != optimized:
            source.unlink(missing_ok=True)


def _summary(result: dict[str, Any]) -> str:
    drop = result["metric_drop"]
    return (
        f"agreement {result['agreement']:.4f} on {result['positions']} positions, metric drop "
        f"{'n/a' if drop is None else f'{drop:.4f}'}, max |dlogit| "
        f"{result['max_abs_logit_diff']:.2e}, {result['bytes']} bytes, on {result['provider']}"
    )
