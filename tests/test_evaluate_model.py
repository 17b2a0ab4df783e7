"""The evaluate stage: its metrics, calibration and mistake files, and its predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import TASK_DATA, write_params, write_splits

from pipeline.tasks.text_classification import task


def test_metrics_on_a_known_table() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    truth = np.array([0, 1, 1, 1])
    result = task.metrics(probs, truth, ["neg", "pos"], bins=10)
    assert result["overall"]["accuracy"] == pytest.approx(0.75)
    # neg: P=1/2, R=1, F1=2/3; pos: P=1, R=2/3, F1=0.8
    assert result["overall"]["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert result["overall"]["weighted_f1"] == pytest.approx((2 / 3 * 1 + 0.8 * 3) / 4)
    assert result["per_class"]["pos"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )


def test_ece_of_a_calibrated_and_an_overconfident_model() -> None:
    truth = np.array([0] * 8 + [1] * 2)
    calibrated = np.tile([0.8, 0.2], (10, 1))  # 80 % confident, 80 % right
    assert task.expected_calibration_error(calibrated, truth, bins=10) == pytest.approx(0.0)
    overconfident = np.tile([0.99, 0.01], (10, 1))
    assert task.expected_calibration_error(overconfident, truth, bins=10) == pytest.approx(0.19)


def test_softmax_rows_sum_to_one_and_keep_the_order() -> None:
    probs = task.softmax(np.array([[1000.0, 0.0], [0.0, 2.0]]))
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert probs.argmax(axis=1).tolist() == [0, 1]


def test_temperature_scaling_lowers_ece_of_an_overconfident_model() -> None:
    from pipeline.tasks.text_classification import calibration

    rng = np.random.default_rng(0)
    # 70 % right, but logits far apart: about 99 % confident.
    truth = rng.integers(0, 2, 2000)
    predicted = np.where(rng.random(2000) < 0.7, truth, 1 - truth)
    logits = np.zeros((2000, 2))
    logits[np.arange(2000), predicted] = 5.0
    val, test = slice(0, 1000), slice(1000, 2000)
    result = calibration.calibration(logits[val], truth[val], logits[test], truth[test], 15)
    assert result["temperature"] > 1.5  # softened
    assert result["ece_after"] < result["ece_before"] / 5
    assert result["nll_after"] < result["nll_before"]
    # A well-calibrated model keeps a temperature near 1.
    sharp = np.zeros((1000, 2))
    sharp[np.arange(1000), predicted[:1000]] = np.log(0.7 / 0.3)
    assert calibration.fit_temperature(sharp, truth[:1000]) == pytest.approx(1.0, abs=0.15)


def _prepared(root: Path, tiny_model_dir: Path, task: str) -> tuple[Path, Path, Path, Path]:
    """(params, validated, tokenized, model) of a task on tiny data, with batches of 8 rows of
    different lengths; the model is the tiny encoder with a seeded head for the task."""
    import torch
    from transformers import AutoTokenizer

    from pipeline import tasks
    from pipeline.core import params
    from pipeline.stages import tokenize_data, validate

    make_rows, overrides = TASK_DATA[task]
    rows = make_rows(72, 5)
    raw = write_splits(
        root / "raw", {"train": rows[:32], "validation": rows[32:48], "test": rows[48:]}
    )
    params_path = write_params(
        root,
        {
            **overrides,
            "base.model": str(tiny_model_dir),
            "base.max_length": 16,
            "evaluate.batch_size": 8,
            "export.variants": [],
            "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
            "tracking.experiment": task,
        },
    )
    validated, tokenized, model_dir = root / "validated", root / "tokenized", root / "model"
    validate.run(raw, params.load(params_path), validated, root / "v.json", root / "f.json")
    tokenize_data.run(validated, params.load(params_path), tokenized, root / "t.json")
    labels = json.loads((validated / "labels.json").read_text())
    kind = tasks.get(task)
    torch.manual_seed(0)
    model = kind.model_class().from_pretrained(
        tiny_model_dir, **kind.model_kwargs(labels), ignore_mismatched_sizes=True
    )
    with torch.no_grad():  # a head whose labels differ from row to row
        model.classifier.weight.normal_(0, 0.5)
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    return params_path, validated, tokenized, model_dir


def _trainer_predict(task: Any, model_dir: Path, dataset: Any, p: Any) -> np.ndarray:
    """What `Task.predict` returned before it left the Trainer (its code, verbatim)."""
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = task.model_class().from_pretrained(model_dir)
    args = TrainingArguments(
        output_dir=str(Path(model_dir) / ".predict"),
        per_device_eval_batch_size=p.evaluate.batch_size,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        data_collator=task.collator(tokenizer, p),
    )
    return np.asarray(trainer.predict(dataset).predictions, dtype=np.float64)


@pytest.mark.parametrize("name", ["text-classification", "token-classification"])
def test_predict_gives_the_trainers_outputs_in_the_rows_order(
    tmp_path: Path, tiny_model_dir: Path, name: str
) -> None:
    """Length-sorted batches without the Trainer: the same logits row by row (per-token ones
    where the row has tokens, padded with -100 beyond), and so the same test metrics."""
    from datasets import load_from_disk

    from pipeline import tasks
    from pipeline.core import params

    params_path, validated, tokenized, model_dir = _prepared(tmp_path, tiny_model_dir, name)
    task, p = tasks.get(name), params.load(params_path)
    dataset = load_from_disk(str(tokenized))["test"]
    test = pd.read_parquet(validated / "test.parquet")
    lengths = [len(ids) for ids in dataset["input_ids"]]
    assert len(set(lengths)) > 2 and lengths != sorted(lengths)  # sorting changes the batches

    got = task.predict(model_dir, dataset, test, p)
    want = _trainer_predict(task, model_dir, dataset, p)

    assert got.shape == want.shape and got.dtype == np.float64
    if got.ndim == 3:
        valid = np.arange(got.shape[1])[None, :] < np.asarray(lengths)[:, None]
        assert np.allclose(got[valid], want[valid], atol=1e-5, rtol=0)
        longest_batch_pads = got[~valid][:, 0]
        assert (longest_batch_pads == -100).any()
    else:
        assert np.allclose(got, want, atol=1e-5, rtol=0)
    labels = json.loads((validated / "labels.json").read_text())
    ours = task.evaluate(got, dataset, test, labels, p, _folder(tmp_path / "a"))
    theirs = task.evaluate(want, dataset, test, labels, p, _folder(tmp_path / "b"))
    assert ours["overall"] == pytest.approx(theirs["overall"], abs=1e-9)


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


# The evaluate stage's predictions and the export stage's model folder, after importing both
# stage modules; prints whether transformers' Trainer was imported on the way.
STAGES_IMPORT = """
import json, sys
from pathlib import Path
import pandas as pd
from datasets import load_from_disk
from pipeline import tasks
from pipeline.core import params
from pipeline.export import model_folder
from pipeline.export.options import ExportOptions
from pipeline.stages import evaluate_model, export_onnx
root = Path(sys.argv[1])
p, task = params.load(root / "params.yaml"), tasks.get("text-classification")
test = pd.read_parquet(root / "validated" / "test.parquet")
task.predict(root / "model", load_from_disk(str(root / "tokenized"))["test"], test, p)
imported = {"evaluate": "transformers.trainer" in sys.modules}
model_folder.build(root / "model", root / "onnx", task, task.texts(test), ExportOptions(16))
imported["export"] = "transformers.trainer" in sys.modules
print(json.dumps(imported))
"""


@pytest.mark.slow
def test_evaluate_and_export_run_without_importing_the_trainer(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Importing transformers' Trainer costs seconds that only the fine-tune needs."""
    _prepared(tmp_path, tiny_model_dir, "text-classification")
    done = subprocess.run(
        [sys.executable, "-c", STAGES_IMPORT, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "evaluate": False,
        "export": False,
    }
    assert (tmp_path / "onnx" / "manifest.json").is_file()
