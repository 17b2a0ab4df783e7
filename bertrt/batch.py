"""Bulk scoring on Dask distributed (`python -m bertrt batch`): a table of texts in, one Parquet
file of predictions per input partition out. Needs the wheel's [dask] extra."""

from __future__ import annotations

import json
import logging
import os
import threading
import typing
import uuid
from dataclasses import dataclass
from typing import Any

import dask
import dask.dataframe as dd
import fsspec
import pandas as pd
from distributed import Client, LocalCluster

from bertrt.api import load
from bertrt.predictors import Predictor

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
PART = "part-{:05d}.parquet"
# Column dtypes of the result keys with a scalar type; any other (lists, objects) is JSON text.
JSON = "string"  # lists and objects are written as JSON text
DTYPES = {str: "string", float: "float64", int: "int64", bool: "bool"}
ROW = "row"  # the output's id column when the input has none: the row number in the whole input
# Bytes of a CSV or JSONL file per partition: the same input and size give the same partitions,
# so a rerun's part-NNNNN names the same rows.
BLOCKSIZE = 64 * 2**20

# One predictor per worker process and model: integrity check and variant probe run once there.
_MODELS: dict[ModelSpec, Predictor] = {}
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to open the model itself: `bertrt.load`'s arguments."""

    model: str
    device: str = "auto"
    variant: str | None = None
    threads: int = 0
    tensorrt: bool = False
    # A PEM public key file, at this path on every worker: each checks the folder's signature
    # before it reads the model (a worker's $BERTRT_PUBLIC_KEY when None).
    public_key: str | None = None
    max_windows: int | None = None


@dataclass(frozen=True)
class Summary:
    partitions: int
    written: int
    skipped: int
    rows_written: int


def worker_model(spec: ModelSpec) -> Predictor:
    """The predictor of `spec` in this process, loaded on first use."""
    with _MODELS_LOCK:
        if spec not in _MODELS:
            _MODELS[spec] = load(
                spec.model,
                spec.device,
                spec.variant,
                spec.threads,
                spec.tensorrt,
                public_key=spec.public_key,
                max_windows=spec.max_windows,
            )
        return _MODELS[spec]


def input_format(path: str) -> tuple[str, str]:
    """(format, what to read) for a file, a glob or a folder of CSV, JSONL or Parquet files."""
    fs, root = fsspec.core.url_to_fs(path)
    if not any(c in root for c in "*?[") and fs.isdir(root):
        kinds = {FORMATS.get(os.path.splitext(f)[1]) for f in fs.find(root)} - {None}
        if len(kinds) != 1:
            raise ValueError(
                f"--input {path}: a folder must hold files of one format "
                f"(.csv, .jsonl or .parquet); found {sorted(kinds) or 'none'}"
            )
        (kind,) = kinds
        if kind == "parquet":
            return kind, path
        suffixes = [s for s, k in FORMATS.items() if k == kind]
        suffix = next(s for s in suffixes if fs.glob(f"{root.rstrip('/')}/*{s}"))
        return kind, path.rstrip("/") + "/*" + suffix
    kind = FORMATS.get(os.path.splitext(root)[1])
    if kind is None:
        raise ValueError(f"--input {path}: name a .csv, .jsonl or .parquet file, glob or folder")
    return kind, path


def read_table(path: str, text_column: str, id_column: str | None) -> dd.DataFrame:
    """The text (and id) columns of the input as a Dask dataframe."""
    kind, source = input_format(path)
    columns = [text_column] + ([id_column] if id_column else [])
    if kind == "csv":
        frame = dd.read_csv(source, blocksize=BLOCKSIZE, dtype={text_column: "string"})
    elif kind == "jsonl":
        frame = dd.read_json(source, lines=True, blocksize=BLOCKSIZE)
    else:
        frame = dd.read_parquet(source)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"--input {path}: no column {missing} (columns: {list(frame.columns)}); "
            "name the texts with --text-column and the ids with --id-column"
        )
    return frame[columns]


def result_layout(predictor: type[Predictor], options: dict[str, Any]) -> dict[str, str]:
    """The output columns of a task and their pandas dtypes, from its declared result: every
    required key, and each optional one whose option of the same name is on (`top_k`,
    `tokens`). Every part file has this layout, an empty partition's too."""
    layout = {}
    # With postponed annotations a TypedDict counts every key as required: read NotRequired here.
    for key, hint in typing.get_type_hints(predictor.RESULT, include_extras=True).items():
        if typing.get_origin(hint) is typing.NotRequired and not options.get(key):
            continue
        while typing.get_origin(hint) in (typing.NotRequired, typing.Annotated):
            hint = typing.get_args(hint)[0]
        layout[key] = DTYPES.get(hint, JSON)
    return layout


