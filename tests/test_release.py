"""Release end to end in a temporary git repo with a local DVC remote: refusals, tag, pushed
artifacts, the registered model and its lineage, loading it back by alias, a temp experiment
released as a second, signed version, reproducing a tag from a fresh clone."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import answers, copy_repo, run_in, sh, stages_run

import bertrt
from bertrt import signing
from bertrt.signing import SIGNATURE_FILE, SignatureError

pytestmark = pytest.mark.slow
NAME = "text-classification"


def release(repo: Path, *args: str) -> str:
    return sh([sys.executable, "-m", "pipeline.ops.release", *args], repo)


def refused(repo: Path, *args: str) -> str:
    with pytest.raises(AssertionError) as failed:
        release(repo, *args)
    return str(failed.value)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, reproduced_repo: Path) -> Path:
    return copy_repo(reproduced_repo, tmp_path_factory.mktemp("release") / "repo")


@pytest.fixture(scope="module")
def v1(repo: Path) -> str:
    # Code or params that differ from the commit are refused...
    params = repo / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("learning_rate: 0.001", "learning_rate: 0.002"))
    assert "not committed (params.yaml)" in refused(repo, "v1")
    params.write_text(original)
    # ...and so is a dvc.lock that the committed code no longer matches.
    stage = repo / "pipeline" / "stages" / "validate.py"
    stage.write_text(stage.read_text() + "\n# changed\n")
    sh(["git", "commit", "-qam", "a change to validate"], repo)
    message = refused(repo, "v1")
    assert "dvc.lock is stale" in message and "validate" in message
    sh(["git", "reset", "-q", "--hard", "HEAD~1"], repo)
    return release(repo, "v1", "--message", "baseline")


def client(repo: Path) -> object:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_release_tags_the_run_with_its_lock_and_pushes_the_artifacts(
    repo: Path, v1: str, reproduced_repo: Path
) -> None:
    assert "released v1" in v1
    assert sh(["git", "status", "--porcelain", "--untracked-files=no"], repo).strip() == ""
    lock = yaml.safe_load(sh(["git", "show", "v1:dvc.lock"], repo))
    assert set(lock["stages"]) >= {"ingest", "finetune", "export"}
    assert json.loads(sh(["git", "show", "v1:reports/metrics.json"], repo))["accuracy"] > 0
    status = sh(["dvc", "status", "--cloud", "--json"], repo)
    assert json.loads(status or "{}") == {}, "everything of v1 is in the remote"
    assert any((reproduced_repo.parent / "remote").rglob("*")), "the repo's default remote"


def test_the_registered_version_and_the_package_point_at_each_other(repo: Path, v1: str) -> None:
    registry = client(repo)
    version = registry.get_model_version_by_alias(NAME, "candidate")
    manifest = json.loads((repo / "models" / "onnx" / "manifest.json").read_text())
    provenance = manifest["provenance"]
    commit = sh(["git", "rev-parse", "v1^{commit}"], repo).strip()
    assert str(version.version) == "1" and "Release v1" in version.description
    assert version.tags["git_tag"] == "v1" and version.tags["git_commit"] == commit
    assert version.tags["model_sha256"] == provenance["finetuned_sha256"]
    assert version.tags["mlflow_run_id"] == version.run_id
    assert (
        registry.get_run(version.run_id).data.tags["model_sha256"] == version.tags["model_sha256"]
    )
    # The package names the commit its code and params come from; v1 adds only the run's outputs.
    changed = sh(["git", "diff", "--name-only", provenance["git"]["source_commit"], "v1"], repo)
    own = ("dvc.lock", "reports/", ".gitignore")
    assert changed and all(f.startswith(own) or f.endswith(own) for f in changed.split())
    assert version.tags["wheel"].endswith(".whl")
    run = registry.get_run(version.run_id)
    assert run.data.tags["git_tag"] == "v1"
    wheels = registry.list_artifacts(version.run_id, "wheel")
    assert [w.path for w in wheels] == [version.tags["wheel"].split("/", 2)[-1]]


def test_the_registered_model_loads_by_alias(repo: Path, v1: str) -> None:
    import mlflow

    client(repo)
    texts = pd.read_parquet(repo / "data" / "validated" / "test.parquet")["text"][:8].tolist()
    local = [p.label for p in bertrt.load(repo / "models" / "onnx").predict(texts)]
    registered = bertrt.load(f"models:/{NAME}@candidate", device="cpu")
    assert [p.label for p in registered.predict(texts)] == local
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")
    out = pyfunc.predict(pd.DataFrame({"text": texts}))
    assert [json.loads(x)["label"] for x in out["prediction"]] == local
    with pytest.raises(bertrt.registry.RegistryError, match="cannot be fetched"):
        bertrt.load(f"models:/{NAME}@nowhere")


@dataclass
class Experiment:
    """What `pipeline.ops.experiment` printed, and the record it wrote."""

    out: str
    record: Path


@pytest.fixture(scope="module")
def lr_experiment(repo: Path, v1: str, tmp_path_factory: pytest.TempPathFactory) -> Experiment:
    """After v1, a temp experiment with a higher learning rate (`pipeline.ops.experiment`,
    `dvc exp run --temp` beneath), its config and record outside the repo."""
    folder = tmp_path_factory.mktemp("lr-experiment")
    config = folder / "lr.yaml"
    config.write_text("finetune:\n  learning_rate: 2.0e-3\n", encoding="utf-8")
    experiment = [sys.executable, "-m", "pipeline.ops.experiment", str(config), "--name"]
    record = folder / "lr.json"
    return Experiment(sh([*experiment, "lr-2e-3", "--report", str(record)], repo), record)


def test_a_learning_rate_change_reruns_only_finetune_and_after(lr_experiment: Experiment) -> None:
    ran = stages_run(lr_experiment.out)
    assert ran == ["finetune", "evaluate", "export"], lr_experiment.out


def test_a_temp_experiment_logs_into_the_repo_root_store(
    repo: Path, lr_experiment: Experiment
) -> None:
    import mlflow

    # The record: what the experiment's own reports say, with its command and machine.
    record = json.loads(lr_experiment.record.read_text(encoding="utf-8"))
    assert record["experiment"] == "lr-2e-3" and "--report" in record["command"]
    assert record["commit"] in sh(["git", "for-each-ref", "refs/exps"], repo)
    assert record["wall_seconds"] > 0 and record["machine"]["cpu"]
    assert record["train"]["train_rows"] > 0 and record["train"]["model_sha256"]
    assert set(record["eval"]["overall"]) >= {"accuracy", "macro_f1"}
    assert record["export"]["variants"]["fp32"]["passed"] is True
    assert record["params"]["finetune"]["learning_rate"] == 2.0e-3, "params as it ran"
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=[NAME],
        filter_string="tags.dvc_exp_name = 'lr-2e-3'",
        output_format="list",
    )
    assert len(runs) == 1
    assert runs[0].data.params["finetune.learning_rate"] == "0.002"
    assert "test_accuracy" in runs[0].data.metrics, "evaluate found the run from the temp copy"
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db")), "no store inside the copy"


@pytest.fixture(scope="module")
def v2(repo: Path, v1: str, lr_experiment: Experiment, keys: dict[str, Path]) -> str:
    """v1 goes to production; the learning-rate experiment, applied, is released as v2, signed;
    what the release printed."""
    release(repo, "--promote", NAME, "1")
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("learning_rate: 0.001", "learning_rate: 0.002"))
    sh(["git", "commit", "-qam", "learning rate 2e-3"], repo)
    assert "is stale" in refused(repo, "v2")
    # The experiment ran these params: applying it brings its lock, reports and outputs, all
    # but the checkpoints (resumption state, which DVC does not cache and a release ignores).
    sh(["dvc", "exp", "apply", "lr-2e-3"], repo)
    assert json.loads(sh(["dvc", "status", "--json"], repo) or "{}") in (
        {},
        {"finetune": [{"changed outs": {"models/checkpoints": "modified"}}]},
    )
    assert "exists already" in refused(repo, "v1")
    return release(repo, "v2", "--signing-key", str(keys["private"]))


def test_promote_then_a_second_release(repo: Path, v2: str) -> None:
    assert "released v2" in v2
    registry = client(repo)
    candidate = registry.get_model_version_by_alias(NAME, "candidate")
    assert str(candidate.version) == "2"
    assert str(registry.get_model_version_by_alias(NAME, "production").version) == "1"
    assert candidate.tags["git_tag"] == "v2"
    assert registry.get_run(candidate.run_id).data.tags.get("dvc_exp_name") == "lr-2e-3"
    assert registry.get_run(candidate.run_id).data.params["finetune.learning_rate"] == "0.002"


def test_a_signed_release_registers_a_folder_and_a_wheel_that_check_with_the_public_key(
    repo: Path, v2: str, keys: dict[str, Path], tmp_path: Path
) -> None:
    import zipfile

    import mlflow

    assert "signed with key" in v2 and "unsigned" not in v2
    # The exported folder, a DVC output, is as the export wrote it.
    assert not (repo / "models" / "onnx" / SIGNATURE_FILE).exists()
    assert "models/onnx" not in sh(["dvc", "status", "--json"], repo)
    registry = client(repo)
    version = registry.get_model_version_by_alias(NAME, "candidate")
    assert version.tags["signed"] == "true" and version.tags["git_tag"] == "v2"
    public_pem = keys["public"].read_bytes()
    assert version.tags["signing_key_sha256"] == signing.fingerprint(public_pem)
    uri = f"models:/{NAME}@candidate"
    texts = pd.read_parquet(repo / "data" / "validated" / "test.parquet")["text"][:4].tolist()
    model = bertrt.load(uri, device="cpu", public_key=keys["public"])
    local = bertrt.load(repo / "models" / "onnx", device="cpu")
    assert [p.label for p in model.predict(texts)] == [p.label for p in local.predict(texts)]
    with pytest.raises(SignatureError, match="signed with another key"):
        bertrt.load(uri, device="cpu", public_key=keys["other"])
    pyfunc = mlflow.pyfunc.load_model(uri, model_config={"public_key": str(keys["public"])})
    assert len(pyfunc.predict(pd.DataFrame({"text": texts}))) == 4
    # The wheel's folder is signed too, and checks with the same key.
    wheel = Path(registry.download_artifacts(version.run_id, "wheel", str(tmp_path)))
    (built,) = wheel.glob("*.whl")
    with zipfile.ZipFile(built) as archive:
        archive.extractall(tmp_path / "unpacked")
    signing.verify(tmp_path / "unpacked" / "bertrt" / "models" / "default", keys["public"])
    # --signed refuses a release without a key, before anything is tagged.
    sh(["git", "commit", "--allow-empty", "-qm", "another"], repo)
    done = run_in([sys.executable, "-m", "pipeline.ops.release", "v3", "--signed"], repo)
    assert done.returncode == 1 and "no key is given" in done.stderr
    assert sh(["git", "tag", "--list", "v3"], repo).strip() == ""


@dataclass
class Reproduced:
    """A fresh clone's `reproduce v1` and then `reproduce v1 --rerun`, with what was there
    between the two."""

    restore_out: str
    status_after_restore: dict
    finetuned_sha256_after_restore: str
    rerun_out: str
    restored: Path


@pytest.fixture(scope="module")
def reproduced_v1(repo: Path, v1: str, tmp_path_factory: pytest.TempPathFactory) -> Reproduced:
    """One fresh clone of the repo restores v1, then re-runs every stage of it (`dvc repro
    --force` after removing the checkpoints), with the hub's offline switch flipped from this
    run's (it once changed the tokenized data's fingerprint)."""
    clone = tmp_path_factory.mktemp("reproduce") / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], clone.parent)
    restore_out = sh([sys.executable, "-m", "pipeline.ops.reproduce", "v1"], clone)
    restored = clone / ".reproduce" / "v1"
    manifest = json.loads((restored / "models" / "onnx" / "manifest.json").read_text())
    status = json.loads(sh(["dvc", "status", "--json"], restored) or "{}")
    offline = "0" if os.environ.get("HF_HUB_OFFLINE") == "1" else "1"
    rerun_out = sh(
        [sys.executable, "-m", "pipeline.ops.reproduce", "v1", "--rerun"],
        clone,
        HF_HUB_OFFLINE=offline,
    )
    return Reproduced(
        restore_out,
        status,
        manifest["provenance"]["finetuned_sha256"],
        rerun_out,
        restored,
    )


def test_a_fresh_clone_restores_v1_and_reruns_it_to_the_same_bytes(
    repo: Path, reproduced_v1: Reproduced
) -> None:
    tagged = json.loads(sh(["git", "show", "v1:reports/metrics.json"], repo))
    restored_in = f"v1 restored in {Path('.reproduce') / 'v1'}: {json.dumps(tagged)}"
    assert restored_in in reproduced_v1.restore_out
    # Every output of v1 is back, but checkpoints (scratch for resuming; never pushed).
    assert reproduced_v1.status_after_restore in (
        {},
        {"finetune": [{"changed outs": {"models/checkpoints": "deleted"}}]},
    )
    v1_version = client(repo).get_model_version(NAME, "1")
    assert reproduced_v1.finetuned_sha256_after_restore == v1_version.tags["model_sha256"]
    out = reproduced_v1.rerun_out
    assert "same machine as v1: True" in out and "v1 reproduced: every output is equal" in out
    assert "DIFFERS" not in out and out.count(" equal") >= 8


def stage_outputs(lock_text: str) -> dict[str, str]:
    """md5 of every data and model output in a dvc.lock, by path (checkpoints are resumption
    state with timings, not an output anyone uses)."""
    lock = yaml.safe_load(lock_text)["stages"]
    return {
        out["path"]: out["md5"]
        for stage in lock.values()
        for out in stage.get("outs", [])
        if out["path"].startswith(("data/", "models/")) and "checkpoints" not in out["path"]
    }


def test_every_stage_gives_the_same_bytes_when_forced_to_run_again(
    repo: Path, reproduced_v1: Reproduced
) -> None:
    """Same code, params, data and packages on the same machine: every stage's output is
    byte-identical when forced to run again from scratch (no checkpoint to resume), in another
    folder and with the hub's offline switch flipped, and so are the metrics."""
    restored = reproduced_v1.restored
    before = stage_outputs(sh(["git", "show", "v1:dvc.lock"], repo))
    assert len(before) == 5 and stage_outputs((restored / "dvc.lock").read_text()) == before
    assert json.loads((restored / "reports" / "train.json").read_text())["resumed"] is False
    metrics = json.loads(sh(["git", "show", "v1:reports/eval.json"], repo))
    again = json.loads((restored / "reports" / "eval.json").read_text())
    metrics.pop("seconds")  # the stage's time, beside its metrics
    assert again.pop("seconds") > 0 and again == metrics


