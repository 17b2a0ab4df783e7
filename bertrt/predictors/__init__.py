"""One predictor per task; the registry maps a manifest's task to its class."""

from __future__ import annotations

from bertrt.contract import FILL_MASK, TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION
from bertrt.predictors.base import Doc, EngineBacked, Option, Predictor, Result, softmax
from bertrt.predictors.fill_mask import FillMask
from bertrt.predictors.text_classification import Prediction, TextClassifier
from bertrt.predictors.token_classification import Entity, Tagging, TokenClassifier

REGISTRY: dict[str, type[Predictor]] = {
    TEXT_CLASSIFICATION: TextClassifier,
    TOKEN_CLASSIFICATION: TokenClassifier,
    FILL_MASK: FillMask,
}

__all__ = [
    "REGISTRY",
    "Doc",
    "EngineBacked",
    "Entity",
    "FillMask",
    "Option",
    "Prediction",
    "Predictor",
    "Result",
    "Tagging",
    "TextClassifier",
    "TokenClassifier",
    "softmax",
]
