"""The ONNX contract between the export stage and the runtime, declared once.

The variants (file, precision, providers, preference), file names, provider names and the input
names and axes live here; the pipeline (params, tasks, export) and the runtime import them from
this module. What differs by task (its name, its outputs) each predictor declares
(bertrt.predictors).
"""

from __future__ import annotations

from dataclasses import dataclass

# 3: every manifest key present, variant entries typed (bertrt.manifest.VariantEntry).
# 4: decoding (argmax, or Viterbi under IOB2, with a CRF's transitions file for "crf").
SCHEMA_VERSION = 4

MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.json"
TOKENIZER_FILE = "tokenizer.json"
MODEL_CARD_FILE = "README.md"
# A CRF head's transition scores (bertrt.decoding.Transitions), for decoding "crf".
TRANSITIONS_FILE = "transitions.json"

# Inputs in the order the exporter passes them; a graph may declare a subset (DistilBERT and
# RoBERTa-style models have no token_type_ids) and the runtime feeds only what the graph declares.
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
INPUT_AXES: dict[int, str] = {0: "batch", 1: "sequence"}

# ONNX Runtime's names for the places a graph runs.
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


@dataclass(frozen=True)
class Variant:
    """One graph the export may ship, and what the runtime needs to know to choose it.

    Args:
        providers: where it is built to run; the runtime times only these on a provider.
        weights: an int8 graph's weight type. ONNX Runtime's uint8 x int8 kernels are the fast
            ones with VNNI or AMX, but without them (AVX2) they add pairs of products in 16 bits,
            which can saturate; its uint8 x uint8 kernels sum exactly on every x86 CPU, so
            int8-portable's gate holds on any of them. None for float graphs.
        preference: the order in which the runtime starts on a provider's variants before it
            times them (lower first); None: never started on unless pinned or timed faster.
    """

    name: str
    file: str
    precision: str
    providers: tuple[str, ...]
    weights: str | None = None
    preference: int | None = None


BASE_VARIANT = "fp32"
OPTIMIZED_VARIANT = "fp32-optimized"
FP16_VARIANT = "fp16"
# The int8 graph whose gate ran on this CPU's int8 kernels (see Variant.weights).
INT8_VARIANT = "int8"

# Every variant, declared once. "fp32" is the plain export and always ships. TensorRT parses
# standard ONNX only: the fused graphs hold ONNX Runtime's own operators (Attention,
# SkipLayerNormalization), so it gets the plain graph and makes it fp16 itself.
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(BASE_VARIANT, "model.onnx", "fp32", (CUDA, CPU, TENSORRT)),
        Variant(OPTIMIZED_VARIANT, "model.optimized.onnx", "fp32", (CUDA, CPU), preference=1),
        Variant(FP16_VARIANT, "model.fp16.onnx", "fp16", (CUDA,), preference=0),
        Variant(INT8_VARIANT, "model.int8.onnx", "int8", (CPU,), weights="int8"),
        Variant("int8-portable", "model.int8-portable.onnx", "int8", (CPU,), weights="uint8"),
    )
}
# The variants export may add on top of the plain graph, each behind its gate.
OPTIONAL_VARIANTS: tuple[str, ...] = tuple(v for v in VARIANTS if v != BASE_VARIANT)
INT8_VARIANTS: tuple[str, ...] = tuple(n for n, v in VARIANTS.items() if v.weights)


def preferred(provider: str) -> list[str]:
    """The variants the runtime starts on for `provider`, best first (then the plain graph)."""
    ranked = [v for v in VARIANTS.values() if provider in v.providers and v.preference is not None]
    return [v.name for v in sorted(ranked, key=lambda v: v.preference)]
