"""Every registered task through every stage on tiny data: validate, tokenize, a few training
steps, evaluate, export with parity, and the runtime's prediction. A new task gets it for free."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TASK_DATA, write_params, write_splits

import bertrt
from bertrt.predictors import REGISTRY, TASKS
from pipeline import tasks
from pipeline.core import params
from pipeline.stages import evaluate_model, export_onnx, finetune, tokenize_data, validate


def test_every_contract_task_has_an_implementation_data_and_a_predictor() -> None:
    assert set(tasks.REGISTRY) == set(TASKS) == set(REGISTRY) == set(TASK_DATA)
    for name in TASKS:
        assert tasks.get(name).name == name
    with pytest.raises(ValueError, match="base.task: 'summarization' has no implementation"):
        tasks.get("summarization")


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_through_every_stage(tmp_path: Path, tiny_model_dir: Path, task: str) -> None:
    make_rows, overrides = TASK_DATA[task]
    rows = make_rows(96, 21)
    raw = write_splits(
        tmp_path / "raw", {"train": rows[:64], "validation": rows[64:80], "test": rows[80:]}
    )
    params_path = write_params(
        tmp_path,
        {
            **overrides,
            "base.model": str(tiny_model_dir),
            "base.max_length": 16,
            "finetune.epochs": 1,
            "finetune.batch_size": 16,
            "finetune.learning_rate": 1e-3,
            "finetune.warmup_steps": 0,
            "finetune.logging_steps": 1,
            "export.variants": ["fp32-optimized"],
            "export.min_agreement": 0.9,
            "export.max_metric_drop": 0.2,
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment": task,
        },
    )
    validated, tokenized, model = tmp_path / "validated", tmp_path / "tokenized", tmp_path / "ft"
    validate.run(
        raw, params.load(params_path), validated, tmp_path / "v.json", tmp_path / "failures.json"
    )
    stats = tokenize_data.run(validated, params.load(params_path), tokenized, tmp_path / "t.json")
    assert stats["splits"]["train"]["rows"] == 64
    summary = finetune.run(
        tokenized,
        validated,
        params.load(params_path),
        model,
        tmp_path / "ckpt",
        tmp_path / "train.json",
        tmp_path / "curves",
    )
    assert summary["selection_metric"] == tasks.get(task).selection_metric
    metrics = evaluate_model.run(
        model,
        tokenized,
        validated / "test.parquet",
        params.load(params_path),
        tmp_path / "eval.json",
        tmp_path / "plots",
        tmp_path / "metrics.json",
    )
    assert metrics["overall"]["rows"] in (16, stats["splits"]["test"].get("blocks"))
    headline = json.loads((tmp_path / "metrics.json").read_text())
    flat = {k for k, v in headline.items() if not isinstance(v, dict)}
    flat |= {f"{k}.{x}" for k, v in headline.items() if isinstance(v, dict) for x in v}
    assert flat == set(tasks.get(task).headline)  # every headline key is measured
    assert any((tmp_path / "plots").iterdir())
    result = export_onnx.run(
        model,
        validated / "test.parquet",
        tmp_path / "eval.json",
        params.load(params_path),
        tmp_path / "onnx",
        tmp_path / "export.json",
    )
    assert result["parity"]["passed"] and result["parity"]["max_abs_logit_diff"] <= 1e-4
    assert result["parity"]["positions"] >= 16
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["task"] == task and manifest["metrics"] == metrics["overall"]
    predictor = bertrt.load(tmp_path / "onnx", device="cpu")
    assert predictor.task == task
    test = __import__("pandas").read_parquet(validated / "test.parquet")
    text = tasks.get(task).export_texts(test)[0]
    (prediction,) = predictor.predict([text])
    assert isinstance(prediction.as_dict(), dict) and prediction.as_dict()
