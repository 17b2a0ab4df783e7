"""Reading labeled tables (CSV, JSONL, Parquet) and the text key used to find duplicates."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev"),
    "test": ("test",),
}
SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
COMPRESSIONS = (".bz2", ".gz", ".xz", ".zst")
OPENERS: dict[str, Callable[..., IO[Any]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


class TableError(ValueError):
    """A table that cannot be read; the message names the file and the fix."""


def table_format(path: Path) -> str | None:
    """The format of a file from its suffixes (`x.csv.bz2` is CSV), or None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return SUFFIXES.get(suffixes[-1]) if suffixes else None


def open_bytes(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed by its suffix (.gz, .bz2, .xz)."""
    return OPENERS.get(path.suffix.lower(), open)(path, "rb")


def not_utf8(path: Path) -> str:
    """Where a file stops being UTF-8, as `line N, byte B of the line: reason` (a decoder's
    byte offset alone points at no row a person can open)."""
    with open_bytes(path) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start : exc.start + 1]
                return f"line {number}, byte {exc.start + 1} of the line ({bad!r}): {exc.reason}"
    return "an invalid byte sequence"


def encoding_error(path: Path) -> TableError:
    """A TableError naming the first line that is not UTF-8, and the fix."""
    return TableError(
        f"{path}: not UTF-8 at {not_utf8(path)}; re-save the file as UTF-8 (for example "
        f"`iconv -f latin1 -t utf-8 {path.name} > fixed{''.join(path.suffixes)}`)"
    )


def read_table(path: Path, texts: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read one CSV/TSV/JSONL/Parquet file (optionally compressed) into a DataFrame; in CSV and
    TSV, which have no types, the `texts` columns stay strings (a review that reads "10" is a
    text, not a number)."""
    kind = table_format(path)
    strings = dict.fromkeys(texts, str)
    with reading(path, kind):
        if kind == "csv":
            return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=strings)
        if kind == "tsv":
            return pd.read_csv(
                path, sep="\t", keep_default_na=False, na_values=[""], dtype=strings
            )
        if kind == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        if kind == "parquet":
            return pd.read_parquet(path)
    raise unsupported(path)


@contextmanager
def reading(path: Path, kind: str | None) -> Iterator[None]:
    """Errors of reading `path` as `kind` turned into TableErrors that name the file."""
    try:
        yield
    except UnicodeDecodeError:
        raise encoding_error(path) from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise TableError(f"{path}: cannot be read as {kind}: {exc}") from None


def unsupported(path: Path) -> TableError:
    return TableError(
        f"{path}: unsupported file type; use .csv, .tsv, .jsonl or .parquet (optionally .bz2/.gz)"
    )


def split_of(path: Path) -> str | None:
    """The split a file name names: `train.csv`, `dev.txt`, `msra_test.txt`, `x-valid.jsonl`."""
    stem = path.name.split(".")[0].lower()
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if stem == alias or stem.endswith(("_" + alias, "-" + alias)):
                return split
    return None


def has_split_files(folder: Path) -> bool:
    """Whether a folder holds a file named for a split (train, dev, msra_test, ...)."""
    return any(split_of(path) for path in folder.iterdir() if path.is_file())


