"""Standalone ONNX Runtime inference for models exported by the pipeline.

Imports only onnxruntime, tokenizers and numpy (the server adds a small ASGI stack).
"""

from bertrt.bundle import load_bundled
from bertrt.predictor import Prediction, Predictor, TextClassifier, load
from bertrt.token_classifier import Entity, Tagging, TokenClassifier

__all__ = [
    "Entity",
    "Prediction",
    "Predictor",
    "Tagging",
    "TextClassifier",
    "TokenClassifier",
    "load",
    "load_bundled",
]
__version__ = "0.1.0"
