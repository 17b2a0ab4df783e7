"""The team setup: PostgreSQL and an MLflow tracking server on loopback, the tiny pipeline run
against it, its run, served artifacts and a registered release."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import answers, copy_repo, sh

from pipeline.ops import team_server

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def have_postgres() -> str | None:
    """None when PostgreSQL is there (installed now if apt can); else why not."""
    try:
        team_server.postgres_bin("initdb")
        return None
    except team_server.ServerError as exc:
        reason = str(exc)
    if shutil.which("apt-get") and os.geteuid() == 0:
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
            if subprocess.run(cmd, capture_output=True, timeout=600).returncode != 0:
                return f"{reason}; apt-get could not install it"
        return None
    return reason


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    missing = have_postgres()
    if missing:
        pytest.skip(missing)
    # PostgreSQL runs as its own user: the folder must be one that user can enter.
    parent = Path(tempfile.mkdtemp(prefix="team-server-", dir="/tmp"))
    parent.chmod(0o755)
    folder = parent / "server"
    port, db_port = free_port(), free_port()
    log = (folder.parent / "server.log").open("w")
    cmd = [sys.executable, "-m", "pipeline.ops.team_server", "--dir", str(folder)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--db-port", str(db_port)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    if not answers(f"{url}/health", 120, proc):
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {(folder.parent / 'server.log').read_text()}")
        proc.kill()
        pytest.fail(f"no server on {url}: {(folder.parent / 'server.log').read_text()}")
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) is not None
    assert not (folder / "postgres" / "postmaster.pid").exists(), "PostgreSQL stopped with it"
    shutil.rmtree(parent, ignore_errors=True)


def test_the_pipeline_logs_and_releases_into_the_team_server(
    server: str, tmp_path: Path, reproduced_repo: Path
) -> None:
    """The stages that talk to MLflow (fine-tune, evaluate, export) run against the server in a
    copy of the reproduced repo whose local store is gone; the data stages log nothing."""
    import mlflow

    repo = copy_repo(reproduced_repo, tmp_path / "repo")
    for local in ("mlflow.db", "mlflow.db.lock", "mlruns", "models/checkpoints"):
        path = repo / local
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    ran = sh(
        ["dvc", "repro", "--force", "--downstream", "finetune"], repo, MLFLOW_TRACKING_URI=server
    )
    assert "Running stage 'export'" in ran, ran
    assert not (repo / "mlflow.db").exists(), "nothing went to a local store"
    client = mlflow.MlflowClient(tracking_uri=server, registry_uri=server)
    experiment = client.get_experiment_by_name("text-classification")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and "test_accuracy" in runs[0].data.metrics
    run_id = runs[0].info.run_id
    listed = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert "evaluation/confusion.png" in listed
    local = client.download_artifacts(run_id, "evaluation/confusion.png", str(tmp_path))
    assert Path(local).stat().st_size > 1000  # served by the tracking server, not a shared disk
    sh([sys.executable, "-m", "pipeline.ops.release", "v1"], repo, MLFLOW_TRACKING_URI=server)
    version = client.get_model_version_by_alias("text-classification", "candidate")
    assert version.tags["git_tag"] == "v1" and version.run_id == run_id
