"""Where a model folder is: a path, a model bundled into this installation, or an MLflow
registry URI (`models:/name@production`, `runs:/<id>/package`)."""

from __future__ import annotations

from pathlib import Path

import bertrt.registry as registry
from bertrt.contract import MANIFEST_FILE

# Bundled model folders live here inside an installed wheel: bertrt/models/<name>/.
MODELS_DIR = Path(__file__).resolve().parent / "models"
BUNDLED = "bundled"


class BundleError(RuntimeError):
    """A bundle that cannot be built or a bundled model that is not there."""


def bundled_models() -> list[str]:
    """Names of the model folders bundled into this installation."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / MANIFEST_FILE).is_file())


def bundled_dir(name: str | None = None) -> Path:
    """Folder of the bundled model `name` (the only one bundled when None)."""
    names = bundled_models()
    if not names:
        raise BundleError(
            f"no model is bundled with this bertrt ({MODELS_DIR} is empty); install a wheel "
            "built by `python -m bertrt package` or pass a model folder"
        )
    if name is None:
        if len(names) > 1:
            raise BundleError(f"{len(names)} models are bundled, name one of {names}")
        name = names[0]
    if name not in names:
        raise BundleError(f"no bundled model {name!r}; bundled: {names}")
    return MODELS_DIR / name


def resolve_model(spec: str) -> Path:
    """A model folder from a path; `bundled`, `bundled:NAME` or the bare NAME of a bundled model
    (a folder of that name wins; write `./NAME`); or an MLflow URI (`models:/name@production`)."""
    if spec == BUNDLED:
        return bundled_dir()
    if spec.startswith(BUNDLED + ":"):
        return bundled_dir(spec[len(BUNDLED) + 1 :])
    if registry.is_uri(spec):
        return registry.fetch(spec)
    if not Path(spec).exists() and spec in bundled_models():
        return bundled_dir(spec)
    return Path(spec)
