"""The ONNX graph rewrites behind the variants: ORT's transformer fusions, fp16, int8."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bertrt.contract import VARIANTS
from pipeline.export import quiet

log = logging.getLogger(__name__)


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


# The operators dynamic quantisation turns into int8 kernels (when they have a weight input).
INT8_OPS = ("MatMul", "Attention", "EmbedLayerNormalization", "Gemm", "Gather")


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
    with quiet.optimizer():
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
        model.save_model_to_file(str(dst))
    missing = [op for op in (CPU_FUSED_CORE if for_cpu else FUSED_CORE) if not counts.get(op)]
    if missing:
        log.warning("optimised graph lacks %s (fused: %s); the gate decides", missing, counts)
    log.info("fused operators (%s graph): %s", "CPU" if for_cpu else "full", counts)
    return counts


def to_fp16(src: Path, dst: Path) -> None:
    """Write an fp16 copy of the optimised graph with fp32 inputs and outputs."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    with quiet.optimizer():
        model.convert_float_to_float16(
            keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32]
        )
        model.save_model_to_file(str(dst))


# Dynamic quantisation first rewrites every Gemm as a MatMul named "<Gemm's name>_MatMul" (and
# an Add): a Gemm kept in fp32 is excluded by that name too, or it is quantised anyway.
GEMM_AS_MATMUL = "_MatMul"


def to_int8(src: Path, dst: Path, keep_fp32: Sequence[str] = (), weights: str = "int8") -> None:
    """Write a dynamically quantised copy of `src` (uint8 activations; `weights` "int8" or
    "uint8"); the nodes named in `keep_fp32` stay in fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    kinds = sorted({v.weights for v in VARIANTS.values() if v.weights})
    if weights not in kinds:
        raise ValueError(f"int8 weights {weights!r}: use one of {kinds}")

    # Without DefaultTensorType, shape inference cannot type tensors next to the fused
    # com.microsoft ops and the quantizer raises "Unable to find data type for weight_name".
    # per_channel: on MiniLM-L6 sentiment it raised label agreement with PyTorch from 95.5 % to
    # 98.9 % (per-tensor scales flatten the few large-magnitude weight rows).
    with quiet.quantizer():
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=True,
            weight_type=QuantType.QUInt8 if weights == "uint8" else QuantType.QInt8,
            nodes_to_exclude=[*keep_fp32, *(f"{name}{GEMM_AS_MATMUL}" for name in keep_fp32)],
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


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
