"""Stage evaluate: test metrics, confusion matrix, calibration and the most confident mistakes."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import entry, lineage, params, tasks, tracking
from pipeline.atomic import write_json

log = logging.getLogger(__name__)


def predict(
    model_dir: Path, tokenized_dir: Path, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and true label ids on the test split, through the Trainer's prediction loop."""
    from datasets import load_from_disk
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    args = TrainingArguments(
        output_dir=str(Path(model_dir) / ".predict"),  # nothing is written there
        per_device_eval_batch_size=batch_size,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    output = trainer.predict(load_from_disk(str(tokenized_dir))["test"])
    return np.asarray(output.predictions, dtype=np.float64), np.asarray(output.label_ids)


def metrics(
    probs: np.ndarray, truth: np.ndarray, labels: list[str], bins: int, task: Any
) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    predicted = probs.argmax(axis=-1)
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=ids, zero_division=0
    )
    return {
        "overall": {
            "accuracy": float(accuracy_score(truth, predicted)),
            "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
            "weighted_f1": float(f1_score(truth, predicted, average="weighted", zero_division=0)),
            "ece": task.expected_calibration_error(probs, truth, bins),
            "rows": len(truth),
        },
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
    }


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


def run(
    model_dir: Path,
    tokenized_dir: Path,
    test_path: Path,
    params_path: Path,
    metrics_path: Path,
    plots_dir: Path,
) -> dict[str, Any]:
    """Evaluate the fine-tuned model on the test split and log into its MLflow run."""
    import mlflow
    from transformers import AutoConfig

    p = params.load(params_path, "base", "evaluate", "tracking")
    config = AutoConfig.from_pretrained(model_dir)
    labels = [config.id2label[i] for i in range(config.num_labels)]
    logits, truth = predict(model_dir, tokenized_dir, p.evaluate.batch_size)
    task = tasks.get(p.base.task)
    probs = task.softmax(logits)
    result = metrics(probs, truth, labels, p.evaluate.ece_bins, task)
    predicted = probs.argmax(axis=-1)
    texts = pd.read_parquet(test_path)["text"]
    if len(texts) != len(truth):
        raise ValueError(f"{test_path}: {len(texts)} rows but the tokenized test has {len(truth)}")

    plots_dir.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame(
        {
            "actual": [labels[i] for i in truth],
            "predicted": [labels[i] for i in predicted],
        }
    )
    rows.to_csv(plots_dir / "confusion.csv", index=False)
    wrong = np.flatnonzero(predicted != truth)
    worst = wrong[np.argsort(-probs[wrong].max(axis=-1), kind="stable")][: p.evaluate.top_mistakes]
    pd.DataFrame(
        {
            "row": worst + 1,
            "text": texts.iloc[worst].to_numpy(),
            "actual": [labels[i] for i in truth[worst]],
            "predicted": [labels[i] for i in predicted[worst]],
            "confidence": probs[worst].max(axis=-1).round(4),
        }
    ).to_csv(plots_dir / "mistakes.csv", index=False)
    png = plots_dir / "confusion.png"
    confusion_png(rows["actual"].tolist(), rows["predicted"].tolist(), labels, png)
    write_json(metrics_path, result)

    with tracking.run_for_model(p.tracking, lineage.model_digest(model_dir)):
        tracking.log_params_once(p.flat())
        mlflow.log_metrics({f"test_{k}": v for k, v in result["overall"].items()})
        for label, values in result["per_class"].items():
            mlflow.log_metrics({f"test_{label}_{k}": v for k, v in values.items()})
        mlflow.log_artifact(str(png), artifact_path="evaluation")
        mlflow.log_artifact(str(plots_dir / "mistakes.csv"), artifact_path="evaluation")
        mlflow.log_artifact(str(metrics_path), artifact_path="evaluation")
    log.info("test: %s", {k: round(v, 4) for k, v in result["overall"].items()})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokenized", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True, help="validated test split (texts)")
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="folder for plot files")
    args = parser.parse_args(argv)
    return entry.guarded(
        lambda: run(args.model, args.tokenized, args.test, args.params, args.metrics, args.plots)
    )


if __name__ == "__main__":
    raise SystemExit(main())
