"""Stage ingest: materialise the configured source as train/validation/test Parquet files."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import tasks
from pipeline.core import entry, layout, lineage, params
from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.sources import resolve_path
from pipeline.core.spool import Codes, spool
from pipeline.core.tables import (
    SPLITS,
    TableError,
    common_dtypes,
    digest_halves,
    duplicates,
    find_split_files,
    has_split_files,
    key_digests,
)

log = logging.getLogger(__name__)

# The params.yaml sections this stage reads (dvc.yaml lists the same).
SECTIONS = ("base", "ingest")
MIN_ROWS = 3  # one for each split
SOURCE_FILE = "source_file"  # which input file a row came from, for validation messages
CHUNK_ROWS = 100_000  # rows read at a time from a file that streams
# The narrow index of a streamed file's rows (never written): the row's place in its file, the
# two halves of its key digest, and which streamed file it is.
ROW, KEY_A, KEY_B, SOURCE = "__row", "__key_a", "__key_b", "__source"


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
    train, validation = cut_validation(
        rest, p, task, cfg.validation_fraction / (1 - cfg.test_fraction)
    )
    return {"train": train, "validation": validation, "test": test}


def cut_validation(
    frame: pd.DataFrame, p: params.Params, task: tasks.Task, fraction: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation): a seeded cut of `fraction`, or with `ingest.validate_on_train` the
    whole frame twice (every row trained on, and read again for selection)."""
    if p.ingest.validate_on_train:
        return frame.reset_index(drop=True), frame.reset_index(drop=True)
    return cut(frame, fraction, p.base.seed + 1, task.stratify(frame, p), p.ingest.group_column)


def drop_shared(
    frames: dict[str, pd.DataFrame],
    dropped: dict[str, dict[str, int]],
    task: tasks.Task,
    p: params.Params,
) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, int]]]:
    """Rows of train (and validation) whose input is also in a later split are dropped there, so
    given split files never leak into each other (the test file stays whole)."""
    later = pd.MultiIndex.from_arrays([[], []])
    for name in ("test", "validation", "train"):
        if name not in frames:
            continue
        keys = key_index(frames[name], task, p)
        shared = keys.isin(later)
        dropped[name]["also_in_a_later_split"] = int(shared.sum())
        frames[name] = frames[name][~shared].reset_index(drop=True)
        later = later.append(keys[~shared])
    return frames, dropped


