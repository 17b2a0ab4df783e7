"""The pandera schema of a labeled text split, and its failures as rows a person can fix."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from pipeline.core.tables import TableError

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
    """The data rows (from 1) where `mask` holds; the index counts rows from the file's start."""
    rows = [str(i + 1) for i in mask.index[mask.to_numpy()]]
    more = f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else ""
    return ", ".join(rows[:SHOWN_ROWS]) + more


def refuse_mixed(
    path: Path, df: pd.DataFrame, text: str, label: str, kinds: dict[str, str] | None = None
) -> pd.DataFrame:
    """The table, numbered by source row, once its text column holds only strings and its
    label column one kind of value (a 1 beside a "1" would be a class of its own). A file read
    in pieces passes the same `kinds` with each: the kinds of label met so far and the rows."""
    texts = df[text].map(_kind)
    odd = texts.notna() & (texts != "string")
    if odd.any():
        raise TableError(
            f"{path}: column {text!r} holds non-text values ({sorted(set(texts[odd]))}) in "
            f"data rows {_rows(odd)}; every text must be a string: quote it in the file"
        )
    found = df[label].map(_kind)
    seen = {} if kinds is None else kinds
    for kind in found.dropna().unique():
        seen.setdefault(kind, _rows(found == kind))
    if len(seen) > 1:
        where = "; ".join(f"{kind}s in data rows {rows}" for kind, rows in seen.items())
        raise TableError(
            f"{path}: column {label!r} mixes kinds of label ({where}); write every label the "
            'same way, all strings ("1", "pos") or all numbers, then re-run'
        )
    first = int(df.index[0]) + 1 if len(df) else 1
    return df.assign(**{SOURCE_ROW: np.arange(first, first + len(df))})


def at_source(failures: list[dict[str, Any]], df: pd.DataFrame) -> list[dict[str, Any]]:
    """Failures of a split renamed to the source file and row the data came from (the split's
    own row stays as `split_row`)."""
    if SOURCE_ROW not in df or "source_file" not in df:
        return failures
    for failure in failures:
        row = failure.get("row")
        if row and row - 1 in df.index:
            failure["split_file"], failure["split_row"] = failure["file"], row
            failure["file"] = str(df["source_file"].loc[row - 1])
            failure["row"] = int(df[SOURCE_ROW].loc[row - 1])
    return failures


def label_kind_of(present: int, strings: int, integral: int) -> str:
    """'str' or 'int': the kind of label a column holds, from how many of its non-null values
    there are, how many are strings and how many integers (not booleans)."""
    if present and strings == present:
        return "str"
    if present and integral == present:
        return "int"
    return "str" if strings >= present / 2 else "int"


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


# Columns the checks of rows against other rows read (filled by checks.check_pieces over the
# whole split): a repeat of an earlier row's text, or of its key only; a key an earlier split
# holds (one column per earlier split, named LEAKS_INTO + its name).
EXACT_REPEAT, NEAR_REPEAT, LEAKS_INTO = "__exact_repeat", "__near_repeat", "__leaks_"


def schema(
    split: str,
    text: str,
    label: str,
    labels: list[str],
    kind: str,
    earlier: list[str],
    every_class: bool,
) -> pa.DataFrameSchema:
    """The checks for one split or a piece of it; `earlier` names the splits checked before it
    and `every_class` says whether the whole split holds every label."""
    frame_checks = [
        pa.Check(
            lambda df: ~df[EXACT_REPEAT] if EXACT_REPEAT in df else True,
            error="duplicate text: the same text appears earlier in this split",
        ),
        pa.Check(
            lambda df: ~df[NEAR_REPEAT] if NEAR_REPEAT in df else True,
            error="near-duplicate text: equal to an earlier row after normalising case and spaces",
        ),
        pa.Check(
            lambda df: every_class,
            error=f"class missing: split {split!r} must hold every label of {labels}",
        ),
    ]
    for other in earlier:
        frame_checks.append(
            pa.Check(
                lambda df, column=LEAKS_INTO + other: ~df[column] if column in df else True,
                error=f"leakage: the same text (after normalising) is also in split {other!r}",
            )
        )
    label_set = set(labels)
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
            column, value = text, err.data.loc[index][text] if text in err.data else None
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
