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

log = logging.getLogger(__name__)

PRECISIONS = {"fp32-optimized": "fp32", "fp16": "fp16", "int8": "int8", "int8-portable": "int8"}
# The providers each variant is built for; the runtime picks fp16 on CUDA, fp32-optimized on CPU.
PROVIDERS = {"fp32-optimized": [CUDA, CPU], "fp16": [CUDA], "int8": [CPU], "int8-portable": [CPU]}
# Level 1 (ORT's basic, provider-neutral rewrites) before the Python fusions: levels 2 and 99
# bake CPU-only layouts (NchwcTransformer) into the file, and the session applies those at load.
OPT_LEVEL = 1
# Unfused Softmax and LayerNormalization nodes (a model whose fusion was partial) overflow or lose
# precision in fp16; the fused Attention and SkipLayerNormalization kernels accumulate in fp32.
FP16_KEEP_FP32 = ("Softmax", "LayerNormalization", "SimplifiedLayerNormalization")
# The fusions the fp16 (CUDA) graph gets: all of them.
FUSED_CORE = ("EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu")
# The CPU graphs (fp32-optimized, int8) leave attention and the residual adds unfused: ORT's CPU
# kernels for the fused Attention and SkipLayerNormalization are slower than the ops they
# replace. Profiled on the default model (2 cores, AVX-512), the fully fused graph spent 1.40 s in
# Attention and 0.59 s in SkipLayerNormalization where the unfused one spent about 0.34 s in Add
# plus LayerNormalization, and ran 360 texts/s against 418 without these two fusions (the plain
# graph: 400). The fully fused graph was also slower than the plain one on an AVX2 machine.
# Unfused, int8 quantises Q, K and V separately, so the int8 search can keep fewer in fp32.
CPU_UNFUSED = ("enable_attention", "enable_skip_layer_norm", "enable_bias_skip_layer_norm")
CPU_FUSED_CORE = ("LayerNormalization", "BiasGelu")
# Accuracy drop is compared as a fraction; this absorbs float noise in 1/n steps.
EPS = 1e-9
# The operators dynamic quantisation turns into int8 kernels (when they have a weight input).
INT8_OPS = ("MatMul", "Attention", "EmbedLayerNormalization", "Gemm", "Gather")
# Texts (their windows), fp32 outputs and valid positions the int8 search measures against.
Calibration = tuple[list[Any], np.ndarray, np.ndarray]
# Bounds on a smoothing factor, so that a dead channel (max 0) or a tiny weight row cannot push
# an activation or a weight out of fp32's comfortable range.
SMOOTH_BOUNDS = (1e-2, 1e2)


def optimize(
    src: Path, dst: Path, num_heads: int, hidden_size: int, for_cpu: bool = False
) -> dict[str, int]:
    """Write the fused fp32 graph of `src` to `dst` (with the CPU's fusions only when `for_cpu`);
    return the non-zero fused-operator counts."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    for name in CPU_UNFUSED if for_cpu else ():
        setattr(options, name, False)
    # num_heads and hidden_size come from the HF config: on this exporter's graphs the optimizer
    # fails to detect them ("Failed to detect num_heads") and leaves Attention unfused.
    model = optimize_model(
        str(src),
        model_type="bert",
        num_heads=num_heads,
        hidden_size=hidden_size,
        optimization_options=options,
        opt_level=OPT_LEVEL,
        use_gpu=False,
    )
    counts = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    missing = [op for op in (CPU_FUSED_CORE if for_cpu else FUSED_CORE) if not counts.get(op)]
    if missing:
        log.warning("optimised graph lacks %s (fused: %s); the gate decides", missing, counts)
    log.info("fused operators (%s graph): %s", "CPU" if for_cpu else "full", counts)
    model.save_model_to_file(str(dst))
    return counts


def to_fp16(src: Path, dst: Path) -> None:
    """Write an fp16 copy of the optimised graph with fp32 inputs and outputs."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(
        keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32]
    )
    model.save_model_to_file(str(dst))