def key_index(frame: pd.DataFrame, task: tasks.Task, p: params.Params) -> pd.MultiIndex:
    """Each row's key digest (its two halves), from a streamed index or from the task's key."""
    if KEY_A in frame:
        return pd.MultiIndex.from_arrays([frame[KEY_A].to_numpy(), frame[KEY_B].to_numpy()])
    halves = digest_halves(key_digests(task.key(frame, p)))
    return pd.MultiIndex.from_arrays([halves[:, 0], halves[:, 1]])


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
    if cfg.validate_on_train and not task.validates_on_train:
        raise params.ParamsError(
            f"ingest.validate_on_train: {task.name} selects its model on rows it did not train "
            "on; set ingest.validate_on_train: false (it is for fill-mask corpora of facts)"
        )
    dropped: dict[str, dict[str, int]] = {}
    rows_in: dict[str, int] = {}
    # Tables stream: a narrow index of each file's rows is split, and the files are read again
    # to write the splits. Extra files joined to a split (heldout, rehearsal) are read whole.
    streamed: list[Indexed] | None = (
        [] if task.streams and not cfg.heldout and not cfg.rehearsal else None
    )
    if source.is_dir() and not (task.reads_folders and not has_split_files(source)):
        files = find_split_files(source, task.accepts)
        frames = {}
        for name, path in files.items():
            frames[name], rows_in[name], dropped[name] = load(task, path, p, streamed)
            frames[name] = sample(frames[name], cfg.max_rows, p.base.seed)
        if cfg.deduplicate:
            frames, dropped = drop_shared(frames, dropped, task, p)
        if "validation" not in frames:
            log.info("%s has no validation file: cutting it from train", source)
            frames["train"], frames["validation"] = cut_validation(
                frames["train"], p, task, cfg.validation_fraction
            )
    else:
        df, rows_in["all"], dropped["all"] = load(task, source, p, streamed)
        if len(df) < MIN_ROWS:
            raise TableError(
                f"{source}: {len(df)} rows left after cleaning (read {rows_in['all']}, dropped "
                f"{dropped['all'] or 'none'}); a seeded split needs at least {MIN_ROWS}: check "
                "the file and the base.*_column and ingest.* params"
            )
        df = sample(df, cfg.max_rows, p.base.seed)
        if cfg.heldout:  # the test split comes from its own file: cut validation only
            frames = {}
            frames["train"], frames["validation"] = cut_validation(
                df, p, task, cfg.validation_fraction
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
        if streamed is None:
            for name in SPLITS:
                frame = frames[name].reset_index(drop=True)
                frame.to_parquet(layout.split_file(tmp, name), index=False)
            first = frames["train"].iloc[0].to_dict() if len(frames["train"]) else None
        else:
            first = gather(task, p, frames, streamed, tmp)
        for name in SPLITS:
            counts = task.label_counts(frames[name], p)
            log.info("%s: %d rows, %s", name, len(frames[name]), counts)
    if first is not None:
        log.info("sample row: %s", first)
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


def load(
    task: tasks.Task, path: Path, p: params.Params, streamed: list[Indexed] | None
) -> tuple[pd.DataFrame, int, dict[str, int]]:
    """(rows, rows read, rows dropped by reason) of one source file: the cleaned rows whole, or
    (where `streamed` is a list, which the file joins) its narrow index."""
    if streamed is None:
        df = read(task, path, p)
        rows_read = len(df)
        df, dropped = task.clean(df, p)
        return df, rows_read, dropped
    indexed, frame = index_file(task, path, p, len(streamed))
    streamed.append(indexed)
    return frame, indexed.rows_read, indexed.dropped


@dataclass
class Indexed:
    """A source file read in pieces: what is needed to read it again as it was."""

    path: Path
    dtypes: dict[str, Any]  # each column's type over the whole file
    empty: pd.DataFrame  # its columns, no rows
    rows_read: int
    dropped: dict[str, int]


def index_file(
    task: tasks.Task, path: Path, p: params.Params, number: int
) -> tuple[Indexed, pd.DataFrame]:
    """The file's cleaned rows as a narrow index: per row its place in the file (ROW), the
    digest of its key (KEY_A, KEY_B), its label and group values (what splitting and the report
    read), and SOURCE, the file's `number`. Duplicates are found over the whole file."""
    label, group = p.base.label_column, p.ingest.group_column
    labels, groups, targets = Codes(), Codes(), Codes()
    pieces: list[dict[str, np.ndarray]] = []
    dtypes: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    rows_read, empty = 0, None
    for chunk in task.read_chunks(path, p, CHUNK_ROWS):
        chunk = with_source_file(chunk, task, path, p)
        if empty is None:
            empty = chunk.iloc[:0]
        rows_read += len(chunk)
        dtypes.append(chunk.dtypes.to_dict())
        chunk, reasons = task.drop_rows(chunk, p)
        for reason, count in reasons.items():
            dropped[reason] = dropped.get(reason, 0) + count
        keys = task.key(chunk, p)
        wanted = task.targets(chunk, p)
        pieces.append(
            {
                ROW: chunk.index.to_numpy(dtype=np.int64),
                "key": key_digests(keys),
                "missing": keys.isna().to_numpy(),
                "target": targets.encode(wanted) if wanted is not None else None,
                "label": labels.encode(chunk[label]),
                "group": groups.encode(chunk[group]) if group else None,
            }
        )
    assert empty is not None  # read_chunks yields at least one piece
    common = common_dtypes(dtypes)

    def joined(name: str) -> np.ndarray:
        return np.concatenate([piece[name] for piece in pieces])

    keys = joined("key")
    keep = np.ones(len(keys), dtype=bool)
    if p.ingest.deduplicate:
        wanted_codes = joined("target") if pieces[0]["target"] is not None else None
        conflicting, duplicate = duplicates(keys, wanted_codes, joined("missing"))
        dropped[task.dedupe_reasons[0]] = int(conflicting.sum())
        dropped[task.dedupe_reasons[1]] = int(duplicate.sum())
        keep = ~(conflicting | duplicate)
    halves = digest_halves(keys)
    columns: dict[str, Any] = {
        ROW: joined(ROW)[keep],
        KEY_A: halves[keep, 0],
        KEY_B: halves[keep, 1],
        SOURCE: np.full(int(keep.sum()), number, dtype=np.int32),
        label: labels.decode(joined("label")[keep], common.get(label)),
    }
    if group:
        columns[group] = groups.ranks(joined("group")[keep])
    frame = pd.DataFrame(columns)
    empty = empty.astype({c: t for c, t in common.items() if c in empty and empty[c].dtype != t})
    return Indexed(path, common, empty, rows_read, dropped), frame


def gather(
    task: tasks.Task,
    p: params.Params,
    frames: dict[str, pd.DataFrame],
    sources: list[Indexed],
    out: Path,
) -> dict[str, Any] | None:
    """Read each streamed file again and write its rows into the split files, in the order of
    the split indexes `frames`; returns train's first row."""
    first = None
    with spool(out) as store:
        for number, source in enumerate(sources):
            split_of = np.full(source.rows_read, -1, dtype=np.int8)
            position = np.zeros(source.rows_read, dtype=np.int64)
            for k, name in enumerate(SPLITS):
                index = frames[name]
                mine = (index[SOURCE] == number).to_numpy()
                rows = index[ROW].to_numpy()[mine]
                split_of[rows] = k
                position[rows] = np.flatnonzero(mine)
            if not (split_of >= 0).any():
                continue
            for chunk in task.read_chunks(source.path, p, CHUNK_ROWS):
                chunk = with_source_file(chunk, task, source.path, p)
                cast = {c: t for c, t in source.dtypes.items() if chunk[c].dtype != t}
                chunk = chunk.astype(cast) if cast else chunk
                at = chunk.index.to_numpy(dtype=np.int64)
                goes = split_of[at]
                for k, name in enumerate(SPLITS):
                    rows = goes == k
                    if rows.any():
                        store.add(name, chunk[rows], position[at[rows]])
        for name in SPLITS:
            numbers = frames[name][SOURCE]
            empty = sources[int(numbers.iloc[0]) if len(numbers) else 0].empty
            row = store.write_parquet(name, layout.split_file(out, name), empty)
            if name == layout.TRAIN:
                first = row
    return first


def with_source_file(
    chunk: pd.DataFrame, task: tasks.Task, path: Path, p: params.Params
) -> pd.DataFrame:
    """A piece of a file, its group column checked and the file's name added to each row."""
    column = p.ingest.group_column
    if column and column not in chunk.columns:
        raise TableError(
            f"{path}: no column {column!r} (set by ingest.group_column); the file has "
            f'{list(chunk.columns)}; fix ingest.group_column in params.yaml ("" for none)'
        )
    return chunk.assign(**{SOURCE_FILE: path.name})


def read(task: tasks.Task, path: Path, p: params.Params) -> pd.DataFrame:
    """One source file through the task's reader, with the group column checked."""
    return with_source_file(task.read(path, p), task, path, p)


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
