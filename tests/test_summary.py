"""The closing summary of `make run`: calibrated and uncalibrated ECE named, the gated graphs,
the stages' times, and the graph the runtime picks on this machine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.ops import summary

EVAL = {
    "overall": {"accuracy": 0.8, "ece": 0.14, "macro_f1": 0.79, "rows": 100},
    "calibration": {"ece_before": 0.14, "ece_after": 0.03, "temperature": 2.5},
    "seconds": 61.4,
}
TRAIN = {"train_runtime_s": 1435.1, "mlflow_run_id": "abc", "tracking_uri": "sqlite:///m.db"}
EXPORT = {
    "parity": {"max_abs_logit_diff": 1e-5},
    "variants": {
        "fp32": {"passed": True},
        "int8": {"agreement": 0.997, "metric_drop": 0.002, "bytes": 2**20, "passed": True},
    },
    "rejected_variants": {
        "fp16": {"agreement": 0.5, "metric_drop": 0.3, "passed": False, "reason": "agreement 0.5"}
    },
    "seconds": 9.6,
}


def test_the_summary_names_both_eces_the_gates_and_the_graph_picked_here(
    tmp_path: Path, onnx_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    (tmp_path / "export.json").write_text(json.dumps(EXPORT))
    (tmp_path / "train.json").write_text(json.dumps(TRAIN))
    assert summary.main(["--reports", str(tmp_path), "--model", str(onnx_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy 0.8000, macro_f1 0.7900 on 100 rows" in out
    assert "0.1400 uncalibrated, 0.0300 with the shipped temperature 2.500" in out
    assert re.search(r"int8 +0.9970 +0.0020 +1.0 +yes", out), out
    assert "no: agreement 0.5" in out
    times = "stage times: finetune (training loop) 23 min 55 s, evaluate 1 min 01 s, export 10 s"
    assert times in out
    picked = next(line for line in out.splitlines() if "the runtime picks here" in line)
    assert "CPUExecutionProvider" in picked


def test_the_fine_tunes_whole_stage_time_leads_when_its_report_has_one() -> None:
    reports = {"train": {**TRAIN, "seconds": 1500.4}, "eval": EVAL, "export": EXPORT}
    line = summary.stage_times(reports)
    assert line == (
        "  stage times: finetune 25 min 00 s (training loop 23 min 55 s), evaluate 1 min 01 s, "
        "export 10 s"
    )
