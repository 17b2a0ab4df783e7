"""Stage validate: pandera checks over every split; clean data and the label list, or a report."""

from __future__ import annotations

import argparse
import logging
import numbers
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from pipeline import entry, params
from pipeline.atomic import atomic_dir, write_json
from pipeline.tables import SPLITS, text_key

log = logging.getLogger(__name__)
LABELS_FILE = "labels.json"


class ValidationFailed(ValueError):
    """The data breaks the schema; `failures` lists every failing row."""

    def __init__(self, failures: list[dict[str, Any]], report: Path | None) -> None:
        self.failures = failures
        lines = [
            f"  {f['file']} "
            + (f"row {f['row']} column {f['column']}" if f["row"] else "(whole split)")
            + f": {f['reason']}"
            + (f" (value {f['value']!r})" if f.get("value") is not None else "")
            for f in failures[:20]
        ]
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        where = f"; every failure is listed in {report}" if report else ""
        super().__init__(
            f"{len(failures)} validation failure(s){where}; fix the data (or params) and re-run:\n"
            + "\n".join(lines)
            + more
        )


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


def percentiles(values: pd.Series) -> dict[str, float]:
    qs = (50, 90, 95, 99, 100)
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs} if len(arr) else {}


def token_lengths(texts: list[str], model: str) -> np.ndarray:
    from transformers import AutoTokenizer

    from pipeline.sources import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    return np.array([len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]])


def run(raw_dir: Path, params_path: Path, out_dir: Path, report: Path, failures: Path) -> dict:
    """Check every split; write `out_dir` (Parquet, labels.json) and stats, or list failures."""
    p = params.load(params_path, "base", "validate")
    text, label = p.base.text_column, p.base.label_column
    frames = {}
    for split in SPLITS:
        path = raw_dir / f"{split}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run the ingest stage first")
        frames[split] = pd.read_parquet(path).astype(object).replace({np.nan: None})
    train = frames["train"]
    kind = "str" if p.validate.labels else label_kind(train.get(label, pd.Series(dtype=object)))
    labels = list(p.validate.labels) or sorted(
        {as_label(v) for v in train.get(label, []) if v is not None and has_kind(v, kind)}
    )
    found: list[dict[str, Any]] = []
    seen: dict[str, set[str]] = {}
    for split in SPLITS:
        df, path = frames[split], raw_dir / f"{split}.parquet"
        try:
            schema(split, text, label, labels, kind, seen).validate(df, lazy=True)
        except SchemaErrors as err:
            found += failures_from(err, path, text, p.validate.max_duplicate_report)
        if text in df:
            seen[split] = set(text_key(df[text]).dropna())
    if found:
        write_json(failures, {"failures": found, "labels": labels})
        raise ValidationFailed(found, failures)
    failures.unlink(missing_ok=True)
    stats: dict[str, Any] = {"labels": labels, "label_type": kind, "splits": {}}
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            df = frames[split]
            clean = pd.DataFrame({"text": df[text].astype(str), "label": df[label].map(as_label)})
            clean.to_parquet(tmp / f"{split}.parquet", index=False)
            tokens = token_lengths(clean["text"].tolist(), p.base.model)
            too_long = int((tokens > p.base.max_length).sum())
            if too_long:
                log.warning(
                    "%s: %d texts are longer than base.max_length=%d tokens and will be truncated",
                    split,
                    too_long,
                    p.base.max_length,
                )
            stats["splits"][split] = {
                "rows": len(clean),
                "class_balance": {
                    k: round(v, 4) for k, v in clean["label"].value_counts(normalize=True).items()
                },
                "class_counts": {k: int(v) for k, v in clean["label"].value_counts().items()},
                "chars": percentiles(clean["text"].str.len()),
                "words": percentiles(clean["text"].str.split().str.len()),
                "tokens": percentiles(pd.Series(tokens)),
                "over_max_length": too_long,
            }
        write_json(tmp / LABELS_FILE, labels)
    log.info("valid: %s rows, labels %s", {s: len(frames[s]) for s in SPLITS}, labels)
    write_json(report, stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", type=Path, required=True, help="ingest's split folder")
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for validated data")
    parser.add_argument("--report", type=Path, required=True, help="stats JSON")
    parser.add_argument("--failures", type=Path, required=True, help="failing rows, on failure")
    args = parser.parse_args(argv)
    return entry.guarded(lambda: run(args.raw, args.params, args.out, args.report, args.failures))


if __name__ == "__main__":
    raise SystemExit(main())
