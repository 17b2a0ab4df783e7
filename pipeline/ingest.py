"""Stage ingest: materialise the configured source as train/validation/test Parquet files."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import entry, lineage, params
from pipeline.atomic import atomic_dir, write_json
from pipeline.sources import resolve_path
from pipeline.tables import SPLITS, TableError, find_split_files, read_table, text_key

log = logging.getLogger(__name__)


def check_columns(df: pd.DataFrame, path: Path, columns: dict[str, str]) -> None:
    """Every configured column exists; otherwise name the file, the column and the params key."""
    for key, column in columns.items():
        if column and column not in df.columns:
            raise TableError(
                f"{path}: no column {column!r} (set by {key}); the file has "
                f"{list(df.columns)}; fix {key} in params.yaml"
            )


def clean(
    df: pd.DataFrame, cfg: params.Ingest, text: str, label: str
) -> tuple[pd.DataFrame, dict]:
    """Drop configured labels, empty texts and duplicate texts; return the counts dropped."""
    dropped: dict[str, int] = {}
    if cfg.drop_labels:
        mask = df[label].astype("string").isin(cfg.drop_labels)
        dropped["label_in_drop_labels"] = int(mask.sum())
        df = df[~mask.fillna(False)]
    if cfg.drop_empty_text:
        empty = df[text].isna() | (df[text].astype("string").str.strip() == "")
        dropped["empty_text"] = int(empty.sum())
        df = df[~empty]
    if cfg.deduplicate:
        key = text_key(df[text])
        conflicting = key.map(df.groupby(key)[label].nunique()) > 1
        dropped["conflicting_labels"] = int(conflicting.sum())
        df, key = df[~conflicting], key[~conflicting]
        duplicate = key.duplicated(keep="first")
        dropped["duplicate_text"] = int(duplicate.sum())
        df = df[~duplicate]
    for reason, count in dropped.items():
        log.info("dropped %d rows: %s", count, reason)
    return df.reset_index(drop=True), dropped


def split(df: pd.DataFrame, cfg: params.Ingest, label: str, seed: int) -> dict[str, pd.DataFrame]:
    """Seeded split, stratified by label; rows sharing a group value stay on one side."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    def cut(frame: pd.DataFrame, fraction: float, salt: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        if not cfg.group_column:
            rest, held = train_test_split(
                frame, test_size=fraction, stratify=frame[label], random_state=seed + salt
            )
            return rest, held
        folds = StratifiedGroupKFold(
            n_splits=max(2, round(1 / fraction)), shuffle=True, random_state=seed + salt
        )
        rest_idx, held_idx = next(
            folds.split(frame, frame[label].astype(str), groups=frame[cfg.group_column])
        )
        return frame.iloc[rest_idx], frame.iloc[held_idx]

    rest, test = cut(df, cfg.test_fraction, 0)
    train, validation = cut(rest, cfg.validation_fraction / (1 - cfg.test_fraction), 1)
    return {"train": train, "validation": validation, "test": test}


def run(params_path: Path, out_dir: Path, report: Path) -> dict[str, Any]:
    """Read the source, clean and split it, write `out_dir/{split}.parquet` and the report."""
    p = params.load(params_path, "base", "ingest")
    cfg, text, label = p.ingest, p.base.text_column, p.base.label_column
    source = resolve_path(cfg.source, "ingest.source")
    columns = {"base.text_column": text, "base.label_column": label}
    if source.is_dir():
        files = find_split_files(source)
        frames = {}
        dropped: dict[str, dict[str, int]] = {}
        rows_in = {}
        for name, path in files.items():
            df = read_table(path)
            check_columns(df, path, columns)
            rows_in[name] = len(df)
            frames[name], dropped[name] = clean(df, cfg, text, label)
    else:
        df = read_table(source)
        check_columns(df, source, {**columns, "ingest.group_column": cfg.group_column})
        rows_in = {"all": len(df)}
        df, dropped_all = clean(df, cfg, text, label)
        if cfg.max_rows and len(df) > cfg.max_rows:
            df = df.sample(n=cfg.max_rows, random_state=p.base.seed).reset_index(drop=True)
            log.info("kept a seeded sample of %d rows (ingest.max_rows)", cfg.max_rows)
        frames = split(df, cfg, label, p.base.seed)
        dropped = {"all": dropped_all}
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            frame = frames[name].reset_index(drop=True)
            frame.to_parquet(tmp / f"{name}.parquet", index=False)
            log.info(
                "%s: %d rows, labels %s",
                name,
                len(frame),
                frame[label].value_counts().to_dict(),
            )
    sample = frames["train"].iloc[0][[text, label]].to_dict() if len(frames["train"]) else {}
    log.info("sample row: %s", sample)
    result = {
        "source": cfg.source,
        "source_sha256": lineage.file_digest(source),
        "rows_in": rows_in,
        "dropped": dropped,
        "rows": {name: len(frames[name]) for name in SPLITS},
        "labels": {
            name: {str(k): int(v) for k, v in frames[name][label].value_counts().items()}
            for name in SPLITS
        },
        "groups": {
            name: int(frames[name][cfg.group_column].nunique()) if cfg.group_column else None
            for name in SPLITS
        },
    }
    if cfg.group_column and not source.is_dir():
        shared = set(frames["train"][cfg.group_column]) & set(frames["test"][cfg.group_column])
        result["groups_shared_train_test"] = len(shared)
    write_json(report, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the split files")
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args(argv)
    return entry.guarded(lambda: run(args.params, args.out, args.report))


if __name__ == "__main__":
    raise SystemExit(main())
