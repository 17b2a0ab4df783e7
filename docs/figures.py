"""Draw the committed training curves (reports/training/*.csv) into an SVG for the docs."""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

log = logging.getLogger(__name__)


def read_csv(path: Path) -> list[dict[str, float]]:
    """The rows of a numeric CSV; a missing file or column fails with its name."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the pipeline (make run) first")
    with path.open(encoding="utf-8", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def draw(curves: Path, out: Path) -> None:
    """Training loss, validation loss and validation metrics per epoch, side by side."""
    train = read_csv(curves / "train_loss.csv")
    evals = read_csv(curves / "eval.csv")
    best = max(evals, key=lambda row: row["selection_score"])
    # A Figure without pyplot needs no GUI backend.
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    loss_ax.plot([r["epoch"] for r in train], [r["loss"] for r in train], label="training loss")
    loss_ax.plot(
        [r["epoch"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss"
    )
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    metric_ax.plot(
        [r["epoch"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="accuracy"
    )
    metric_ax.plot(
        [r["epoch"] for r in evals], [r["eval_macro_f1"] for r in evals], "o-", label="macro-F1"
    )
    metric_ax.axvline(best["epoch"], color="grey", linestyle=":", label="kept: best macro-F1")
    metric_ax.set(xlabel="epoch", title="Validation")
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A fixed salt and no date: the same CSVs give the same SVG bytes, so a redraw diffs cleanly;
    # text stays text (smaller, searchable).
    with matplotlib.rc_context({"svg.hashsalt": "training-curves", "svg.fonttype": "none"}):
        fig.savefig(out, format="svg", metadata={"Date": None})
    log.info("%s: %d training points, %d epochs", out, len(train), len(evals))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--curves", type=Path, required=True, help="the finetune stage's CSVs")
    parser.add_argument("--out", type=Path, required=True, help="the SVG to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    draw(args.curves, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
