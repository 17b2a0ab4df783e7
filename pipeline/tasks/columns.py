"""Token columns straight into an Arrow-backed dataset, without `datasets.map`'s per-row work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

# The Arrow types datasets' own writer picks for these columns, so that the saved dataset is
# the same whichever way it was built; every other column is int64.
LIST_TYPES = {"input_ids": np.int32, "attention_mask": np.int8, "token_type_ids": np.int8}


@contextmanager
def plain_encoding(tokenizer: Any) -> Iterator[Any]:
    """The fast tokenizer's Rust backend set to no truncation and no padding, as
    `tokenizer(texts)` encodes: `encode_batch` on it gives the same ids without the per-text
    conversion of every field to Python lists that the transformers call does. The backend's
    own settings come back afterwards (the transformers call also sets them on each call)."""
    backend = tokenizer.backend_tokenizer
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        yield backend
    finally:
        if truncation:
            backend.enable_truncation(**truncation)
        if padding:
            backend.enable_padding(**padding)


def list_array(lengths: np.ndarray, values: np.ndarray) -> pa.Array:
    """A list column from its rows' lengths and all their values back to back."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


class Columns:
    """Windows of token ids with one int64 value per window for each other column, a chunk at
    a time; `attention_mask` (and `token_type_ids`) are all ones (zeros) of each window.

    With a `spool` path, `flush` moves the chunks so far to that Arrow stream file, and the
    dataset reads it from disk (memory-mapped); otherwise the chunks stay in memory."""

    def __init__(self, scalars: list[str], token_types: bool, spool: Path | None = None) -> None:
        self.scalars = scalars
        self.token_types = token_types
        self.chunks: dict[str, list[pa.Array]] = {}
        self.spool = spool
        self.writer: pa.ipc.RecordBatchStreamWriter | None = None

    def add(self, windows: list[list[int]], scalars: dict[str, list[int]]) -> None:
        lengths = np.fromiter(map(len, windows), dtype=np.int32, count=len(windows))
        total = int(lengths.sum())
        ids = np.fromiter(chain.from_iterable(windows), LIST_TYPES["input_ids"], count=total)
        new = {"input_ids": list_array(lengths, ids)}
        new |= {name: pa.array(scalars[name], type=pa.int64()) for name in self.scalars}
        new["attention_mask"] = list_array(lengths, np.ones(total, LIST_TYPES["attention_mask"]))
        if self.token_types:
            new["token_type_ids"] = list_array(
                lengths, np.zeros(total, LIST_TYPES["token_type_ids"])
            )
        for name, array in new.items():
            self.chunks.setdefault(name, []).append(array)

    def _table(self) -> pa.Table:
        if not self.chunks:
            self.add([], {name: [] for name in self.scalars})
        table = pa.table({name: pa.chunked_array(arrays) for name, arrays in self.chunks.items()})
        return table.combine_chunks()

    def flush(self) -> None:
        """With a spool: the chunks so far written to it and let go."""
        if self.spool is None or not self.chunks:
            return
        table = self._table()
        if self.writer is None:
            self.writer = pa.ipc.new_stream(str(self.spool), table.schema)
        self.writer.write_table(table)
        self.chunks = {}

    def dataset(self, fingerprint: str) -> Any:
        from datasets import Dataset

        if self.spool is None:
            return Dataset(self._table(), fingerprint=fingerprint)
        from datasets.table import MemoryMappedTable

        if self.writer is None:  # no rows: the columns, written empty
            self.writer = pa.ipc.new_stream(str(self.spool), self._table().schema)
        self.flush()
        self.writer.close()
        return Dataset(MemoryMappedTable.from_file(str(self.spool)), fingerprint=fingerprint)
