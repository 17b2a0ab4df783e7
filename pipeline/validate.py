"""Stage validate: pandera checks over every split; clean data and the label list, or a report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandera.errors import SchemaErrors

from pipeline import entry, params
from pipeline.atomic import atomic_dir, write_json
from pipeline.sources import resolve_model
from pipeline.tables import SPLITS, text_key
from pipeline.text_schema import as_label, failures_from, has_kind, label_kind, schema

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


def percentiles(values: pd.Series) -> dict[str, float]:
    qs = (50, 90, 95, 99, 100)
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs} if len(arr) else {}


def token_lengths(texts: list[str], tokenizer: Any) -> np.ndarray:
    return np.array([len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]])


def run(raw_dir: Path, params_path: Path, out_dir: Path, report: Path, failures: Path) -> dict:
    """Check every split; write `out_dir` (Parquet, labels.json) and stats, or list failures."""
    from transformers import AutoTokenizer

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
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(p.base.model))
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            df = frames[split]
            clean = pd.DataFrame({"text": df[text].astype(str), "label": df[label].map(as_label)})
            clean.to_parquet(tmp / f"{split}.parquet", index=False)
            tokens = token_lengths(clean["text"].tolist(), tokenizer)
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
