"""Tables too large to hold whole: values kept as small codes, and split files gathered in pieces.

A stage that streams keeps a narrow index of a file's rows in memory (a position, a key digest,
a label code) and reads the file again to write its outputs. `Spool` collects each output's rows
as they come, in the order the file gives them, in an Arrow file on disk; `write_parquet` then
writes them in the order the index decided, a row group at a time. The Parquet file is the one
`DataFrame.to_parquet(index=False)` writes for the same rows: same schema, same row groups.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

# Rows per Parquet row group: pyarrow's default, which `DataFrame.to_parquet` uses.
ROW_GROUP_ROWS = 1024 * 1024
POSITION = "__position"  # where a spooled row goes in its output


class Codes:
    """Small integer codes for the values of a column read in pieces (-1: missing)."""

    def __init__(self) -> None:
        self.index: dict[Hashable, int] = {}
        self.values: list[Any] = []

    def encode(self, values: pd.Series) -> np.ndarray:
        out = np.full(len(values), -1, dtype=np.int32)
        present = values.notna().to_numpy()
        index, known = self.index, self.values
        for i, value in zip(np.flatnonzero(present), values.to_numpy()[present], strict=True):
            code = index.get(value)
            if code is None:
                code = index[value] = len(known)
                known.append(value)
            out[i] = code
        return out

    def decode(self, codes: np.ndarray, dtype: Any = None) -> pd.Series:
        """The values again (missing where the code is -1), as a column of `dtype`."""
        values = np.empty(len(self.values) + 1, dtype=object)
        values[:-1] = self.values
        values[-1] = None
        series = pd.Series(values[codes], dtype=object)
        return series.astype(dtype) if dtype is not None else series

    def ranks(self, codes: np.ndarray) -> np.ndarray:
        """Codes renumbered in the sorted order of their values (NaN where missing): what
        `np.unique` sees of the values, for splitters that group by them."""
        order = sorted(range(len(self.values)), key=self.values.__getitem__)
        rank = np.empty(len(self.values) + 1, dtype=np.float64)
        rank[np.asarray(order, dtype=np.int64)] = np.arange(len(order))
        rank[-1] = np.nan
        return rank[codes]


class Spool:
    """Rows bound for several outputs, kept on disk in a scratch folder until written."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.writers: dict[str, pa.ipc.RecordBatchFileWriter] = {}
        self.schemas: dict[str, pa.Schema] = {}

    def add(self, name: str, frame: pd.DataFrame, positions: np.ndarray) -> None:
        """Rows of output `name`, each with its position in that output."""
        table = pa.Table.from_pandas(frame, schema=self.schemas.get(name), preserve_index=False)
        if name not in self.writers:
            self.schemas[name] = table.schema
            path = self.folder / f"{name}.arrow"
            self.writers[name] = pa.ipc.new_file(
                str(path), table.schema.append(pa.field(POSITION, pa.int64()))
            )
        column = pa.array(np.asarray(positions, dtype=np.int64))
        self.writers[name].write_table(table.append_column(POSITION, column))

    def write_parquet(self, name: str, path: Path, empty: pd.DataFrame) -> dict[str, Any] | None:
        """Output `name` as one Parquet file at `path`, its rows in position order; `empty` gives
        the columns when no row came. Returns the first row (None when there is none).

        Rows that came in their output order (a split that keeps the file's order) are copied
        a batch at a time; otherwise they are taken in order from the memory-mapped spool."""
        writer = self.writers.pop(name, None)
        if writer is None:
            empty.to_parquet(path, index=False)
            return None
        writer.close()
        spooled = str(self.folder / f"{name}.arrow")
        with pa.OSFile(spooled) as source:
            fields = pa.ipc.open_file(source).schema.names
            only = pa.ipc.IpcReadOptions(included_fields=[fields.index(POSITION)])
            reader = pa.ipc.open_file(source, options=only)
            positions = np.concatenate(
                [
                    reader.get_batch(i).column(0).to_numpy()
                    for i in range(reader.num_record_batches)
                ]
            )
        with ParquetRows(path) as out:
            if len(positions) < 2 or bool((np.diff(positions) > 0).all()):
                with pa.OSFile(spooled) as source:
                    reader = pa.ipc.open_file(source)
                    for i in range(reader.num_record_batches):
                        batch = pa.Table.from_batches([reader.get_batch(i)])
                        out.add_table(batch.drop_columns([POSITION]))
            else:
                order = np.argsort(positions, kind="stable")
                with pa.memory_map(spooled) as source:
                    table = pa.ipc.open_file(source).read_all().drop_columns([POSITION])
                    for start in range(0, len(order), ROW_GROUP_ROWS):
                        out.add_table(table.take(order[start : start + ROW_GROUP_ROWS]))
            first = out.first
        return first.to_pandas().iloc[0].to_dict() if first is not None else None

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


class ParquetRows:
    """One Parquet file written from pieces of rows as they come: the file that
    `DataFrame.to_parquet(index=False)` writes for all the rows at once (its schema from the
    first piece, its row groups of ROW_GROUP_ROWS rows), holding one row group in memory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.schema: pa.Schema | None = None
        self.pending: list[pa.Table] = []
        self.rows = 0
        self.writer: pq.ParquetWriter | None = None
        self.first: pa.Table | None = None  # the first row, once one came

    def __enter__(self) -> ParquetRows:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is None:
            self.close()
        elif self.writer is not None:
            self.writer.close()

    def add(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Append the rows of `frame` (returned as it came, for chaining)."""
        self.add_table(pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False))
        return frame

    def add_table(self, table: pa.Table) -> None:
        """Append the rows of an Arrow table (its schema that of the first piece)."""
        if self.schema is None:
            self.schema = table.schema
        if self.first is None and len(table):
            self.first = table.slice(0, 1)
        self.pending.append(table)
        self.rows += len(table)
        while self.rows >= ROW_GROUP_ROWS:
            self._write(ROW_GROUP_ROWS)

    def _write(self, rows: int) -> None:
        assert self.schema is not None
        table = pa.concat_tables(self.pending)
        if self.writer is None:
            self.writer = pq.ParquetWriter(str(self.path), self.schema)
        self.writer.write_table(table.slice(0, rows).combine_chunks())
        rest = table.slice(rows)
        self.pending, self.rows = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        if self.schema is None:
            raise ValueError(f"{self.path}: no rows and no columns were given to write")
        if self.rows or self.writer is None:
            self._write(self.rows)
        assert self.writer is not None
        self.writer.close()


@contextmanager
def spool(near: Path) -> Iterator[Spool]:
    """A Spool in a scratch folder beside `near` (on its disk, not in /tmp), removed after."""
    Path(near).parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{Path(near).name}.spool.", dir=Path(near).parent))
    store = Spool(folder)
    try:
        yield store
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)