def to_int8(src: Path, dst: Path, keep_fp32: Sequence[str] = (), weights: str = "int8") -> None:
    """Write a dynamically quantised copy of `src` (uint8 activations; `weights` "int8" or
    "uint8"); the nodes named in `keep_fp32` stay in fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weights not in INT8_WEIGHTS.values():
        raise ValueError(f"int8 weights {weights!r}: use one of {sorted(INT8_WEIGHTS.values())}")

    # Its "consider pre-processing" warning can be ignored: `src` is already ORT-optimised.
    # Without DefaultTensorType, shape inference cannot type tensors next to the fused
    # com.microsoft ops and the quantizer raises "Unable to find data type for weight_name".
    # per_channel: on MiniLM-L6 sentiment it raised label agreement with PyTorch from 95.5 % to
    # 98.9 % (per-tensor scales flatten the few large-magnitude weight rows).
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs every tensor at INFO on root
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=True,
            weight_type=QuantType.QUInt8 if weights == "uint8" else QuantType.QInt8,
            nodes_to_exclude=list(keep_fp32),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)


def _smoothable(graph: Any) -> dict[str, list[Any]]:
    """Activation tensor -> the MatMuls that multiply it by a weight no other node reads."""
    from collections import Counter, defaultdict

    weights = {i.name for i in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    groups: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        # A weight shared with another node (a tied embedding table) cannot be rescaled.
        if node.op_type == "MatMul" and node.input[1] in weights and uses[node.input[1]] == 1:
            groups[node.input[0]].append(node)
    return dict(groups)


def activation_ranges(
    folder: Path, src: Path, encodings: list[Any], batch_size: int
) -> dict[str, np.ndarray]:
    """Per input channel, the largest |value| of each smoothable activation of `src` over
    `encodings` (every position of each padded batch: the quantiser sees those too)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(src))
    names = list(_smoothable(model.graph))
    for name in names:
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    # An engine over the folder's base graph only for its feeds and length-sorted batching.
    engine = open_engine(folder, device="cpu", variant=BASE_VARIANT, verify=False)
    first = engine.output_name
    ranges: dict[str, np.ndarray] = {}

    def forward(feeds: dict[str, np.ndarray]) -> np.ndarray:
        outputs = session.run([first, *names], feeds)
        for name, value in zip(names, outputs[1:], strict=True):
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(0)
            ranges[name] = np.maximum(ranges[name], peak) if name in ranges else peak
        return outputs[0]

    engine.collect(encodings, batch_size, forward)
    return ranges


def _spread(peaks: np.ndarray) -> float:
    """How far the largest channel stands out: max over median."""
    return float(peaks.max()) / max(float(np.median(peaks)), 1e-8)


