"""End to end: a real `dvc repro` in a temporary git repo on the tiny model and small data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPRO_LOG, copy_repo, sh, stages_run

import bertrt

pytestmark = pytest.mark.slow

STAGES = ["ingest", "validate", "tokenize", "finetune", "evaluate", "export"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, reproduced_repo: Path) -> Path:
    """This module's copy of the repo after its first `dvc repro`; its tests re-run stages."""
    return copy_repo(reproduced_repo, tmp_path_factory.mktemp("e2e") / "repo")


@pytest.fixture(scope="module")
def first_repro(reproduced_repo: Path) -> str:
    """What the first `dvc repro` printed."""
    return (reproduced_repo.parent / REPRO_LOG).read_text(encoding="utf-8")


def test_every_stage_runs_and_writes_its_outputs(repo: Path, first_repro: str) -> None:
    assert stages_run(first_repro) == STAGES
    for split in ("train", "validation", "test"):
        assert (repo / "data" / "raw" / f"{split}.parquet").is_file()
        assert (repo / "data" / "validated" / f"{split}.parquet").is_file()
    assert json.loads((repo / "data" / "validated" / "labels.json").read_text()) == [
        "fresh",
        "rotten",
    ]
    assert (repo / "data" / "tokenized" / "dataset_dict.json").is_file()
    assert (repo / "models" / "finetuned" / "model.safetensors").is_file()
    assert any((repo / "models" / "checkpoints").glob("checkpoint-*"))
    for report in ("ingest", "validation", "tokenize", "train", "eval", "export"):
        assert json.loads((repo / "reports" / f"{report}.json").read_text())
    assert (repo / "reports" / "eval" / "confusion.png").stat().st_size > 1000
    assert (repo / "reports" / "training" / "eval.csv").read_text().count("\n") == 3
    evaluation = json.loads((repo / "reports" / "eval.json").read_text())
    assert set(evaluation["overall"]) == {"accuracy", "macro_f1", "weighted_f1", "ece", "rows"}
    assert set(evaluation["per_class"]) == {"fresh", "rotten"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)


def test_dvc_metrics_show_the_headline_in_a_terminal(repo: Path, first_repro: str) -> None:
    shown = sh(["dvc", "metrics", "show"], repo)
    assert "reports/metrics.json" in shown and "macro_f1" in shown
    assert max(len(line) for line in shown.splitlines()) <= 120, shown


def test_onnx_parity_and_manifest(repo: Path, first_repro: str) -> None:
    export = json.loads((repo / "reports" / "export.json").read_text())
    assert export["parity"]["passed"] is True
    assert export["parity"]["max_abs_logit_diff"] <= 1e-4
    assert export["parity"]["label_mismatches"] == 0
    folder = repo / "models" / "onnx"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["labels"] == ["fresh", "rotten"]
    assert manifest["metrics"]["accuracy"] == pytest.approx(
        json.loads((repo / "reports" / "eval.json").read_text())["overall"]["accuracy"]
    )
    info = manifest["provenance"]
    assert info["git"]["source_commit"] and len(info["data_sha256"]) == 64
    assert "finetune" in info["dvc_stages"]
    command = [sys.executable, "-m", "bertrt", "info", "--model", str(folder), "--device", "cpu"]
    shown = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    lineage = shown["lineage"]
    assert lineage["git_commit"] == sh(["git", "rev-parse", "HEAD"], repo).strip()
    assert lineage["dvc_stages"]["finetune"]["models/finetuned"]
    assert lineage["model_sha256"] in lineage["mlflow_run"]
    assert str(repo) not in (folder / "manifest.json").read_text().replace(
        info["base_model"]["name"], ""
    ), "no absolute path of this machine in the manifest"
    assert "Test metrics" in (folder / "README.md").read_text()
    predictor = bertrt.load(folder, device="cpu")
    texts = pd.read_parquet(repo / "data" / "validated" / "test.parquet")["text"].tolist()
    assert len(predictor.predict(texts)) == len(texts)


def test_the_mlflow_store_holds_one_run_with_everything(repo: Path, first_repro: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["text-classification"], output_format="list")
    assert len(runs) == 1, "evaluate and export log into the training run"
    run = runs[0]
    train = json.loads((repo / "reports" / "train.json").read_text())
    assert run.info.run_id == train["mlflow_run_id"]
    commit = sh(["git", "rev-parse", "HEAD"], repo).strip()
    assert run.info.run_name == f"text-classification@{commit[:7]}"
    experiment = mlflow.get_experiment_by_name("text-classification")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["git_dirty"] == "false", "dvc.lock and reports/ are the run's own"
    assert run.data.tags["cpu_capability"] and run.data.tags["env_matches_lock"] in (
        "true",
        "false",
    )
    assert run.data.params["finetune.learning_rate"] == "0.001"
    assert run.data.params["evaluate.ece_bins"] == "15"
    assert run.data.params["export.opset"] == "17"
    for metric in (
        "loss",
        "eval_macro_f1",
        "test_accuracy",
        "test_ece",
        "onnx_max_abs_logit_diff",
    ):
        assert metric in run.data.metrics, metric
    artifacts = {
        a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")
    }
    assert "evaluation/confusion.png" in artifacts
    onnx = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "onnx")}
    assert "onnx/manifest.json" in onnx
    assert run.data.tags["git_commit"] == sh(["git", "rev-parse", "HEAD"], repo).strip()


def test_a_second_repro_runs_nothing(repo: Path, first_repro: str) -> None:
    output = sh(["dvc", "repro"], repo)
    assert stages_run(output) == []
    assert "didn't change" in output or "is cached" in output


def test_another_tasks_params_rerun_nothing_and_the_own_task_section_reruns_its_readers(
    repo: Path, first_repro: str
) -> None:
    """A stage depends on the section of the task it runs (${base.task} in dvc.yaml), not on
    the others; a classifier's fine-tune does not read its task section at all."""
    sh(["dvc", "repro"], repo)
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    data = yaml.safe_load(original)
    data["fill-mask"]["probability"] = 0.3
    data["token-classification"]["stride"] = 8
    params_path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert "up to date" in sh(["dvc", "status"], repo)
    data["text-classification"]["aggregate"] = "max"
    params_path.write_text(yaml.safe_dump(data, sort_keys=False))
    status = sh(["dvc", "status"], repo)
    assert {"tokenize:", "evaluate:", "export:"} <= set(status.split()), status
    assert "finetune:" not in status.split(), status
    params_path.write_text(original)
