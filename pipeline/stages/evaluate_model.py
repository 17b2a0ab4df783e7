"""Stage evaluate: the task's test metrics, tables and plots, into MLflow."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import tasks
from pipeline.core import entry, layout, lineage, params, tracking
from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.sources import quiet_load_bars

log = logging.getLogger(__name__)

# The params.yaml sections this stage reads (dvc.yaml lists the same).
SECTIONS = ("base", params.TASK_SECTION, "evaluate", "tracking")


def run(
    model_dir: Path,
    tokenized_dir: Path,
    test_path: Path,
    p: params.Params,
    metrics_path: Path,
    plots_dir: Path,
    headline_path: Path | None = None,
) -> dict[str, Any]:
    """Evaluate the fine-tuned model on the test split and log into its MLflow run."""
    import mlflow
    from datasets import load_from_disk
    from transformers import AutoConfig

    started = time.perf_counter()
    quiet_load_bars()
    p = p.select(*SECTIONS)
    task = tasks.get(p.base.task)
    config = AutoConfig.from_pretrained(model_dir)
    labels = [config.id2label[i] for i in range(config.num_labels)]
    data = load_from_disk(str(tokenized_dir))
    dataset = data["test"]
    test = pd.read_parquet(test_path)
    outputs = task.predict(model_dir, dataset, test, p)
    validated = pd.read_parquet(layout.split_file(test_path.parent, layout.VALIDATION))

    def validation() -> tuple[Any, Any]:
        return task.predict(model_dir, data["validation"], validated, p), data["validation"]

    # A fresh folder: files of an earlier run (perhaps of another task) would be logged too.
    with atomic_dir(plots_dir) as tmp:
        result = task.evaluate(outputs, dataset, test, labels, p, tmp, validation)
    # The stage's time (for the closing summary) sits beside the metrics, not among them.
    seconds = round(time.perf_counter() - started, 1)
    write_json(metrics_path, {**result, "seconds": seconds})
    if headline_path is not None:  # the few numbers `dvc metrics show` puts in one row
        write_json(headline_path, headline(result, task.headline))

    with tracking.run_for_model(p.tracking, lineage.model_digest(model_dir)):
        tracking.log_params_once(p.flat())
        mlflow.log_metrics({f"test_{k}": v for k, v in result["overall"].items()})
        for key, group in result.items():
            if key == "overall":
                continue
            for name, values in group.items():
                if isinstance(values, dict):  # per class or entity type, on test
                    mlflow.log_metrics({f"test_{name}_{k}": v for k, v in values.items()})
                else:  # a group of numbers of its own: validation_macro_f1, calibration_...
                    mlflow.log_metric(f"{key}_{name}", values)
        for path in sorted(plots_dir.iterdir()):
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        mlflow.log_artifact(str(metrics_path), artifact_path="evaluation")
    log.info("test: %s (%.0f s)", {k: round(v, 4) for k, v in result["overall"].items()}, seconds)
    return result


def headline(result: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The task's headline numbers: "key" of the overall metrics, "group.key" of another group
    (nested as {"group": {"key": ...}} in the file)."""
    out: dict[str, Any] = {}
    for key in keys:
        group, _, name = key.rpartition(".")
        source = result.get(group, {}) if group else result["overall"]
        if name in source:
            (out.setdefault(group, {}) if group else out)[name] = source[name]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokenized", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True, help="validated test split")
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="folder for plot files")
    parser.add_argument("--headline", type=Path, help="the task's headline metrics (JSON)")
    args = parser.parse_args(argv)
    return entry.guarded(
        lambda: run(
            args.model,
            args.tokenized,
            args.test,
            params.load(args.params, *SECTIONS),
            args.metrics,
            args.plots,
            args.headline,
        ),
        writes=[args.metrics, args.plots, *([args.headline] if args.headline else [])],
    )


if __name__ == "__main__":
    raise SystemExit(main())