def test_a_tag_trained_in_another_precision_reruns_only_its_data_stages(
    repo: Path, v1: str, tmp_path: Path
) -> None:
    """A tag whose run trained in a precision this machine would not use (bf16 made where it is
    native, reproduced where it is not, or the reverse) cannot have its training repeated: the
    data stages are re-run and compared, and the exit is 1 with the reason."""
    from pipeline.core import params
    from pipeline.core.precision import precision_here
    from pipeline.ops.reproduce import DATA_STAGES

    here = precision_here(params.load(repo / "params.yaml", "finetune").finetune.precision)
    other = "fp32" if here == "bf16" else "bf16"
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    sh(["git", "checkout", "-q", "v1"], clone)
    report = clone / "reports" / "train.json"
    assert json.loads(report.read_text())["precision"] == here  # the tag was made here
    report.write_text(json.dumps({**json.loads(report.read_text()), "precision": other}))
    sh(["git", "commit", "-qam", f"v1 as if trained in {other}"], clone)
    sh(["git", "tag", "v1-other"], clone)
    done = run_in([sys.executable, "-m", "pipeline.ops.reproduce", "v1-other", "--rerun"], clone)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert f"training precision: {other} at v1-other, {here} here" in out
    assert f"v1-other trained in {other} and this machine trains its params in {here}" in out
    assert "re-running every stage" not in out and "models/finetuned" not in out
    rows = [line.split() for line in out.splitlines() if line.split(" ", 1)[0] in DATA_STAGES]
    assert [row[0] for row in rows] == list(DATA_STAGES), out
    assert all(row[-1] == "equal" for row in rows), out
    assert "v1-other's data stages reproduced" in out


