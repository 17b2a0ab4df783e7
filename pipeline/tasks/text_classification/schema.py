"""The pandera schema of a labeled text split, and its failures as rows a person can fix."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from pipeline.core.tables import TableError, text_key

SOURCE_ROW = "source_row"  # the data row (from 1) of the source file a row was read from
SHOWN_ROWS = 5


def _kind(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        return "string"
    if isinstance(value, (bool, np.bool_)):
        return "boolean"
    if isinstance(value, numbers.Number):
        return "number"
    return type(value).__name__


def _rows(mask: pd.Series) -> str:
    rows = [str(i + 1) for i in np.flatnonzero(mask.to_numpy())]
    more = f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else ""
    return ", ".join(rows[:SHOWN_ROWS]) + more


def refuse_mixed(path: Path, df: pd.DataFrame, text: str, label: str) -> pd.DataFrame:
    """The table, numbered by source row, once its text column holds only strings and its
    label column one kind of value (a 1 beside a "1" would be a class of its own)."""
    texts = df[text].map(_kind)
    odd = texts.notna() & (texts != "string")
    if odd.any():
        raise TableError(
            f"{path}: column {text!r} holds non-text values ({sorted(set(texts[odd]))}) in "
            f"data rows {_rows(odd)}; every text must be a string: quote it in the file"
        )
    kinds = df[label].map(_kind)
    found = kinds.dropna().value_counts()
    if len(found) > 1:
        where = "; ".join(f"{kind}s in data rows {_rows(kinds == kind)}" for kind in found.index)
        raise TableError(
            f"{path}: column {label!r} mixes kinds of label ({where}); write every label the "
            'same way, all strings ("1", "pos") or all numbers, then re-run'
        )
    return df.assign(**{SOURCE_ROW: np.arange(1, len(df) + 1)})


def at_source(failures: list[dict[str, Any]], df: pd.DataFrame) -> list[dict[str, Any]]:
    """Failures of a split renamed to the source file and row the data came from (the split's
    own row stays as `split_row`)."""
    if SOURCE_ROW not in df or "source_file" not in df:
        return failures
    for failure in failures:
        row = failure.get("row")
        if row and 0 < row <= len(df):
            failure["split_file"], failure["split_row"] = failure["file"], row
            failure["file"] = str(df["source_file"].iloc[row - 1])
            failure["row"] = int(df[SOURCE_ROW].iloc[row - 1])
    return failures


def label_kind(values: pd.Series) -> str:
    """'str' or 'int': the kind of label a column holds (judged on its non-null values)."""
    present = values.dropna()
    if len(present) and all(isinstance(v, str) for v in present):
        return "str"
    ints = [isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in present]
    if len(present) and all(ints):
        return "int"
    strings = sum(isinstance(v, str) for v in present)
    return "str" if strings >= len(present) / 2 else "int"


def has_kind(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())


def as_label(value: Any) -> str:
    """Labels travel as strings (id2label values); integral floats from CSV lose their `.0`."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def blank(texts: pd.Series) -> pd.Series:
    """Null or whitespace-only: reported once, by the text column's own check."""
    return texts.map(lambda v: not isinstance(v, str) or not v.strip())


def schema(
    split: str,
    text: str,
    label: str,
    labels: list[str],
    kind: str,
    seen: dict[str, set[str]],
) -> pa.DataFrameSchema:
    """The checks for one split; `seen` holds the text keys of the splits checked before it."""
    label_set = set(labels)

    def has_every_class(df: pd.DataFrame) -> bool:
        return label in df and label_set <= set(df[label].dropna().map(as_label))

    frame_checks = [
        pa.Check(
            lambda df: ~df[text].duplicated(keep="first") | blank(df[text]),
            error="duplicate text: the same text appears earlier in this split",
        ),
        pa.Check(
            lambda df: (
                ~text_key(df[text]).duplicated(keep="first")
                | df[text].duplicated(keep="first")
                | blank(df[text])
            ),
            error="near-duplicate text: equal to an earlier row after normalising case and spaces",
        ),
        pa.Check(
            has_every_class,
            error=f"class missing: split {split!r} must hold every label of {labels}",
        ),
    ]
    for other, keys in seen.items():
        frame_checks.append(
            pa.Check(
                lambda df, keys=keys: ~text_key(df[text]).isin(keys).fillna(False),
                error=f"leakage: the same text (after normalising) is also in split {other!r}",
            )
        )
    return pa.DataFrameSchema(
        {
            text: pa.Column(
                object,
                nullable=False,
                checks=[
                    pa.Check(
                        lambda v: isinstance(v, str),
                        element_wise=True,
                        error="text is not a string",
                    ),
                    pa.Check(
                        lambda v: not isinstance(v, str) or bool(v.strip()),
                        element_wise=True,
                        error="empty or whitespace-only text",
                    ),
                ],
            ),
            label: pa.Column(
                object,
                nullable=False,
                checks=[
                    pa.Check(
                        lambda v: has_kind(v, kind),
                        element_wise=True,
                        error=f"wrong label type: labels in this data are {kind}",
                    ),
                    pa.Check(
                        lambda v: not has_kind(v, kind) or as_label(v) in label_set,
                        element_wise=True,
                        error=f"label outside the label set {labels}",
                    ),
                ],
            ),
        },
        checks=frame_checks,
        coerce=False,
    )


def failures_from(err: SchemaErrors, file: Path, text: str, limit: int) -> list[dict[str, Any]]:
    """One entry per failing row and reason (row numbers count data rows from 1)."""
    out = []
    cases = err.failure_cases
    seen_rows: set[tuple[Any, str]] = set()
    for _, case in cases.iterrows():
        check = str(case["check"])
        index = case["index"]
        # Row-level (DataFrameSchema) checks report a failure case per column: keep one per row.
        row_level = case["schema_context"] == "DataFrameSchema"
        column = case["column"] if isinstance(case["column"], str) and not row_level else "(row)"
        if check.startswith("column_in_dataframe"):
            reason = f"required column {case['failure_case']!r} is missing"
            column, index = case["failure_case"], None
        elif check == "not_nullable":
            reason = "missing value (null)"
        elif check.startswith("dtype"):
            continue  # element-wise checks below report the offending rows
        else:
            reason = check
        value = case["failure_case"] if reason != check or column != "(row)" else None
        if column == "(row)" and index is not None and not pd.isna(index):
            if (index, reason) in seen_rows:
                continue
            seen_rows.add((index, reason))
            column, value = text, err.data.iloc[int(index)][text] if text in err.data else None
        out.append(
            {
                "file": str(file),
                "row": int(index) + 1 if index is not None and not pd.isna(index) else None,
                "column": column,
                "reason": reason,
                "value": None if value is None or pd.isna(value) else str(value)[:200],
            }
        )
    by_reason: dict[str, int] = {}
    kept = []
    for failure in out:
        by_reason[failure["reason"]] = by_reason.get(failure["reason"], 0) + 1
        if by_reason[failure["reason"]] <= limit:
            kept.append(failure)
    return kept