def smooth(src: Path, dst: Path, ranges: dict[str, np.ndarray], alpha: float) -> dict[str, Any]:
    """Write `src` with activation outliers moved into the weights (SmoothQuant, Xiao et al.
    2023): each smoothable activation X is divided per channel by s = max|X|^alpha /
    max|W|^(1-alpha) (a Mul node before its MatMuls) and each of their weights W is multiplied
    by s along its input rows, so X @ W is unchanged in exact arithmetic while X's channels,
    which dynamic int8 quantises with one scale per tensor, become even. Returns a summary."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    groups = _smoothable(graph)
    muls: dict[str, Any] = {}
    spread_before, spread_after = [], []
    for act, nodes in groups.items():
        peak = ranges.get(act)
        if peak is None:
            continue
        weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in nodes]
        row_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        scale = np.clip(
            np.maximum(peak, 1e-8) ** alpha / np.maximum(row_peak, 1e-8) ** (1 - alpha),
            *SMOOTH_BOUNDS,
        ).astype(np.float32)
        for node, weight in zip(nodes, weights, strict=True):
            scaled = (weight * scale[:, None]).astype(np.float32)
            initializers[node.input[1]].CopyFrom(numpy_helper.from_array(scaled, node.input[1]))
        inverse = f"{act}/smooth_inverse"
        graph.initializer.append(numpy_helper.from_array(1 / scale, inverse))
        out = f"{act}/smoothed"
        muls[act] = onnx.helper.make_node("Mul", [act, inverse], [out], name=f"{act}/SmoothMul")
        for node in nodes:
            node.input[0] = out
        spread_before.append(_spread(peak))
        spread_after.append(_spread(peak / scale))
    # Each Mul goes right after the node that makes its input (graph inputs: at the front).
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(m for act, m in muls.items() if not any(act in n.output for n in nodes))
    for node in nodes:
        graph.node.append(node)
        graph.node.extend(muls[o] for o in node.output if o in muls)
    onnx.save(model, str(dst))
    return {
        "alpha": alpha,
        "activations": len(muls),
        "max_over_median_before": round(float(np.median(spread_before)), 3) if muls else None,
        "max_over_median_after": round(float(np.median(spread_after)), 3) if muls else None,
    }


def quantizable(src: Path) -> list[str]:
    """Names of the nodes dynamic quantisation turns into int8: those with a weight matrix."""
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}

    def weighted(node: Any) -> bool:
        if node.op_type == "Gather":  # an embedding table, not a shape lookup
            return node.input[0] in weights
        if node.op_type in ("MatMul", "Gemm"):
            return len(node.input) > 1 and node.input[1] in weights
        return any(name in weights for name in node.input)

    return [node.name for node in graph.node if node.op_type in INT8_OPS and weighted(node)]


def search_int8(
    folder: Path,
    optimized: Path,
    calibration: Calibration,
    target: float,
    batch_size: int,
    variant: str = "int8",
    shift: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Quantise everything into `variant`'s file; while label agreement with fp32 on the
    calibration texts is below `target`, keep in fp32 the node whose int8 alone moves the outputs
    most (each node measured on its own, unless `shift` gives those figures from another int8
    variant's search), up to half of them. Returns what was measured, for the manifest."""
    dst = folder / VARIANT_FILES[variant]
    weights = INT8_WEIGHTS[variant]
    encodings, reference, mask = calibration

    nodes = quantizable(optimized)

    def measure(keep: Sequence[str] = (), only: str | None = None) -> tuple[float, float]:
        to_int8(optimized, dst, [n for n in nodes if n != only] if only else keep, weights)
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
        result["shift_measured_on"] = "int8"
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
    to_int8(optimized, dst, keep, weights)
    return result


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
    result = gate(outputs, reference, mask, min_agreement, max_metric_drop, score)
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
    calibration: Calibration | None = None,
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
    fused = {"cpu": optimize(base, optimized, num_heads, hidden_size, for_cpu=True)}
    names = list(dict.fromkeys(names))
    if "fp16" in names:
        full = folder / "model.fused.tmp.onnx"  # not shipped: the fp16 graph's fp32 source
        try:
            fused["fp16"] = optimize(base, full, num_heads, hidden_size)
            to_fp16(full, folder / VARIANT_FILES["fp16"])
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
            smoothing = None
            if calibration is not None and int8_smooth_alpha > 0:
                source = folder / "model.smoothed.tmp.onnx"  # not shipped: int8's fp32 source
                ranges = activation_ranges(folder, optimized, calibration[0], batch_size)
                smoothing = smooth(optimized, source, ranges, int8_smooth_alpha)
                log.info("int8: smoothed activations %s", smoothing)
            shift = None
            for name in int8s:
                entry = candidates[name]
                entry["int8_weights"] = INT8_WEIGHTS[name]
                # The gate's int8 arithmetic is this CPU's, which the runtime compares with its
                # own; uint8 weights are summed exactly everywhere.
                entry["gated_int8_kernels"] = int8_kernels() if name == "int8" else "exact"
                if smoothing is not None:
                    entry["smoothing"] = smoothing
                if calibration is not None and int8_search_agreement > 0:
                    entry["search"] = search_int8(
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
                    to_int8(source, folder / VARIANT_FILES[name], weights=INT8_WEIGHTS[name])
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