def chromium() -> str:
    """Debian's chromium, installed here if it is missing and apt can; else the test skips."""
    found = shutil.which("chromium")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            subprocess.run(cmd, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and apt-get could not install it")
    return found


def page(browser: str, url: str, profile: Path, shot: Path) -> str:
    """The page's text once its scripts have run, and a screenshot of it."""
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    common += ["--virtual-time-budget=20000", "--window-size=1400,1000"]
    # One launch does both: the screenshot is written and the DOM printed.
    dom = subprocess.run(
        [*common, f"--screenshot={shot}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom.stdout))


def test_the_mlflow_ui_shows_the_run_its_metrics_and_the_registered_model(
    repo: Path, v1: str, tmp_path: Path
) -> None:
    import mlflow

    browser = chromium()
    registry = client(repo)
    version = registry.get_model_version(NAME, "1")
    run = registry.get_run(version.run_id)
    experiment = run.info.experiment_id
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{repo / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shots = Path(os.environ.get("UI_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        base = f"http://127.0.0.1:{port}"
        answers(f"{base}/health", 60)  # the pages below fail with what they show if it never does
        profile = tmp_path / "profile"
        # The model-training view (the UI's default for a new browser is GenAI).
        view = "?workflowType=machine_learning"
        runs = page(
            browser, f"{base}/#/experiments/{experiment}{view}", profile, shots / "runs.png"
        )
        assert run.info.run_name in runs and "Model training" in runs
        detail = page(
            browser,
            f"{base}/#/experiments/{experiment}/runs/{run.info.run_id}{view}",
            profile,
            shots / "run.png",
        )
        assert run.info.run_name in detail and "test_accuracy" in detail
        models = page(browser, f"{base}/#/models{view}", profile, shots / "models.png")
        assert NAME in models
        assert all((shots / f"{name}.png").stat().st_size > 10_000 for name in ("runs", "models"))
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    assert mlflow.get_tracking_uri().startswith("sqlite")


def test_the_default_remote_is_found_whatever_the_length_of_its_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.ops.reproduce import default_remote

    repo = tmp_path / "repo"
    repo.mkdir()
    sh(["git", "init", "-q"], repo)
    sh(["dvc", "init", "-q"], repo)
    monkeypatch.chdir(repo)
    assert default_remote() is None
    url = str(tmp_path / ("a-long-folder-name-" * 6) / "remote")  # past 80 columns
    sh(["dvc", "remote", "add", "-d", "storage", url], repo)
    sh(["dvc", "remote", "add", "other", str(tmp_path / "other")], repo)
    assert default_remote() == ("storage", url)
