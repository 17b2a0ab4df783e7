"""Tests for pipeline/core/tracking.py: the store under parallel workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = """
import sys
import mlflow
from pipeline.core import tracking
from pipeline.core.params import Tracking

tracking.connect(Tracking(uri=sys.argv[1], experiment="text-classification"))
with mlflow.start_run(run_name=sys.argv[2]):
    for step in range(50):
        mlflow.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
"""


@pytest.mark.slow
def test_parallel_workers_on_a_fresh_sqlite_store_lose_no_run_and_double_none(
    tmp_path: Path,
) -> None:
    """As `dvc queue start -j 4` does: four processes open one new store at once."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, uri, f"worker-{i}"],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(4)
    ]
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0, 0], errors
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("text-classification")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"worker-{i}" for i in range(4)]
    assert [len(client.get_metric_history(r.info.run_id, "loss")) for r in runs] == [50] * 4
