"""The sweep file's checks and the ranking by a validation metric."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core import params
from pipeline.ops import sweep

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_committed_sweep_file_is_valid_and_chooses_by_validation() -> None:
    loaded = sweep.load(REPO / "configs" / "sweeps" / "cls.yaml")
    assert loaded["metric"] == "validation.macro_f1"
    assert loaded["target"] == "evaluate"
    assert len(loaded["experiments"]) >= 8
    # The common values apply to every experiment unless it sets its own.
    epochs = {name: v["finetune.epochs"] for name, v in loaded["experiments"].items()}
    assert epochs["sw2-epochs6-patience2"] == 6 and epochs["sw1-lr5e-5-llrd1.0"] == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("metric: accuracy\nexperiments: {a: {finetune.epochs: 1}}", "must be a validation"),
        ("metric: validation.macro_f1\nexperiments: {}", "at least one"),
        ("metric: validation.macro_f1\nexperiments: {a: {finetune.lr: 1}}", "'finetune.lr'"),
        ("metric: validation.macro_f1\nexperiments: {a: {nosuch.key: 1}}", "'nosuch.key'"),
    ],
)
def test_a_bad_sweep_file_is_refused_with_the_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(params.ParamsError, match=message):
        sweep.load(write(tmp_path, text))


def test_the_ranking_puts_the_best_validation_score_first_and_missing_ones_last() -> None:
    results = {
        "a": {"accuracy": 0.99, "validation": {"macro_f1": 0.80}},
        "b": {"accuracy": 0.50, "validation": {"macro_f1": 0.84}},
        "failed": None,
        "c": {"accuracy": 0.70, "validation": {"macro_f1": 0.82}},
    }
    ranked = sweep.rank(results, "validation.macro_f1")
    assert [name for name, _ in ranked] == ["b", "c", "a", "failed"]
    assert ranked[-1][1] is None
    lower = sweep.rank(results, "validation.macro_f1", greater_is_better=False)
    assert [name for name, _ in lower][:3] == ["a", "c", "b"]
