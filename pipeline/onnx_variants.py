"""Optimised fp32, fp16 and int8 variants of the exported graph, each gated against PyTorch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertrt import manifest as manifest_io
from bertrt.contract import VARIANT_FILES
from bertrt.predictor import TextClassifier
from bertrt.predictor import load as load_runtime
from bertrt.session import CPU, CUDA, DeviceError

log = logging.getLogger(__name__)

VARIANTS = ("fp32-optimized", "fp16", "int8")
PRECISIONS = {"fp32-optimized": "fp32", "fp16": "fp16", "int8": "int8"}
# The providers each variant is built for; the runtime picks fp16 on CUDA, fp32-optimized on CPU.
PROVIDERS = {"fp32-optimized": [CUDA, CPU], "fp16": [CUDA], "int8": [CPU]}
# Level 1 (ORT's basic, provider-neutral rewrites) before the Python fusions: levels 2 and 99
# bake CPU-only layouts (NchwcTransformer) into the file, and the session applies those at load.
OPT_LEVEL = 1
# Unfused Softmax and LayerNormalization nodes (a model whose fusion was partial) overflow or lose
# precision in fp16; the fused Attention and SkipLayerNormalization kernels accumulate in fp32.
FP16_KEEP_FP32 = ("Softmax", "LayerNormalization", "SimplifiedLayerNormalization")
FUSED_CORE = ("EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu")
# Accuracy drop is compared as a fraction; this absorbs float noise in 1/n steps.
EPS = 1e-9


def optimize(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Write the fused fp32 graph of `src` to `dst`; return the non-zero fused-operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    # num_heads and hidden_size come from the HF config: on this exporter's graphs the optimizer
    # fails to detect them ("Failed to detect num_heads") and leaves Attention unfused.
    model = optimize_model(
        str(src),
        model_type="bert",
        num_heads=num_heads,
        hidden_size=hidden_size,
        opt_level=OPT_LEVEL,
        use_gpu=False,
    )
    counts = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    missing = [op for op in FUSED_CORE if not counts.get(op)]
    if missing:
        log.warning("optimised graph lacks %s (fused: %s); the gate decides", missing, counts)
    log.info("fused operators: %s", counts)
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


def to_int8(src: Path, dst: Path) -> None:
    """Write a dynamically quantised (int8 weights, uint8 activations) copy of `src`."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

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
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)


def gate(
    logits: np.ndarray,
    reference: np.ndarray,
    labels: Sequence[int] | None,
    min_agreement: float,
    max_accuracy_drop: float,
) -> dict[str, Any]:
    """Label agreement, accuracy drop and max |dlogit| of `logits` against the PyTorch ones."""
    if logits.shape != reference.shape:
        raise ValueError(f"logits {logits.shape} and reference {reference.shape} differ in shape")
    n = len(reference)
    if n == 0:
        return {"texts": 0, "passed": False, "reason": "not evaluated: no texts to gate on"}
    got, want = logits.argmax(-1), reference.argmax(-1)
    result: dict[str, Any] = {
        "texts": n,
        "agreement": float((got == want).mean()),
        "label_disagreements": int((got != want).sum()),
        "max_abs_logit_diff": float(np.abs(logits - reference).max()),
        "min_agreement": min_agreement,
        "max_accuracy_drop": max_accuracy_drop,
        "accuracy": None,
        "reference_accuracy": None,
        "accuracy_drop": None,
    }
    reasons = []
    if result["agreement"] < min_agreement:
        reasons.append(f"agreement {result['agreement']:.4f} < {min_agreement}")
    if labels is not None:
        truth = _label_ids(labels, n, reference.shape[1])
        result["accuracy"] = float((got == truth).mean())
        result["reference_accuracy"] = float((want == truth).mean())
        result["accuracy_drop"] = result["reference_accuracy"] - result["accuracy"]
        if result["accuracy_drop"] > max_accuracy_drop + EPS:
            reasons.append(f"accuracy drop {result['accuracy_drop']:.4f} > {max_accuracy_drop}")
    result["passed"] = not reasons
    if reasons:
        result["reason"] = "; ".join(reasons)
    return result


def _label_ids(labels: Sequence[int], texts: int, classes: int) -> np.ndarray:
    """Check that `labels` are one class id per text, each below the number of classes."""
    truth = np.asarray(labels)
    if truth.shape != (texts,):
        raise ValueError(f"{len(truth)} labels for {texts} texts; give one label per text")
    if texts and not np.issubdtype(truth.dtype, np.integer):
        raise ValueError(
            f"labels must be class ids in the manifest's label order, got {truth.tolist()[0]!r}; "
            "map names to ids first (label_names.index(name))"
        )
    if texts and not (truth.min() >= 0 and truth.max() < classes):
        raise ValueError(f"label ids must be in [0, {classes}), got {truth.min()}..{truth.max()}")
    return truth


