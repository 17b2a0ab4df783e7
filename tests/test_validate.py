"""Data tests: what the validate stage accepts and what it refuses, with the message it gives."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import synthetic_reviews, write_params, write_splits

from pipeline.core import params
from pipeline.stages import validate


def good_splits() -> dict[str, list[dict]]:
    rows = synthetic_reviews(60, seed=3)
    return {"train": rows[:40], "validation": rows[40:50], "test": rows[50:]}


@pytest.fixture
def params_path(tmp_path: Path, tiny_model_dir: Path) -> Path:
    return write_params(tmp_path, {"base.model": str(tiny_model_dir)})


def run_validate(tmp_path: Path, params_path: Path, splits: dict) -> tuple[Path, dict]:
    raw = write_splits(tmp_path / "raw", splits)
    out = tmp_path / "validated"
    result = validate.run(
        raw,
        params.load(params_path),
        out,
        tmp_path / "validation.json",
        tmp_path / "failures.json",
    )
    return out, result


def test_good_data_writes_parquet_labels_and_stats(tmp_path: Path, params_path: Path) -> None:
    out, stats = run_validate(tmp_path, params_path, good_splits())
    assert json.loads((out / "labels.json").read_text()) == ["fresh", "rotten"]
    train = pd.read_parquet(out / "train.parquet")
    assert list(train.columns) == ["text", "label"] and len(train) == 40
    assert stats["splits"]["test"]["rows"] == 10
    assert set(stats["splits"]["train"]["class_counts"]) == {"fresh", "rotten"}
    assert stats["splits"]["train"]["tokens"]["p50"] > 2
    assert not (tmp_path / "failures.json").exists()


def test_fixed_label_order_from_params(tmp_path: Path, tiny_model_dir: Path) -> None:
    params_path = write_params(
        tmp_path, {"base.model": str(tiny_model_dir), "validate.labels": ["rotten", "fresh"]}
    )
    out, _ = run_validate(tmp_path, params_path, good_splits())
    assert json.loads((out / "labels.json").read_text()) == ["rotten", "fresh"]


def test_texts_over_max_length_are_a_warning_with_a_count(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params_path = write_params(tmp_path, {"base.model": str(tiny_model_dir), "base.max_length": 8})
    _, stats = run_validate(tmp_path, params_path, good_splits())
    over = stats["splits"]["train"]["over_max_length"]
    assert over > 0
    assert f"train: {over} texts are longer than base.max_length=8" in caplog.text


def _set(split: str, row: int, column: str, value: object):
    def change(splits: dict) -> None:
        splits[split][row][column] = value

    return change


def _drop_column(column: str):
    def change(splits: dict) -> None:
        for rows in splits.values():
            for row in rows:
                row.pop(column)

    return change


def _copy_text(src: tuple[str, int], dst: tuple[str, int], transform=lambda t: t):
    def change(splits: dict) -> None:
        splits[dst[0]][dst[1]]["text"] = transform(splits[src[0]][src[1]]["text"])

    return change


def _only_label(split: str, label: str):
    def change(splits: dict) -> None:
        for row in splits[split]:
            row["category"] = label

    return change


def _all_labels(mapping: dict):
    def change(splits: dict) -> None:
        for rows in splits.values():
            for row in rows:
                row["category"] = mapping[row["category"]]

    return change


def _labels_then(first: object, mapping: dict):
    def change(splits: dict) -> None:
        _all_labels(mapping)(splits)
        splits["train"][2]["category"] = first

    return change


def _numeric_texts(splits: dict) -> None:
    for n, row in enumerate(row for rows in splits.values() for row in rows):
        row["text"] = n


BAD = [
    ("missing text column", _drop_column("text"), None, "required column 'text' is missing"),
    (
        "missing label column",
        _drop_column("category"),
        None,
        "required column 'category' is missing",
    ),
    ("null text", _set("train", 3, "text", None), ("train", 4, "text"), "missing value (null)"),
    (
        "empty text",
        _set("train", 5, "text", ""),
        ("train", 6, "text"),
        "empty or whitespace-only text",
    ),
    (
        "whitespace-only text",
        _set("test", 2, "text", " \t \n"),
        ("test", 3, "text"),
        "empty or whitespace-only text",
    ),
    (
        "null label",
        _set("validation", 1, "category", None),
        ("validation", 2, "category"),
        "missing value (null)",
    ),
    (
        "label outside the set seen in train",
        _set("test", 0, "category", "meh"),
        ("test", 1, "category"),
        "label outside the label set ['fresh', 'rotten']",
    ),
    (
        "integer label among integer labels, one non-integral",
        _labels_then(0.5, {"fresh": 1.0, "rotten": 0.0}),
        ("train", 3, "category"),
        "wrong label type: labels in this data are int",
    ),
    (
        "boolean labels",
        _all_labels({"fresh": True, "rotten": False}),
        None,
        "wrong label type",
    ),
    ("text that is not a string", _numeric_texts, None, "text is not a string"),
    (
        "one class only",
        _all_labels({"fresh": "fresh", "rotten": "fresh"}),
        None,
        "one class only ('fresh'): a classifier needs at least two labels",
    ),
    (
        "exact duplicate within a split",
        _copy_text(("train", 0), ("train", 7)),
        ("train", 8, "text"),
        "duplicate text: the same text appears earlier in this split",
    ),
    (
        "duplicate after normalising case and spaces",
        _copy_text(("train", 1), ("train", 9), lambda t: "  " + t.upper().replace(" ", "   ")),
        ("train", 10, "text"),
        "near-duplicate text",
    ),
    (
        "the same text in train and validation",
        _copy_text(("train", 2), ("validation", 4)),
        ("validation", 5, "text"),
        "leakage: the same text (after normalising) is also in split 'train'",
    ),
    (
        "the same text in validation and test",
        _copy_text(("validation", 3), ("test", 6), str.title),
        ("test", 7, "text"),
        "also in split 'validation'",
    ),
    (
        "a class missing from the test split",
        _only_label("test", "fresh"),
        None,
        "class missing: split 'test' must hold every label",
    ),
    (
        "a class missing from validation",
        _only_label("validation", "rotten"),
        None,
        "class missing: split 'validation' must hold every label",
    ),
]


@pytest.mark.parametrize(("name", "change", "where", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_with_a_clear_message(
    tmp_path: Path, params_path: Path, name: str, change, where, message: str
) -> None:
    splits = copy.deepcopy(good_splits())
    change(splits)
    with pytest.raises(validate.ValidationFailed) as caught:
        run_validate(tmp_path, params_path, splits)
    text = str(caught.value)
    assert message in text
    assert not (tmp_path / "validated").exists(), "no validated output may be left behind"
    report = json.loads((tmp_path / "failures.json").read_text())["failures"]
    matching = [f for f in report if message in f["reason"]]
    assert matching, report
    if where is not None:
        split, row, column = where
        assert any(
            f["file"].endswith(f"{split}.parquet") and f["row"] == row and f["column"] == column
            for f in matching
        ), matching


def test_a_label_outside_the_fixed_label_list_is_refused_in_train(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    params_path = write_params(
        tmp_path, {"base.model": str(tiny_model_dir), "validate.labels": ["fresh", "rotten"]}
    )
    splits = good_splits()
    splits["train"][0]["category"] = "Fresh"
    with pytest.raises(validate.ValidationFailed, match="train.parquet row 1 column category"):
        run_validate(tmp_path, params_path, splits)


def test_every_failure_is_listed_not_just_the_first(tmp_path: Path, params_path: Path) -> None:
    splits = good_splits()
    for row in (0, 5, 9):
        splits["train"][row]["text"] = "   "
    with pytest.raises(validate.ValidationFailed, match="3 validation failure"):
        run_validate(tmp_path, params_path, splits)
    rows = [f["row"] for f in json.loads((tmp_path / "failures.json").read_text())["failures"]]
    assert sorted(rows) == [1, 6, 10]


def test_a_missing_split_file_names_the_stage_to_run(tmp_path: Path, params_path: Path) -> None:
    splits = good_splits()
    del splits["test"]
    with pytest.raises(FileNotFoundError, match=r"test\.parquet: missing; run the ingest stage"):
        run_validate(tmp_path, params_path, splits)


def test_main_exits_non_zero_with_the_report(tmp_path: Path, params_path: Path, capsys) -> None:
    splits = good_splits()
    splits["train"][0]["text"] = ""
    raw = write_splits(tmp_path / "raw", splits)
    code = validate.main(
        [
            "--raw", str(raw), "--params", str(params_path), "--out", str(tmp_path / "v"),
            "--report", str(tmp_path / "r.json"), "--failures", str(tmp_path / "f.json"),
        ]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "train.parquet row 1 column text: empty or whitespace-only text" in err
    assert not (tmp_path / "v").exists() and not (tmp_path / "r.json").exists()


def test_failures_name_the_source_file_and_row_not_the_split_file(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from pipeline.stages import ingest

    source = tmp_path / "given"
    source.mkdir()
    rows = synthetic_reviews(60, seed=3)
    for name, part in (("train", rows[:40]), ("validation", rows[40:50]), ("test", rows[50:])):
        pd.DataFrame(part).to_json(source / f"{name}.jsonl", orient="records", lines=True)
    bad = pd.read_json(source / "test.jsonl", lines=True)
    bad.loc[2, "category"] = "meh"
    bad.to_json(source / "test.jsonl", orient="records", lines=True)
    params_path = write_params(
        tmp_path,
        {
            "base.model": str(tiny_model_dir),
            "ingest.source": str(source),
            "ingest.group_column": "",
        },
    )
    ingest.run(params.load(params_path), tmp_path / "raw", tmp_path / "ingest.json")
    with pytest.raises(validate.ValidationFailed, match="test.jsonl row 3 column category"):
        validate.run(
            tmp_path / "raw",
            params.load(params_path),
            tmp_path / "v",
            tmp_path / "r.json",
            tmp_path / "f.json",
        )
    (failure,) = json.loads((tmp_path / "f.json").read_text())["failures"]
    assert failure["split_file"].endswith("test.parquet") and failure["row"] == 3
