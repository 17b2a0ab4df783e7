"""The confusion-matrix picture both classification tasks log (DVC gets the CSV)."""

from __future__ import annotations

from pathlib import Path


def confusion_png(truth: list[str], predicted: list[str], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(2 + len(labels), 2 + len(labels)))
    ConfusionMatrixDisplay.from_predictions(
        truth, predicted, labels=labels, ax=ax, colorbar=False, cmap="Blues"
    )
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