def result_columns(results: list[dict[str, Any]], layout: dict[str, str]) -> dict[str, Any]:
    """One column per key of `layout`: scalars as they are, lists and objects as JSON strings."""
    columns: dict[str, Any] = {}
    for key, dtype in layout.items():
        values = [r[key] for r in results]
        if dtype == JSON and any(isinstance(v, (list, dict)) for v in values):
            values = [json.dumps(v, ensure_ascii=False) for v in values]
        columns[key] = pd.Series(values, dtype=dtype)
    return columns


def score_partition(
    frame: pd.DataFrame,
    index: int,
    first_row: int | None,
    output: str,
    spec: ModelSpec,
    text_column: str,
    id_column: str | None,
    batch_size: int,
    options: dict[str, Any],
) -> int:
    """Score one partition on this worker and write it atomically as part-NNNNN.parquet."""
    texts = frame[text_column]
    if texts.isna().any():
        at = int(texts.isna().to_numpy().argmax())
        where = frame[id_column].iloc[at] if id_column else (first_row or 0) + at
        raise ValueError(f"partition {index}: the text of row {where} is empty (null)")
    model = worker_model(spec)
    results = [p.as_dict() for p in model.predict(texts.tolist(), batch_size, **options)]
    if id_column:
        ids = {id_column: frame[id_column].reset_index(drop=True)}
    else:
        ids = {ROW: pd.Series(range(first_row, first_row + len(frame)), dtype="int64")}
    out = pd.DataFrame({**ids, **result_columns(results, result_layout(type(model), options))})
    fs, root = fsspec.core.url_to_fs(output)
    final = f"{root}/{PART.format(index)}"
    # A unique name: a task the scheduler re-runs (its worker seemed lost) must not collide.
    tmp = f"{root}/.{PART.format(index)}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open(tmp, "wb") as handle:
            out.to_parquet(handle, index=False)
        fs.mv(tmp, final)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
    return len(out)


def done_partitions(output: str) -> set[int]:
    """Indexes of the partitions already written (a file appears only once complete)."""
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    names = (os.path.basename(p) for p in fs.glob(f"{root}/part-*.parquet"))
    return {int(n[len("part-") : -len(".parquet")]) for n in names}


def open_client(scheduler: str | None, local: int | None) -> tuple[Client, LocalCluster | None]:
    """A client of the scheduler at `scheduler`, or of a LocalCluster of `local` processes."""
    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(
        n_workers=local or 1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    )
    return Client(cluster), cluster


def run(
    input_path: str,
    output: str,
    spec: ModelSpec,
    client: Client,
    text_column: str = "text",
    id_column: str | None = None,
    batch_size: int = 32,
    options: dict[str, Any] | None = None,
) -> Summary:
    """Score every row of the input on the client's cluster; skip partitions already written."""
    frame = read_table(input_path, text_column, id_column)
    parts = frame.to_delayed()
    done = done_partitions(output)
    todo = [i for i in range(len(parts)) if i not in done]
    starts: list[int | None] = [None] * len(parts)
    if id_column is None and todo:
        # Row numbers need each partition's length: one read pass of the text column.
        lengths = client.compute(frame.map_partitions(len), sync=True).tolist()
        starts = [sum(lengths[:i]) for i in range(len(parts))]
    log.info(
        "%s: %d partitions, %d already in %s, %d to score on %d workers",
        input_path,
        len(parts),
        len(parts) - len(todo),
        output,
        len(todo),
        len(client.scheduler_info()["workers"]),
    )
    score = dask.delayed(score_partition, pure=False)
    tasks = [
        score(
            parts[i],
            i,
            starts[i],
            output,
            spec,
            text_column,
            id_column,
            batch_size,
            options or {},
        )
        for i in todo
    ]
    rows = sum(client.gather(client.compute(tasks))) if tasks else 0
    # Every part is written: what a killed worker or run left half-written is garbage now.
    fs, root = fsspec.core.url_to_fs(output)
    for stale in fs.glob(f"{root}/.part-*.tmp"):
        fs.rm(stale)
    log.info("%d rows written in %d partitions to %s", rows, len(tasks), output)
    return Summary(len(parts), len(tasks), len(parts) - len(tasks), rows)
