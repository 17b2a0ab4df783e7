"""Standalone ONNX Runtime inference for models exported by the pipeline.

Imports only onnxruntime, tokenizers and numpy (the server adds a small ASGI stack).
"""

from bertrt.bundle import load_bundled
from bertrt.predictor import Prediction, TextClassifier, load

__all__ = ["Prediction", "TextClassifier", "load", "load_bundled"]
__version__ = "0.1.0"
