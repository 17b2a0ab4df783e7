"""End to end: a real `dvc repro` in a temporary git repo on the tiny model and small data."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, synthetic_reviews, write_params

import bertrt

pytestmark = pytest.mark.slow

STAGES = ["ingest", "validate", "tokenize", "finetune", "evaluate", "export"]


def sh(cmd: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(cwd / ".dvc" / "tmp" / "site-cache"),
        "PIPELINE_LOG_LEVEL": "WARNING",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done.stdout + done.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z]+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for name in ("pipeline", "bertrt"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "data" / "sources", root / "data" / "sources")
    (root / "sources").mkdir()
    pd.DataFrame(synthetic_reviews(240, seed=5)).to_csv(
        root / "sources" / "reviews.csv", index=False
    )
    write_params(
        root,
        {
            "base.model": str(tiny_model_dir),
            "base.max_length": 32,
            "ingest.source": "sources/reviews.csv",
            "ingest.drop_labels": [],
            "finetune.epochs": 2,
            "finetune.batch_size": 16,
            "finetune.learning_rate": 1e-3,
            "finetune.warmup_steps": 0,
            "finetune.logging_steps": 4,
            "finetune.max_train_samples": 0,
            "export.min_agreement": 0.9,
            "export.max_metric_drop": 0.1,
        },
    )
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "ci@example.com"], root)
    sh(["git", "config", "user.name", "CI"], root)
    sh(["dvc", "init", "-q"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "pipeline"], root)
    return root


@pytest.fixture(scope="module")
def first_repro(repo: Path) -> str:
    return sh(["dvc", "repro"], repo)


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
    assert info["git"]["commit"] and len(info["data_sha256"]) == 64
    assert "finetune" in info["dvc_stages"]
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


def test_a_learning_rate_change_reruns_only_finetune_and_after(
    repo: Path, first_repro: str
) -> None:
    sh(["dvc", "repro"], repo)
    params_path = repo / "params.yaml"
    data = yaml.safe_load(params_path.read_text())
    data["finetune"]["learning_rate"] = 5e-4
    params_path.write_text(yaml.safe_dump(data, sort_keys=False))
    output = sh(["dvc", "repro"], repo)
    assert stages_run(output) == ["finetune", "evaluate", "export"]


def test_a_forced_retrain_gives_the_same_model_bit_for_bit(repo: Path, first_repro: str) -> None:
    before = json.loads((repo / "reports" / "train.json").read_text())["model_sha256"]
    shutil.rmtree(repo / "models" / "checkpoints")  # or it would resume, not retrain
    sh(["dvc", "repro", "--force", "--single-item", "finetune"], repo)
    after = json.loads((repo / "reports" / "train.json").read_text())
    assert after["resumed"] is False
    assert after["model_sha256"] == before


def test_a_temp_experiment_logs_into_the_repo_root_store(repo: Path, first_repro: str) -> None:
    import mlflow

    sh(["dvc", "exp", "run", "--temp", "-n", "lr-2e-3", "-S", "finetune.learning_rate=2e-3"], repo)
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=["text-classification"],
        filter_string="tags.dvc_exp_name = 'lr-2e-3'",
        output_format="list",
    )
    assert len(runs) == 1
    assert runs[0].data.params["finetune.learning_rate"] == "0.002"
    assert "test_accuracy" in runs[0].data.metrics, "evaluate found the run from the temp copy"
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db")), "no store inside the copy"
