"""`bertrt.load`: a model folder, bundled name or registry URI into its task's predictor."""

from __future__ import annotations

from pathlib import Path

from bertrt.engine import ModelFolderError, open_engine
from bertrt.locate import bundled_dir, resolve_model
from bertrt.predictors import REGISTRY, Predictor


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
    engine = open_engine(model_dir, device, variant, threads, tensorrt, verify)
    predictor = REGISTRY.get(engine.manifest.task)
    if predictor is None:
        raise ModelFolderError(f"{model_dir}: task {engine.manifest.task!r} has no predictor")
    return predictor(engine)


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
