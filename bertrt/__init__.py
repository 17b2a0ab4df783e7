"""Standalone ONNX Runtime inference for models exported by the pipeline.

Imports only onnxruntime, tokenizers and numpy (the server adds a small ASGI stack).
"""

from bertrt.api import load, load_bundled
from bertrt.predictors import (
    Entity,
    FillMask,
    Prediction,
    Predictor,
    Tagging,
    TextClassifier,
    TokenClassifier,
)

__all__ = [
    "Entity",
    "FillMask",
    "Prediction",
    "Predictor",
    "Tagging",
    "TextClassifier",
    "TokenClassifier",
    "load",
    "load_bundled",
]
__version__ = "0.1.0"
