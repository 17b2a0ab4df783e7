"""`bertrt.load`: a model folder, bundled name or registry URI into its task's predictor."""

from __future__ import annotations

from pathlib import Path

import bertrt.manifest as manifest_io
from bertrt.contract import MANIFEST_FILE
from bertrt.engine import Engine, ModelFolderError, open_engine
from bertrt.locate import bundled_dir, resolve_model
from bertrt.predictors import REGISTRY, TASKS, Predictor


def load(
    model_dir: str | Path,
    device: str = "auto",
    variant: str | None = None,
    threads: int = 0,
    tensorrt: bool = False,
    verify: bool = True,
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

    `model_dir` may also name a model bundled into this installation (`default`, `bundled`) or
    an MLflow registry URI (`models:/name@production`; needs mlflow).
    """
    if isinstance(model_dir, str):
        model_dir = resolve_model(model_dir)
    where = Path(model_dir) / MANIFEST_FILE
    task = manifest_io.read(Path(model_dir)).task  # before any graph is opened
    predictor = REGISTRY.get(task)
    if predictor is None:
        raise manifest_io.IntegrityError(
            f"{where}: task {task!r} is not one this runtime serves ({list(TASKS)}); "
            "install a newer runtime"
        )
    engine = open_engine(model_dir, device, variant, threads, tensorrt, verify)
    if predictor.LABELLED:
        _check_labels(engine, predictor)
    return predictor(engine)


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
) -> Predictor:
    """Open the model bundled into this installation; the options are those of `bertrt.load`."""
    return load(bundled_dir(name), device, variant, threads, tensorrt, verify)
