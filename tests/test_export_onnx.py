"""Model tests for the export stage: the ONNX contract, parity, and what a failed parity leaves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import synthetic_reviews

from bertrt.contract import INPUT_NAMES, MANIFEST_FILE
from bertrt.predictors import output_names
from pipeline import tasks
from pipeline.export.model_folder import ParityError, build
from pipeline.export.options import ExportOptions

TEXT = tasks.get("text-classification")


def test_graph_declares_the_contract_with_dynamic_axes(onnx_model_dir: Path) -> None:
    graph = onnx.load(str(onnx_model_dir / "model.onnx")).graph
    manifest = json.loads((onnx_model_dir / MANIFEST_FILE).read_text())
    names = [i.name for i in graph.input]
    # The tiny tokenizer yields no token_type_ids (as DistilBERT's): the graph declares a subset.
    assert names == manifest["inputs"] == [n for n in INPUT_NAMES if n in names]
    assert names[:2] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == list(output_names("text-classification"))
    for tensor in graph.input:
        dims = tensor.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"]
    assert manifest["variants"]["fp32"]["gate"]["max_abs_logit_diff"] <= 1e-4
    assert manifest["variants"]["fp32"]["gate"]["label_mismatches"] == 0


def test_failed_parity_ships_nothing_and_keeps_the_previous_folder(
    tmp_path: Path, tiny_model_dir: Path, onnx_model_dir: Path
) -> None:
    out = tmp_path / "onnx"
    texts = [r["text"] for r in synthetic_reviews(16, seed=4)]
    build(tiny_model_dir, out, TEXT, texts, ExportOptions(max_length=64, opset=17))
    before = (out / MANIFEST_FILE).read_bytes()
    with pytest.raises(ParityError, match="ONNX parity failed on 16 texts"):
        # A tolerance no float32 graph meets: the check, not the model, is what fails here.
        build(tiny_model_dir, out, TEXT, texts, ExportOptions(64, parity_atol=1e-30))
    assert (out / MANIFEST_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"], "no temporary folder left behind"


def test_a_flip_between_near_tied_scores_is_not_a_mismatch() -> None:
    from pipeline.export.model_folder import compare

    reference = np.array([[1.0, 1.00005, 0.0], [3.0, 1.0, 0.0]])
    got = np.array([[1.00004, 1.00001, 0.0], [1.0, 3.0, 0.0]])
    assert compare(got, reference, np.ones(2, bool), atol=1e-4)[1:] == (1, 2, 1)
    assert compare(got, reference, np.ones(2, bool), atol=0.0)[1:] == (2, 2, 0)
