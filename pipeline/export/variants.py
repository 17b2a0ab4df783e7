"""Optimised fp32, fp16 and int8 variants of the exported graph, each gated against PyTorch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertrt import manifest as manifest_io
from bertrt.contract import BASE_VARIANT, CPU, OPTIMIZED_VARIANT, VARIANTS
from bertrt.engine import Engine
from bertrt.manifest import Manifest, VariantEntry
from bertrt.session import DeviceError, int8_kernels
from pipeline.export import gates, graphs, int8_search, sessions, smoothing
from pipeline.export.options import ExportOptions, Reference

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """The encoder's attention shape, which ONNX Runtime's fusions need."""

    num_heads: int
    hidden_size: int


def _open(base: Engine, name: str) -> tuple[Engine | None, str]:
    """The variant's graph on its own device: a GPU-only variant (fp16) tries CUDA first, then
    the CPU."""
    graph = base.folder / VARIANTS[name].file
    if CPU in VARIANTS[name].providers:
        return sessions.engine_on(base, graph, name), ""
    try:
        return sessions.engine_on(base, graph, name, device="cuda"), ""
    except DeviceError:
        log.info("%s: no CUDA session starts here; gating it on the CPU instead", name)
    try:
        return sessions.engine_on(base, graph, name), ""
    except Exception as exc:  # any failure to start is the recorded reason it is not shipped
        return None, f"not evaluated: no CUDA, and the CPU cannot run it ({exc})"


def _evaluate(
    base: Engine,
    name: str,
    reference: Reference,
    options: ExportOptions,
    reference_score: float | None,
) -> dict[str, Any]:
    engine, reason = _open(base, name)
    size = (base.folder / VARIANTS[name].file).stat().st_size
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
        reference_score,
    )
    result.update(bytes=size, provider=engine.provider)
    if engine.provider not in VARIANTS[name].providers:
        # ORT's CPU provider wraps most fp16 nodes in Casts to fp32: this checks the fp16 weights
        # and the tensors between nodes, not the CUDA kernels' fp16 arithmetic.
        result["note"] = f"gated on CPU (no CUDA here); CUDA {name} kernels not exercised"
    return result


def add_variants(
    engine: Engine,
    manifest: Manifest,
    options: ExportOptions,
    reference: Reference,
    shape: Shape,
    calibration: list[Any] | None = None,
) -> list[str]:
    """Build, gate and keep or delete each of `options.variants` in the folder `engine` is open
    on; return the shipped files.

    Each graph runs once on the reference's windows, and PyTorch's score on them is taken
    once for every gate. `calibration` holds the windows the int8 search and smoothing measure
    on. Shipped variants join manifest.variants, rejected ones go to manifest.rejected_variants
    with their gate; the caller re-writes manifest.files so its sha256 covers the shipped ones.
    """
    folder = engine.folder
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
        _add_int8(engine, optimized, int8s, candidates, options, calibration)
    if OPTIMIZED_VARIANT not in candidates:
        optimized.unlink()
    reference_score = reference.score(reference.outputs) if reference.score else None
    shipped = []
    for name, entry in candidates.items():
        entry.gate = _evaluate(engine, name, reference, options, reference_score)
        entry.shipped = entry.gate["passed"]
        if entry.shipped:
            shipped.append(entry.file)
            continue
        (folder / entry.file).unlink()
        manifest.rejected_variants[name] = manifest.variants.pop(name)
    return shipped


def _add_int8(
    engine: Engine,
    optimized: Path,
    names: list[str],
    entries: dict[str, VariantEntry],
    options: ExportOptions,
    calibration: list[Any] | None,
) -> None:
    """Write the int8 graphs from the optimised one: smoothed first when asked, with the nodes
    the search keeps in fp32, or everything int8."""
    folder = engine.folder
    source = optimized
    try:
        smoothed, reference = None, None
        if calibration is not None and options.int8_smooth_alpha > 0:
            source = folder / "model.smoothed.tmp.onnx"  # not shipped: int8's fp32 source
            # The pass that measures the activations gives the fp32 outputs the search needs.
            ranges, outputs, mask = smoothing.activation_ranges(
                engine, optimized, calibration, options.batch_size
            )
            reference = (calibration, outputs, mask)
            smoothed = smoothing.smooth(optimized, source, ranges, options.int8_smooth_alpha)
            log.info("int8: smoothed activations %s", smoothed)
        searches = calibration is not None and options.int8_search_agreement > 0
        if searches and reference is None:
            fp32 = sessions.engine_on(engine, optimized, OPTIMIZED_VARIANT)
            reference = (calibration, *fp32.infer(calibration, options.batch_size))
        shift, guess = None, None
        for name in names:
            entry = entries[name]
            weights = VARIANTS[name].weights
            entry.int8_weights = weights
            # The gate's int8 arithmetic is this CPU's, which the runtime compares with its own;
            # uint8 weights are summed exactly everywhere.
            entry.gated_int8_kernels = int8_kernels() if weights == "int8" else "exact"
            entry.smoothing = smoothed
            if not searches or reference is None:
                graphs.to_int8(source, folder / entry.file, weights=weights)
                continue
            entry.search = int8_search.search_int8(
                engine,
                source,
                reference,
                options.int8_search_agreement,
                options.batch_size,
                name,
                shift,
                options.int8_sensitivity_rows,
                options.seed,
                guess,
            )
            # uint8-weight variants rank their nodes by an int8-weight variant's figures where
            # its sums were exact: the same nodes and activations, only the weights' rounding
            # differs. Where they saturate, those figures measure the saturation: each
            # measures its own. Either way its search starts from how many that one kept.
            if weights == "int8":
                guess = len(entry.search["kept_fp32"]) or None
                if entry.gated_int8_kernels == "exact":
                    shift = entry.search.get("mean_abs_logit_shift")
    finally:
        if source != optimized:
            source.unlink(missing_ok=True)