def find_split_files(
    folder: Path, accepts: Callable[[Path], bool] = lambda p: table_format(p) is not None
) -> dict[str, Path]:
    """train/validation/test files in a folder (validation may be named valid or dev, and may
    be absent: then it is cut from train)."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        split = split_of(path)
        if not split or not accepts(path):
            continue
        if split in found:
            raise TableError(
                f"{folder}: two files for split {split!r}: {found[split].name}, {path.name}"
            )
        found[split] = path
    missing = [s for s in SPLITS if s not in found and s != "validation"]
    if missing:
        raise TableError(
            f"{folder}: no file for split(s) {missing}; name them train/validation/test "
            "(or dev/valid; a prefix such as msra_train works) with a suffix the task reads, "
            "or point ingest.source at one file"
        )
    return found


def text_key(texts: pd.Series) -> pd.Series:
    """Case- and whitespace-insensitive key: two texts with equal keys are duplicates."""
    return texts.astype("string").str.lower().str.split().str.join(" ")


def read_table_chunks(
    path: Path, texts: tuple[str, ...] = (), rows: int = 100_000
) -> Iterator[pd.DataFrame]:
    """`read_table` in pieces of at most `rows` rows, numbered on from the previous piece (the
    index counts rows from the file's start). Each piece's column types are inferred from that
    piece, as pandas infers them; `unify` makes the pieces' types agree afterwards."""
    given = False
    for piece in _chunks(path, texts, rows):
        given = True
        yield piece
    if not given:  # no data rows: the empty table, with its columns
        yield read_table(path, texts)


def _chunks(path: Path, texts: tuple[str, ...], rows: int) -> Iterator[pd.DataFrame]:
    kind = table_format(path)
    strings = dict.fromkeys(texts, str)
    with reading(path, kind):
        if kind in ("csv", "tsv"):
            with pd.read_csv(
                path,
                sep="\t" if kind == "tsv" else ",",
                keep_default_na=False,
                na_values=[""],
                dtype=strings,
                chunksize=rows,
            ) as reader:
                yield from reader
            return
        if kind == "jsonl":
            with pd.read_json(path, lines=True, dtype=False, chunksize=rows) as reader:
                yield from reader
            return
        if kind == "parquet":
            import pyarrow.parquet as pq

            start = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=rows, use_threads=False):
                frame = batch.to_pandas()
                frame.index = pd.RangeIndex(start, start + len(frame))
                start += len(frame)
                yield frame
            return
    raise unsupported(path)


def common_dtypes(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """One dtype per column for pieces read apart (int64 beside float64 is float64, a number
    beside a string is object), as pandas gives when it concatenates them."""
    columns: dict[str, list[Any]] = {}
    for dtypes in pieces:
        for column, dtype in dtypes.items():
            columns.setdefault(column, []).append(dtype)
    return {
        column: pd.concat([pd.Series([], dtype=d) for d in found]).dtype
        for column, found in columns.items()
    }


def key_digests(keys: pd.Series) -> np.ndarray:
    """A 16-byte digest of each key (None for a missing key gives a digest of its own): sets of
    keys of millions of rows compared by digest rather than by the texts themselves."""
    present = keys.notna().to_numpy()
    return np.array(
        [
            hashlib.blake2b(b"k" + k.encode() if ok else b"-", digest_size=16).digest()
            for k, ok in zip(keys.astype(object).to_numpy(), present, strict=True)
        ],
        dtype="S16",
    )


def digest_halves(digests: np.ndarray) -> np.ndarray:
    """`key_digests` as an (n, 2) array of uint64: two columns pandas hashes without a Python
    object per row."""
    return digests.view("<u8").reshape(-1, 2) if len(digests) else np.zeros((0, 2), "<u8")


def duplicates(
    digests: np.ndarray, targets: np.ndarray | None, missing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(conflicting, duplicate) masks over rows known by their key digests (`key_digests`):
    conflicting rows share a key with a row of another target (a label, say; target codes of
    -1 are missing and agree with any), duplicates repeat the key of an earlier row that is not
    conflicting. Rows without a key (`missing`) never conflict and repeat each other."""
    halves = digest_halves(digests)
    frame = pd.DataFrame({"a": halves[:, 0], "b": halves[:, 1]})
    conflicting = np.zeros(len(frame), dtype=bool)
    if targets is not None and len(frame):
        known = pd.Series(np.where(targets < 0, np.nan, targets))
        distinct = known.groupby([frame["a"], frame["b"]]).transform("nunique").to_numpy()
        conflicting = (distinct > 1) & ~missing
    duplicate = np.zeros(len(frame), dtype=bool)
    kept = ~conflicting
    duplicate[kept] = frame[kept].duplicated(keep="first").to_numpy()
    return conflicting, duplicate
