"""Digests and provenance: what a model was made from (data, params, code, DVC stages)."""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path
from typing import Any

import yaml

from bertrt.manifest import sha256_file

log = logging.getLogger(__name__)

# The files that define a fine-tuned model; checkpoints and logs do not change its identity.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def tree_digest(paths: list[Path], root: Path) -> str:
    """sha256 over (relative name, file sha256) pairs, order-independent."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    return tree_digest([p for p in path.rglob("*") if p.is_file()], path)


def model_digest(model_dir: Path) -> str:
    """The content hash that names a fine-tuned model (and finds its MLflow run)."""
    model_dir = Path(model_dir)
    files = [model_dir / name for name in MODEL_FILES if (model_dir / name).is_file()]
    if not any(f.name == "model.safetensors" for f in files):
        raise FileNotFoundError(f"{model_dir}: no model.safetensors; run the finetune stage")
    return tree_digest(files, model_dir)


def base_model_digest(spec: str) -> str | None:
    """Digest of the base checkpoint's weights when it is local (package: or folder)."""
    from pipeline.sources import SourceError, resolve_model

    try:
        location = Path(resolve_model(spec))
    except SourceError:
        return None
    if not location.is_dir():
        return None
    weights = sorted(location.glob("*.safetensors")) or sorted(location.glob("*.bin"))
    return tree_digest(weights, location) if weights else None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def git_info() -> dict[str, Any]:
    """Commit, dirty flag and tag of the working tree (None outside a git repo)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
        "tag": _git("describe", "--tags", "--exact-match") if commit else None,
    }


def dvc_lock_hashes(lock: Path = Path("dvc.lock")) -> dict[str, dict[str, str]]:
    """Per stage, the md5 of each out recorded in dvc.lock (empty before the first repro)."""
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {
        name: {out["path"]: out.get("md5", "") for out in stage.get("outs", [])}
        for name, stage in stages.items()
    }
