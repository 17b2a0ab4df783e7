"""Model folders from an MLflow registry or run URI (`models:/name@production`, `models:/name/3`,
`runs:/<run id>/package`), for `bertrt.load`, the CLI, the server and the wheel builder.

Only this path needs `mlflow` (and `MLFLOW_TRACKING_URI` pointing at the registry); a folder or a
bundled model never imports it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bertrt.manifest import MANIFEST_FILE

SCHEMES = ("models:/", "runs:/")


class RegistryError(RuntimeError):
    """A registry URI that cannot be fetched or holds no exported model folder."""


def is_uri(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(SCHEMES)


def fetch(uri: str, into: str | Path | None = None) -> Path:
    """Download the model at `uri` and return the exported folder inside it (the one with a
    manifest). A fresh download each time: aliases move."""
    try:
        import mlflow
    except ModuleNotFoundError:
        raise RegistryError(
            f"{uri}: loading from an MLflow registry needs mlflow (pip install mlflow) and "
            "MLFLOW_TRACKING_URI set to the registry's store"
        ) from None
    target = Path(into) if into else Path(tempfile.mkdtemp(prefix="bertrt-registry-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except Exception as exc:
        raise RegistryError(
            f"{uri}: cannot be fetched from the registry at {mlflow.get_tracking_uri()} ({exc}); "
            "check the name, version or alias and MLFLOW_TRACKING_URI"
        ) from None
    found = sorted(local.rglob(MANIFEST_FILE), key=lambda p: len(p.parts))
    if not found:
        raise RegistryError(f"{uri}: holds no exported model folder (no {MANIFEST_FILE})")
    return found[0].parent