def _open(folder: Path, name: str) -> tuple[TextClassifier | None, str]:
    """A runtime on the variant's own device; fp16 tries CUDA first, then the CPU."""
    if name != "fp16":
        return load_runtime(folder, device="cpu", variant=name, verify=False), ""
    try:
        return load_runtime(folder, device="cuda", variant=name, verify=False), ""
    except DeviceError:
        log.info("fp16: no CUDA session starts here; gating it on the CPU instead")
    try:
        return load_runtime(folder, device="cpu", variant=name, verify=False), ""
    except Exception as exc:  # any failure to start is the recorded reason it is not shipped
        return None, f"not evaluated: no CUDA, and the CPU cannot run it ({exc})"


def _evaluate(
    folder: Path,
    name: str,
    texts: list[str],
    reference: np.ndarray,
    labels: Sequence[int] | None,
    min_agreement: float,
    max_accuracy_drop: float,
    batch_size: int,
) -> dict[str, Any]:
    runtime, reason = _open(folder, name)
    size = (folder / VARIANT_FILES[name]).stat().st_size
    if runtime is None:
        return {"texts": 0, "bytes": size, "provider": None, "passed": False, "reason": reason}
    result = gate(
        runtime.logits(texts, batch_size), reference, labels, min_agreement, max_accuracy_drop
    )
    result.update(bytes=size, provider=runtime.provider)
    if name == "fp16" and runtime.provider == CPU:
        # ORT's CPU provider wraps most fp16 nodes in Casts to fp32: this checks the fp16 weights
        # and the tensors between nodes, not the CUDA kernels' fp16 arithmetic.
        result["note"] = "gated on CPU (no CUDA here); CUDA fp16 kernels not exercised"
    return result


def add_variants(
    folder: Path,
    manifest: dict[str, Any],
    names: Sequence[str],
    texts: list[str],
    reference: np.ndarray,
    labels: Sequence[int] | None,
    num_heads: int,
    hidden_size: int,
    min_agreement: float,
    max_accuracy_drop: float,
    batch_size: int = 32,
) -> list[str]:
    """Build, gate and keep or delete each named variant in `folder`; return the shipped files.

    Shipped variants join manifest["variants"], rejected ones go to manifest["rejected_variants"]
    with their gate; the caller re-writes manifest["files"] so its sha256 covers the shipped ones.
    """
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    optimized = folder / VARIANT_FILES["fp32-optimized"]
    fused = optimize(folder / VARIANT_FILES["fp32"], optimized, num_heads, hidden_size)
    builders = {"fp16": to_fp16, "int8": to_int8}
    candidates: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(names):
        if name in builders:
            builders[name](optimized, folder / VARIANT_FILES[name])
        candidates[name] = {
            "file": VARIANT_FILES[name],
            "precision": PRECISIONS[name],
            "providers": PROVIDERS[name],
            "fused_operators": fused,
        }
    if "fp32-optimized" not in candidates:
        optimized.unlink()
    # The runtime reads the manifest, so the candidates are listed before they are gated.
    manifest["variants"].update(candidates)
    manifest_io.write(folder, manifest)
    rejected = manifest.setdefault("rejected_variants", {})
    shipped = []
    for name, entry in candidates.items():
        entry["gate"] = _evaluate(
            folder, name, texts, reference, labels, min_agreement, max_accuracy_drop, batch_size
        )
        entry["shipped"] = entry["gate"]["passed"]
        if entry["shipped"]:
            shipped.append(entry["file"])
            log.info("variant %s shipped: %s", name, _summary(entry["gate"]))
            continue
        (folder / entry["file"]).unlink()
        rejected[name] = manifest["variants"].pop(name)
        log.warning("variant %s NOT shipped: %s", name, entry["gate"]["reason"])
    return shipped


def _summary(result: dict[str, Any]) -> str:
    drop = result["accuracy_drop"]
    return (
        f"agreement {result['agreement']:.4f} on {result['texts']} texts, accuracy drop "
        f"{'n/a (no labels)' if drop is None else f'{drop:.4f}'}, max |dlogit| "
        f"{result['max_abs_logit_diff']:.2e}, {result['bytes']} bytes, on {result['provider']}"
    )
