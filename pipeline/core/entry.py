"""The shared shape of a stage's `main`: logging set up once, known errors as one clear line."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline")

# Errors whose message already names the file, row or key and the fix: no traceback needed.
KNOWN = (ValueError, FileNotFoundError, RuntimeError)
LOW_SPACE = 16 * 2**20  # bytes free under which a failed write is put down to a full disk


def storage_problem(writes: Iterable[Path]) -> str | None:
    """Why these outputs cannot be written, if their file system says so: read-only, (nearly)
    full, or not writable. Libraries report a full disk in their own words (torch: "file write
    failed"), so the file system is asked instead of the message."""
    for path in writes:
        folder = Path(path).absolute()
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if folder.is_file():
            folder = folder.parent
        stat = os.statvfs(folder)
        if stat.f_flag & os.ST_RDONLY:
            return (
                f"{folder} is on a read-only file system; remount it read-write or point "
                f"{path} elsewhere"
            )
        free = stat.f_bavail * stat.f_frsize
        if free < LOW_SPACE:
            return (
                f"the file system of {folder} is full ({free // 1024} KiB free); free some "
                f"space or point {path} elsewhere"
            )
        if not os.access(folder, os.W_OK):
            return (
                f"{folder} is not writable by this user; fix its permissions or point {path} "
                "elsewhere"
            )
    return None


def guarded(run: Callable[[], Any], writes: Iterable[Path] = ()) -> int:
    """Call `run`; return 0, or 1 with the error's message on stderr. `writes` are the stage's
    outputs: a failure while the disk under them is full or read-only is named as such."""
    logging.basicConfig(
        level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # datasets' bar per saved split ("Saving the dataset"): the stages log their own line.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        run()
    except Exception as exc:
        if os.environ.get("PIPELINE_TRACEBACK"):
            raise
        # A ValueError is about the data or params; anything else may be a write that failed.
        problem = None if isinstance(exc, ValueError) else storage_problem(writes)
        if problem:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            print(
                f"error: cannot write the outputs: {problem}. Nothing half-written was kept and "
                f"the previous outputs are as they were ({type(exc).__name__}: {first})",
                file=sys.stderr,
            )
            return 1
        if not isinstance(exc, KNOWN):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
