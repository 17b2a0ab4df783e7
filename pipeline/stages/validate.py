"""Stage validate: the task's checks on every split; clean data and labels, or a report."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import tasks
from pipeline.core import entry, layout, params
from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.sources import load_options, resolve_model
from pipeline.core.spool import ParquetRows
from pipeline.core.tables import SPLITS, read_table_chunks

log = logging.getLogger(__name__)

# The params.yaml sections this stage reads (dvc.yaml lists the same).
SECTIONS = ("base", "validate")
CHUNK_ROWS = 100_000  # rows read at a time by a task that streams


class ValidationFailed(ValueError):
    """The data breaks the schema; `failures` lists every failing row."""

    def __init__(self, failures: list[dict[str, Any]], report: Path | None) -> None:
        self.failures = failures
        lines = [
            f"  {where(f)}: {f['reason']}"
            + (f" (value {f['value']!r})" if f.get("value") is not None else "")
            for f in failures[:20]
        ]
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        listed = f"; every failure is listed in {report}" if report else ""
        super().__init__(
            f"{len(failures)} validation failure(s){listed}; "
            "fix the data (or params) and re-run:\n" + "\n".join(lines) + more
        )


def where(failure: dict[str, Any]) -> str:
    """`file row 3 column text`, `file line 12 column tags`, or `file (whole split)`."""
    if failure.get("line"):
        return f"{failure['file']} line {failure['line']} column {failure['column']}"
    if failure.get("row"):
        return f"{failure['file']} row {failure['row']} column {failure['column']}"
    return f"{failure['file']} (whole split)"


def run(raw_dir: Path, p: params.Params, out_dir: Path, report: Path, failures: Path) -> dict:
    """Check every split; write `out_dir` (Parquet, labels.json) and stats, or list failures.

    A task that streams reads each split in pieces of CHUNK_ROWS rows (three times: to find
    repeats, to check, to write); another reads each split whole."""
    from transformers import AutoTokenizer

    p = p.select(*SECTIONS)
    task = tasks.get(p.base.task)
    files = {split: layout.split_file(raw_dir, split) for split in SPLITS}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run the ingest stage first")
    rows = CHUNK_ROWS if task.streams else 0
    pieces = {split: partial(read_pieces, path, rows) for split, path in files.items()}
    labels, found = task.check_pieces(pieces, files, p)
    if found:
        write_json(failures, {"failures": found, "labels": labels})
        raise ValidationFailed(found, failures)
    failures.unlink(missing_ok=True)
    stats: dict[str, Any] = {"task": task.name, "labels": labels, "splits": {}}
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(p.base.model), **load_options(p.base.trust_remote_code, weights=False)
    )
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            with ParquetRows(layout.split_file(tmp, split)) as writer:
                clean = (writer.add(task.validated(piece, p)) for piece in pieces[split]())
                stats["splits"][split] = task.split_stats_pieces(clean, tokenizer, p)
            too_long = stats["splits"][split]["over_max_length"]
            if too_long:
                log.warning(
                    "%s: %d texts are longer than base.max_length=%d tokens and will be %s",
                    split,
                    too_long,
                    p.base.max_length,
                    task.long_inputs,
                )
        write_json(layout.labels_file(tmp), labels)
    counts = {s: stats["splits"][s]["rows"] for s in SPLITS}
    log.info("valid: %s rows, labels %s", counts, labels)
    write_json(report, stats)
    return stats


def read_pieces(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    """A split file in pieces of `rows` rows (0: whole), the index counting from its start."""
    if rows:
        yield from read_table_chunks(path, rows=rows)
    else:
        yield pd.read_parquet(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", type=Path, required=True, help="ingest's split folder")
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for validated data")
    parser.add_argument("--report", type=Path, required=True, help="stats JSON")
    parser.add_argument("--failures", type=Path, required=True, help="failing rows, on failure")
    args = parser.parse_args(argv)
    return entry.guarded(
        lambda: run(
            args.raw, params.load(args.params, *SECTIONS), args.out, args.report, args.failures
        ),
        writes=[args.out, args.report, args.failures],
    )


if __name__ == "__main__":
    raise SystemExit(main())
