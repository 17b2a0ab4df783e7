"""What training leaves on disk: checkpoints to resume from (or wipe), the curves for DVC plots,
and a tokenizer config that does not depend on the machine that saved it."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_dir

log = logging.getLogger(__name__)
FINGERPRINT = "fingerprint.json"
LOAD_OPTIONS = ("local_files_only", "cache_dir", "force_download", "proxies", "token", "revision")


def finished(folder: Path) -> bool:
    """Whether the Trainer finished writing this checkpoint: its state file, written last,
    parses, and its weights are there."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    weights = [folder / name for name in ("model.safetensors", "pytorch_model.bin")]
    has_weights = any(w.is_file() and w.stat().st_size > 0 for w in weights)
    return isinstance(state, dict) and "global_step" in state and has_weights


def checkpoint_state(
    checkpoints: Path, fingerprint: str, main: bool = True
) -> tuple[str | None, str | None]:
    """(the checkpoint to resume from or None, MLflow run id) for `checkpoints`.

    Checkpoints of other inputs are wiped, and a checkpoint a kill left half-written is removed
    rather than loaded; only the main process changes the folder (the others of a distributed
    run read it after)."""
    marker = checkpoints / FINGERPRINT
    try:
        saved = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint:
        found = sorted(checkpoints.glob("checkpoint-*"), key=lambda f: int(f.name.split("-")[-1]))
        usable = [folder for folder in found if finished(folder)]
        for folder in found:
            if folder not in usable and main:
                log.warning("%s was not finished (killed while saving?); removed", folder)
                shutil.rmtree(folder)
        if usable and main:
            log.info("resuming from %s (run %s)", usable[-1], saved.get("run_id"))
        return (str(usable[-1]) if usable else None), saved.get("run_id")
    if not main:
        return None, None
    if saved is not None or marker.exists():
        log.info("checkpoints in %s belong to other data or params; starting over", checkpoints)
    if checkpoints.exists():
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True)
    return None, None


def drop_load_options(path: Path) -> None:
    """Remove how the tokenizer was loaded (e.g. HF_HUB_OFFLINE) from what it saved.

    Otherwise the same training saves a different file, and a different model hash, depending
    on the environment of the machine that ran it.
    """
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in LOAD_OPTIONS:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# Evaluation log entries that are timings, not metrics.
TIMINGS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def write_curves(history: list[dict[str, Any]], curves_dir: Path, metric: str) -> None:
    """Step-level training loss and epoch-level validation metrics as CSV files for DVC plots.

    `selection_score` repeats the task's model-selection metric, so one plot serves every task.
    """
    train = [
        {"step": h["step"], "epoch": round(h["epoch"], 4), "loss": h["loss"]}
        for h in history
        if "loss" in h
    ]
    evals = [
        {
            "step": h["step"],
            "epoch": round(h["epoch"], 4),
            **{k: v for k, v in h.items() if k.startswith("eval_") and k not in TIMINGS},
            "selection_score": h[f"eval_{metric}"],
        }
        for h in history
        if "eval_loss" in h
    ]
    with atomic_dir(curves_dir) as tmp:
        for name, rows in (("train_loss.csv", train), ("eval.csv", evals)):
            with (tmp / name).open("w", newline="", encoding="utf-8") as handle:
                fields = list(rows[0]) if rows else ["step"]
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
