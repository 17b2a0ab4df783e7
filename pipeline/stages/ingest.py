"""Stage ingest: materialise the configured source as train/validation/test Parquet files."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import tasks
from pipeline.core import entry, layout, lineage, params
from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.sources import resolve_path
from pipeline.core.tables import SPLITS, TableError, find_split_files, has_split_files

log = logging.getLogger(__name__)

# The params.yaml sections this stage reads (dvc.yaml lists the same).
SECTIONS = ("base", "ingest")
MIN_ROWS = 3  # one for each split
SOURCE_FILE = "source_file"  # which input file a row came from, for validation messages


def cut(
    frame: pd.DataFrame, fraction: float, seed: int, strata: pd.Series | None, groups: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rest, held out): seeded, stratified by `strata` if given, `groups` kept whole."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    if len(frame) < 2:
        raise TableError(f"{len(frame)} row(s) left after cleaning: too few to split")
    try:
        if not groups:
            return tuple(
                train_test_split(frame, test_size=fraction, stratify=strata, random_state=seed)
            )
        folds = StratifiedGroupKFold(
            n_splits=max(2, round(1 / fraction)), shuffle=True, random_state=seed
        )
        labels = strata if strata is not None else pd.Series(0, index=frame.index)
        rest_idx, held_idx = next(folds.split(frame, labels, groups=frame[groups]))
    except ValueError as exc:  # scikit-learn's word for too few rows of a label or group
        counts = strata.value_counts().to_dict() if strata is not None else {}
        raise TableError(
            f"{len(frame)} rows cannot be split {fraction:.0%} off, stratified by label "
            f"{counts or ''} ({exc}); every label needs rows in every split: add rows, or "
            "leave rare labels out with ingest.drop_labels"
        ) from None
    return frame.iloc[rest_idx], frame.iloc[held_idx]


def split(df: pd.DataFrame, p: params.Params, task: tasks.Task) -> dict[str, pd.DataFrame]:
    """Seeded train/validation/test split (stratified as the task says; groups stay whole)."""
    cfg, seed = p.ingest, p.base.seed
    rest, test = cut(df, cfg.test_fraction, seed, task.stratify(df, p), cfg.group_column)
    fraction = cfg.validation_fraction / (1 - cfg.test_fraction)
    train, validation = cut(rest, fraction, seed + 1, task.stratify(rest, p), cfg.group_column)
    return {"train": train, "validation": validation, "test": test}


def drop_shared(
    frames: dict[str, pd.DataFrame],
    dropped: dict[str, dict[str, int]],
    task: tasks.Task,
    p: params.Params,
) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, int]]]:
    """Rows of train (and validation) whose input is also in a later split are dropped there, so
    given split files never leak into each other (the test file stays whole)."""
    later: set[str] = set()
    for name in ("test", "validation", "train"):
        if name not in frames:
            continue
        keys = task.key(frames[name], p)
        shared = keys.isin(later)
        dropped[name]["also_in_a_later_split"] = int(shared.sum())
        frames[name] = frames[name][~shared.to_numpy()].reset_index(drop=True)
        later |= set(keys[~shared])
    return frames, dropped


def sample(df: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    if rows and len(df) > rows:
        log.info("kept a seeded sample of %d of %d rows (ingest.max_rows)", rows, len(df))
        return df.sample(n=rows, random_state=seed).reset_index(drop=True)
    return df


def run(p: params.Params, out_dir: Path, report: Path) -> dict[str, Any]:
    """Read the source, clean and split it, write `out_dir/{split}.parquet` and the report."""
    p = p.select(*SECTIONS)
    source = resolve_path(p.ingest.source, "ingest.source")
    try:
        return _run(p, source, out_dir, report)
    except TableError as exc:
        if str(source) in str(exc):
            raise
        raise TableError(f"{source}: {exc}") from None


def _run(p: params.Params, source: Path, out_dir: Path, report: Path) -> dict[str, Any]:
    task = tasks.get(p.base.task)
    cfg = p.ingest
    dropped: dict[str, dict[str, int]] = {}
    rows_in: dict[str, int] = {}
    if source.is_dir() and not (task.reads_folders and not has_split_files(source)):
        files = find_split_files(source, task.accepts)
        frames = {}
        for name, path in files.items():
            df = read(task, path, p)
            rows_in[name] = len(df)
            frames[name], dropped[name] = task.clean(df, p)
            frames[name] = sample(frames[name], cfg.max_rows, p.base.seed)
        if cfg.deduplicate:
            frames, dropped = drop_shared(frames, dropped, task, p)
        if "validation" not in frames:
            log.info("%s has no validation file: cutting it from train", source)
            fraction = cfg.validation_fraction
            train = frames["train"]
            frames["train"], frames["validation"] = cut(
                train, fraction, p.base.seed + 1, task.stratify(train, p), cfg.group_column
            )
    else:
        df = read(task, source, p)
        rows_in = {"all": len(df)}
        df, dropped["all"] = task.clean(df, p)
        if len(df) < MIN_ROWS:
            raise TableError(
                f"{source}: {len(df)} rows left after cleaning (read {rows_in['all']}, dropped "
                f"{dropped['all'] or 'none'}); a seeded split needs at least {MIN_ROWS}: check "
                "the file and the base.*_column and ingest.* params"
            )
        df = sample(df, cfg.max_rows, p.base.seed)
        if cfg.heldout:  # the test split comes from its own file: cut validation only
            frames = {}
            frames["train"], frames["validation"] = cut(
                df,
                cfg.validation_fraction,
                p.base.seed + 1,
                task.stratify(df, p),
                cfg.group_column,
            )
        else:
            frames = split(df, p, task)
    if cfg.heldout:
        frames["test"] = read_extra(
            task, "heldout", cfg.heldout, cfg.max_rows, p.base.seed, rows_in, dropped, p
        )
    # Old text trained on beside the new, so that it is not forgotten; a sample of each source.
    for i, rehearsal in enumerate(cfg.rehearsal):
        key = "rehearsal" if len(cfg.rehearsal) == 1 else f"rehearsal[{i}]"
        extra = read_extra(
            task, key, rehearsal, cfg.rehearsal_rows, p.base.seed + 2 + i, rows_in, dropped, p
        )
        frames["train"] = pd.concat([frames["train"], extra], ignore_index=True)
    frames = task.finish_splits(frames, p)
    for reasons in dropped.values():
        for reason, count in reasons.items():
            log.info("dropped %d rows: %s", count, reason)
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            frame = frames[name].reset_index(drop=True)
            frame.to_parquet(layout.split_file(tmp, name), index=False)
            log.info("%s: %d rows, %s", name, len(frame), task.label_counts(frame, p))
    if len(frames["train"]):
        log.info("sample row: %s", frames["train"].iloc[0].to_dict())
    result = {
        "source": cfg.source,
        "heldout": cfg.heldout or None,
        "rehearsal": cfg.rehearsal or None,
        "source_sha256": lineage.file_digest(source),
        "rows_in": rows_in,
        "dropped": dropped,
        "rows": {name: len(frames[name]) for name in SPLITS},
        "labels": {name: task.label_counts(frames[name], p) for name in SPLITS},
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


def read(task: tasks.Task, path: Path, p: params.Params) -> pd.DataFrame:
    """One source file through the task's reader, with the group column checked."""
    df = task.read(path, p)
    column = p.ingest.group_column
    if column and column not in df.columns:
        raise TableError(
            f"{path}: no column {column!r} (set by ingest.group_column); the file has "
            f'{list(df.columns)}; fix ingest.group_column in params.yaml ("" for none)'
        )
    return df.assign(**{SOURCE_FILE: path.name})


def read_extra(
    task: tasks.Task,
    key: str,
    source: str,
    rows: int,
    seed: int,
    rows_in: dict[str, int],
    dropped: dict[str, dict[str, int]],
    p: params.Params,
) -> pd.DataFrame:
    """The file `source` of `ingest.<key>` read, cleaned and sampled to `rows` (0: all); its
    counts go into `rows_in` and `dropped` under `key`."""
    df = read(task, resolve_path(source, f"ingest.{key}"), p)
    rows_in[key] = len(df)
    df, dropped[key] = task.clean(df, p)
    return sample(df, rows, seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the split files")
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args(argv)
    return entry.guarded(
        lambda: run(params.load(args.params, *SECTIONS), args.out, args.report),
        writes=[args.out, args.report],
    )


if __name__ == "__main__":
    raise SystemExit(main())
