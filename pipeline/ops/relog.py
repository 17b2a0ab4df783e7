"""`make relog`: fill a training run in from the fine-tune reports after the store was away.

When MLflow stops answering during training, the fine-tune stage saves the model and writes its
report and curves anyway, and stops with a `TrackingGap`. Once the store answers again, this
logs into that same run (`mlflow_run_id` of the report) whatever it lacks: curve points by step
(points already there are not sent twice), the model's hash tag that the next stages find the
run by, the best validation score, the curve files, and the run's end. Running it twice changes
nothing the second time.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.core import entry, params, tracking

log = logging.getLogger(__name__)
CURVES = {"train_loss.csv": ("loss",), "eval.csv": ("eval_",)}  # metric names as first logged
BATCH = 1000  # MLflow's log_batch limit on metrics per call


def curve_points(curves_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per metric from the curve CSVs, under the names training logged them."""
    points: dict[str, list[tuple[int, float]]] = {}
    for name, prefixes in CURVES.items():
        path = curves_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; it is written by the finetune stage")
        with path.open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if key.startswith(prefixes) and value not in ("", None):
                        points.setdefault(key, []).append((int(row["step"]), float(value)))
    return points


def run(params_path: Path, report: Path, curves_dir: Path) -> dict[str, Any]:
    """Log what the run of `report` lacks; return counts of what was added and found."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    p = params.load(params_path, "tracking")
    if not report.is_file():
        raise FileNotFoundError(f"{report}: missing; run the finetune stage first")
    summary = json.loads(report.read_text(encoding="utf-8"))
    run_id = summary["mlflow_run_id"]
    uri = tracking.connect(p.tracking)  # still unreachable: a clear TrackingError, nothing done
    client = MlflowClient()
    try:
        client.get_run(run_id)
    except Exception as exc:  # MlflowException: a report from another store, or a deleted run
        raise tracking.TrackingError(
            f"{report}: run {run_id} is not in the MLflow store {uri} ({exc}); point "
            "MLFLOW_TRACKING_URI (or tracking.uri) at the store the run was started in"
        ) from None
    now = int(time.time() * 1000)
    added, present = 0, 0
    for key, points in curve_points(curves_dir).items():
        have = {m.step for m in client.get_metric_history(run_id, key)}
        missing = [Metric(key, value, now, step) for step, value in points if step not in have]
        present += len(points) - len(missing)
        for start in range(0, len(missing), BATCH):
            client.log_batch(run_id, metrics=missing[start : start + BATCH])
        added += len(missing)
    best_key = f"best_validation_{summary['selection_metric']}"
    if not client.get_metric_history(run_id, best_key):
        best = summary.get(best_key) or 0.0
        client.log_batch(run_id, metrics=[Metric(best_key, float(best), now, 0)])
        added += 1
    client.set_tag(run_id, tracking.MODEL_TAG, summary["model_sha256"])
    client.log_artifacts(run_id, str(curves_dir), artifact_path="training_curves")
    client.set_terminated(run_id, "FINISHED")
    result = {"run_id": run_id, "tracking_uri": uri, "added": added, "already_there": present}
    log.info("run %s: %d metric points added, %d were there", run_id, added, present)
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True, help="the finetune stage's report")
    parser.add_argument("--curves", type=Path, required=True, help="its folder of curve CSVs")
    args = parser.parse_args(argv)
    return entry.guarded(lambda: run(args.params, args.report, args.curves))


if __name__ == "__main__":
    raise SystemExit(main())
