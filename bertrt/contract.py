"""The ONNX contract between the export stage and the runtime, declared once."""

from __future__ import annotations

SCHEMA_VERSION = 1

MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.json"
TOKENIZER_FILE = "tokenizer.json"
MODEL_CARD_FILE = "README.md"

# Inputs in the order the exporter passes them; a graph may declare a subset (DistilBERT and
# RoBERTa-style models have no token_type_ids) and the runtime feeds only what the graph declares.
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")

OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "text-classification": ("logits",),
}

TASKS: tuple[str, ...] = tuple(OUTPUT_NAMES)

# Variant name -> file name in the model folder. "fp32" is the plain export and always ships.
VARIANT_FILES: dict[str, str] = {
    "fp32": "model.onnx",
    "fp32-optimized": "model.optimized.onnx",
    "fp16": "model.fp16.onnx",
    "int8": "model.int8.onnx",
}


def dynamic_axes(input_names: tuple[str, ...], output_names: tuple[str, ...]) -> dict:
    """Batch and sequence axes are dynamic on every input; batch on every output."""
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in input_names}
    axes.update({name: {0: "batch"} for name in output_names})
    return axes
