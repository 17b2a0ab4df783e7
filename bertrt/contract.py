"""The ONNX contract between the export stage and the runtime, declared once.

Task names, variant names, file names, input names and each task's output axes live here; the
pipeline (params, tasks, export) and the runtime import them from this module.
"""

from __future__ import annotations

SCHEMA_VERSION = 2

MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.json"
TOKENIZER_FILE = "tokenizer.json"
MODEL_CARD_FILE = "README.md"

# Inputs in the order the exporter passes them; a graph may declare a subset (DistilBERT and
# RoBERTa-style models have no token_type_ids) and the runtime feeds only what the graph declares.
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
INPUT_AXES: dict[int, str] = {0: "batch", 1: "sequence"}

TEXT_CLASSIFICATION = "text-classification"
TOKEN_CLASSIFICATION = "token-classification"
FILL_MASK = "fill-mask"

# Task -> output name -> its dynamic axes. A per-text output has only a batch axis; a per-token
# output also has the sequence axis, and the runtime reads it only where the attention mask is 1.
OUTPUTS: dict[str, dict[str, dict[int, str]]] = {
    TEXT_CLASSIFICATION: {"logits": {0: "batch"}},
    TOKEN_CLASSIFICATION: {"logits": {0: "batch", 1: "sequence"}},
    # One row of vocabulary scores per token; the runtime reads the rows at mask tokens.
    FILL_MASK: {"logits": {0: "batch", 1: "sequence"}},
}

TASKS: tuple[str, ...] = tuple(OUTPUTS)
# Tasks whose outputs are scores over labels.json (fill-mask scores the tokenizer's vocabulary).
LABELLED_TASKS: tuple[str, ...] = (TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION)

# Variant name -> file name in the model folder. "fp32" is the plain export and always ships.
VARIANT_FILES: dict[str, str] = {
    "fp32": "model.onnx",
    "fp32-optimized": "model.optimized.onnx",
    "fp16": "model.fp16.onnx",
    "int8": "model.int8.onnx",
    "int8-portable": "model.int8-portable.onnx",
}
BASE_VARIANT = "fp32"
VARIANTS: tuple[str, ...] = tuple(VARIANT_FILES)
# The variants export may add on top of the plain graph, each behind its gate.
OPTIONAL_VARIANTS: tuple[str, ...] = tuple(v for v in VARIANTS if v != BASE_VARIANT)
# int8 variant -> the type of its weights. ONNX Runtime's uint8 x int8 kernels are the fast ones
# with VNNI or AMX, but without them (AVX2) they add pairs of products in 16 bits, which can
# saturate; its uint8 x uint8 kernels sum exactly on every x86 CPU, so int8-portable's gate holds
# on any of them.
INT8_WEIGHTS: dict[str, str] = {"int8": "int8", "int8-portable": "uint8"}


def output_names(task: str) -> tuple[str, ...]:
    """The graph's output names for `task`."""
    return tuple(OUTPUTS[task])


def per_token(task: str) -> bool:
    """Whether the task's first output has a sequence axis (one row per token)."""
    return 1 in next(iter(OUTPUTS[task].values()))


def dynamic_axes(input_names: tuple[str, ...], task: str) -> dict[str, dict[int, str]]:
    """Batch and sequence axes on every input; the task's axes on every output."""
    axes: dict[str, dict[int, str]] = {name: dict(INPUT_AXES) for name in input_names}
    axes.update({name: dict(out) for name, out in OUTPUTS[task].items()})
    return axes
