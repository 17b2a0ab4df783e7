"""`bertrt.load`: a model folder, bundled name or registry URI into its task's predictor."""

from __future__ import annotations

import os
from pathlib import Path

import bertrt.manifest as manifest_io
import bertrt.signing as signing
from bertrt.contract import MANIFEST_FILE
from bertrt.engine import Engine, ModelFolderError, open_engine
from bertrt.locate import bundled_dir, resolve_model
from bertrt.long_text import MAX_WINDOWS
from bertrt.predictors import REGISTRY, TASKS, Predictor

# Read by `load` when its argument is not given, so that every way of loading a model (the
# command line, the server, an MLflow pyfunc, Dask workers) honours them.
PUBLIC_KEY_ENV = "BERTRT_PUBLIC_KEY"
MAX_WINDOWS_ENV = "BERTRT_MAX_WINDOWS"


def load(
    model_dir: str | Path,
    device: str = "auto",
    variant: str | None = None,
    threads: int = 0,
    tensorrt: bool = False,
    verify: bool = True,
    public_key: str | Path | None = None,
    max_windows: int | None = None,
) -> Predictor:
    """Open an exported model folder on `device` and return the predictor of its task.

    Args:
        device: "auto" (CUDA when a CUDA session really starts, else CPU), "cuda" or "cpu".
        variant: "fp32", "fp32-optimized", "fp16", "int8" or "int8-portable"; by default the
            shipped one built for the provider that runs a probe batch fastest at load
            (`engine.probe_s`).
        threads: intra-op threads on CPU; 0 lets ONNX Runtime decide.
        tensorrt: try TensorRT before CUDA where it loads.
        verify: check every file's sha256 against the manifest first.
        public_key: a PEM public key file (default: $BERTRT_PUBLIC_KEY): the folder's signature
            (bertrt.signing) is checked with it before anything in the folder is read, and an
            unsigned or changed folder is refused. Needs model-signing.
        max_windows: the most windows a text is read as (windows reading, or a stride); a
            longer text is refused with TextTooLong (default: $BERTRT_MAX_WINDOWS, else
            bertrt.long_text.MAX_WINDOWS).

    `model_dir` may also name a model bundled into this installation (`default`, `bundled`) or
    an MLflow registry URI (`models:/name@production`; needs mlflow).
    """
    if isinstance(model_dir, str):
        model_dir = resolve_model(model_dir)
    folder = Path(model_dir)
    key = public_key or os.environ.get(PUBLIC_KEY_ENV) or None
    if key:
        signing.verify(folder, key)
    limit = window_limit(max_windows)
    manifest = manifest_io.read(folder)  # the task, before any graph is opened
    predictor = REGISTRY.get(manifest.task)
    if predictor is None:
        raise manifest_io.IntegrityError(
            f"{folder / MANIFEST_FILE}: task {manifest.task!r} is not one this runtime serves "
            f"({list(TASKS)}); install a newer runtime"
        )
    engine = open_engine(
        folder, device, variant, threads, tensorrt, verify, manifest=manifest, max_windows=limit
    )
    if predictor.LABELLED:
        _check_labels(engine, predictor)
    return predictor(engine)


def window_limit(max_windows: int | None = None) -> int:
    """`max_windows`, else $BERTRT_MAX_WINDOWS, else MAX_WINDOWS; at least 1."""
    source = "max_windows"
    if max_windows is None:
        raw = os.environ.get(MAX_WINDOWS_ENV, "").strip()
        if not raw:
            return MAX_WINDOWS
        source = MAX_WINDOWS_ENV
        try:
            max_windows = int(raw)
        except ValueError:
            raise ValueError(f"{MAX_WINDOWS_ENV}={raw!r} is not a whole number") from None
    if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1:
        raise ValueError(f"{source} must be a whole number >= 1, got {max_windows!r}")
    return max_windows


def _check_labels(engine: Engine, predictor: type[Predictor]) -> None:
    """A labelled task's folder names labels, as many as its graph scores."""
    where = engine.folder / MANIFEST_FILE
    labels = engine.manifest.labels
    if not labels:
        raise manifest_io.IntegrityError(
            f"{where}: labels must not be empty for task {predictor.task!r}; re-run the export"
        )
    width = engine.session.get_outputs()[0].shape[-1]
    if isinstance(width, int) and width != len(labels):
        raise ModelFolderError(
            f"{engine.folder / engine.manifest.variants[engine.variant].file}: the graph scores "
            f"{width} labels, {MANIFEST_FILE} names {len(labels)}; re-export the model"
        )


def load_bundled(
    name: str | None = None,
    device: str = "auto",
    variant: str | None = None,
    threads: int = 0,
    tensorrt: bool = False,
    verify: bool = True,
    public_key: str | Path | None = None,
    max_windows: int | None = None,
) -> Predictor:
    """Open the model bundled into this installation; the options are those of `bertrt.load`."""
    return load(
        bundled_dir(name), device, variant, threads, tensorrt, verify, public_key, max_windows
    )
