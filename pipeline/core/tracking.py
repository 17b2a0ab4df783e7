"""Everything MLflow: where the store is, checking it, and finding a model's run by its hash."""

from __future__ import annotations

import logging
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from bertrt.contract import MANIFEST_FILE
from pipeline.core import lineage
from pipeline.core.params import Tracking

log = logging.getLogger(__name__)

MODEL_TAG = "model_sha256"
STORE_FILE = "mlflow.db"
EXPS_MARKER = ("/.dvc/tmp/exps/",)


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any training starts."""


def repo_root(cwd: Path | None = None) -> Path:
    """The real project root, also from inside a `dvc exp run --temp/--queue` copy of it."""
    if os.environ.get("DVC_ROOT"):  # set by `dvc exp run` to the parent repo's root
        return Path(os.environ["DVC_ROOT"])
    here = (cwd or Path.cwd()).resolve()
    text = here.as_posix()
    for marker in EXPS_MARKER:
        if marker in text:
            return Path(text.split(marker, 1)[0])
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            check=True,
            cwd=here,
        ).stdout.strip()
        return Path(top)
    except (OSError, subprocess.CalledProcessError):
        return here


def tracking_uri(cfg: Tracking) -> str:
    """MLFLOW_TRACKING_URI, else `tracking.uri`, else SQLite `mlflow.db` at the repo root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    if not uri:
        return f"sqlite:///{repo_root() / STORE_FILE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        relative = uri[len("sqlite:///") :]
        return f"sqlite:///{repo_root() / relative}"
    return uri


def check_store(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with the fix, when the store cannot be reached or written."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(
                f"MLflow store {uri}: folder {folder} is missing or not writable; "
                "fix tracking.uri in params.yaml or MLFLOW_TRACKING_URI"
            )
        return
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout) as reply:
                if reply.status == 200:
                    return
        except OSError as exc:
            raise TrackingError(
                f"MLflow server {uri} is unreachable ({exc}); start it, or unset "
                "MLFLOW_TRACKING_URI to use the local SQLite store"
            ) from None
        raise TrackingError(f"MLflow server {uri} answered {health} with an error")
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"MLflow store {uri!r}: file stores are not supported; use sqlite:///mlflow.db "
            "or an http(s) server"
        )


EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def connect(cfg: Tracking) -> str:
    """Point MLflow at the store and experiment; return the URI. Checks the store first."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(cfg)
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with first_use_lock(uri):
            experiment = mlflow.set_experiment(cfg.experiment)
            if experiment.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
                # The UI then opens the experiment on its training runs, not on GenAI traces.
                mlflow.set_experiment_tag(EXPERIMENT_KIND, MODEL_TRAINING)
    except Exception as exc:
        raise TrackingError(f"MLflow store {uri} cannot be used: {exc}") from exc
    return uri


def first_use_lock(uri: str, timeout_s: float = 600.0) -> AbstractContextManager[Any]:
    """For a SQLite store, a file lock beside it while the store is opened: parallel workers
    (`dvc queue start -j N`) would otherwise run its schema migrations and create the
    experiment at the same time, and all but one fail."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    from filelock import FileLock

    return FileLock(uri[len("sqlite:///") :] + ".lock", timeout=timeout_s)


def portable_uri(uri: str) -> str:
    """The store's URI as a report may keep it: a SQLite file inside the repo relative to it
    (as the stages run from the repo root), not this machine's absolute path."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        try:
            return prefix + Path(uri[len(prefix) :]).resolve().relative_to(repo_root()).as_posix()
        except ValueError:
            return uri
    return uri


def run_name(cfg: Tracking) -> str:
    """A readable run name: the DVC experiment's under `dvc exp run`, else the experiment and
    the commit (`text-classification@5afd195`)."""
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        return exp_name
    commit = lineage.git_info()["commit"]
    return f"{cfg.experiment}@{commit[:7]}" if commit else cfg.experiment


def provenance_tags() -> dict[str, str]:
    """git commit and dirty flag, DVC experiment name (under `dvc exp run`), thread count."""
    import torch

    git = lineage.git_info()
    tags = {
        "git_commit": git["commit"] or "none",
        "git_dirty": str(git["dirty"]).lower(),
        "torch_threads": str(torch.get_num_threads()),
    }
    env = lineage.environment()
    tags["env_lock"] = str(env["lock"])
    tags["env_lock_sha256"] = str(env["lock_sha256"])
    tags["env_matches_lock"] = str(env["matches_lock"]).lower()
    tags["cpu_capability"] = str(env["cpu"]["torch_capability"])
    tags["cpu_flags"] = " ".join(env["cpu"]["flags"]) or "none"
    if git["commit"]:
        tags["mlflow.source.git.commit"] = git["commit"]
    if git["tag"]:
        tags["git_tag"] = git["tag"]
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags["dvc_exp_name"] = exp_name
    return tags


def find_run(cfg: Tracking, model_hash: str) -> str | None:
    """The id of the run that trained the model with this content hash, if any."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return None
    runs = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.{MODEL_TAG} = '{model_hash}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


@contextmanager
def run_for_model(cfg: Tracking, model_hash: str) -> Iterator[str]:
    """Log into the model's training run; a new run (tagged with the hash) only if none exists."""
    import mlflow

    connect(cfg)
    run_id = find_run(cfg, model_hash)
    if run_id is None:
        log.warning("no MLflow run holds model %s; starting one for it", model_hash[:12])
        tags = {MODEL_TAG: model_hash, **provenance_tags()}
        with mlflow.start_run(run_name=run_name(cfg), tags=tags) as run:
            yield run.info.run_id
        return
    with mlflow.start_run(run_id=run_id):
        yield run_id


def log_params_once(values: dict[str, Any]) -> None:
    """Log params that the run does not hold yet (MLflow params are immutable)."""
    import mlflow

    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    fresh = {k: v for k, v in values.items() if k not in existing}
    for key in sorted(set(values) & set(existing)):
        if str(values[key]) != existing[key]:
            # Params are immutable per run: the newer value goes into a tag instead.
            log.warning("%s changed from %s to %s for this model", key, existing[key], values[key])
            mlflow.set_tag(f"latest.{key}", str(values[key]))
    items = list(fresh.items())
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start : start + 100]))


def log_export(result: dict[str, Any], out_dir: Path) -> None:
    """Parity numbers, file sizes and the manifest of the exported folder."""
    import mlflow

    parity = result["parity"]
    mlflow.log_metrics(
        {
            "onnx_max_abs_logit_diff": parity["max_abs_logit_diff"],
            "onnx_label_mismatches": parity["label_mismatches"],
        }
    )
    for name, gate in result.get("variants", {}).items():
        for key, value in gate.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                mlflow.log_metric(f"onnx_{name}_{key}", value)
    mlflow.log_artifact(str(Path(out_dir) / MANIFEST_FILE), artifact_path="onnx")
