"""SmoothQuant before int8: outlier activation channels divided down, their weight rows
multiplied up, measured on calibration texts; the fp32 function is unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bertrt.engine import Engine

# Bounds on a smoothing factor, so that a dead channel (max 0) or a tiny weight row cannot push
# an activation or a weight out of fp32's comfortable range.
SMOOTH_BOUNDS = (1e-2, 1e2)


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
    engine: Engine, src: Path, encodings: list[Any], batch_size: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per input channel, the largest |value| of each smoothable activation of `src` over
    `encodings` (every position of each padded batch: the quantiser sees those too), with
    `src`'s outputs and their mask as `engine.infer` gives them (the same pass).

    `engine` is open on the folder `src` belongs to, for its feeds and length-sorted batches."""
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
    first = engine.output_name
    ranges: dict[str, np.ndarray] = {}

    def forward(feeds: dict[str, np.ndarray]) -> np.ndarray:
        outputs = session.run([first, *names], feeds)
        for name, value in zip(names, outputs[1:], strict=True):
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(0)
            ranges[name] = np.maximum(ranges[name], peak) if name in ranges else peak
        return outputs[0]

    outputs, mask = engine.collect(encodings, batch_size, forward)
    return ranges, outputs, mask


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
