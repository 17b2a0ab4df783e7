"""Model tests for the export stage: the ONNX contract, parity, and what a failed parity leaves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from conftest import synthetic_reviews, write_params

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


# The export stage's command line in a fresh process (logging as `dvc repro` shows it); prints
# whether transformers' Trainer was imported on the way.
EXPORT_STAGE = """
import sys
from pipeline.stages import export_onnx
code = export_onnx.main(sys.argv[1:])
print("trainer imported:", "transformers.trainer" in sys.modules, "exit:", code)
"""


@pytest.mark.slow
def test_the_export_stage_prints_its_own_lines_and_one_gate_table(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Every variant, int8 searched for and smoothed, yet no line per candidate graph and none
    of the libraries' known warnings: the stage's few lines and its one table."""
    for split, seed in (("test", 4), ("validation", 5)):
        rows = synthetic_reviews(32, seed=seed)
        frame = pd.DataFrame({"text": [r["text"] for r in rows]})
        frame["label"] = [r["category"] for r in rows]
        frame.to_parquet(tmp_path / f"{split}.parquet", index=False)
    (tmp_path / "eval.json").write_text(json.dumps({"overall": {"accuracy": 0.5}}))
    params = write_params(
        tmp_path,
        {
            "base.model": str(tiny_model_dir),
            "base.max_length": 64,
            "export.variants": ["fp32-optimized", "fp16", "int8", "int8-portable"],
            "export.min_agreement": 0.5,
            "export.max_metric_drop": 0.5,
            "export.int8_search_agreement": 1.0,
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    )
    argv = ["--model", str(tiny_model_dir), "--test", str(tmp_path / "test.parquet")]
    argv += ["--eval-report", str(tmp_path / "eval.json"), "--params", str(params)]
    argv += ["--out", str(tmp_path / "onnx"), "--report", str(tmp_path / "export.json")]
    argv += ["--calibration", str(tmp_path / "validation.parquet")]
    done = subprocess.run(
        [sys.executable, "-c", EXPORT_STAGE, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PIPELINE_LOG_LEVEL": "INFO"},
    )
    assert done.stdout.strip().endswith("trainer imported: False exit: 0"), done.stderr[-3000:]
    log = done.stderr
    for noise in (
        "Please consider to run pre-processing",
        "TracerWarning",
        "advanced indexing",
        "fusion_base",
        " loaded ",
        "runs on CPUExecutionProvider",
    ):
        assert noise not in log, noise
    assert log.count("int8 search ") == 2  # one line per int8 variant
    assert log.count("graphs gated against PyTorch on 32 test texts") == 1
    table = log[log.index("graphs gated against PyTorch") :].splitlines()[1:7]
    assert re.match(r"  variant +agreement +drop +MB +shipped", table[0])
    assert [line.split()[0] for line in table[1:]] == [
        "fp32",
        "fp32-optimized",
        "fp16",
        "int8",
        "int8-portable",
    ]
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["seconds"] > 0
