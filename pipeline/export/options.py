"""What an export is asked for (ExportOptions), what it needs of a task (ExportTask), and the
reference outputs every variant is gated against (Reference)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from bertrt.contract import INT8_VARIANTS, OPTIONAL_VARIANTS
from bertrt.long_text import Reading
from pipeline.core import params

# The task metric of runtime outputs (one row per window) on the export texts (their windows),
# for a variant's metric-drop gate.
Score = Callable[[list[list[Any]], np.ndarray], float]


class ExportTask(Protocol):
    """What the export needs of a task (`pipeline.tasks.get(name)` gives one)."""

    name: str

    def model_class(self) -> Any: ...

    def output_labels(self, config: Any) -> list[str]: ...


@dataclass(frozen=True)
class ExportOptions:
    """How the model folder is built and gated, and what it says about reading texts.

    Args:
        variants: optimised, fp16 and int8 graphs to add (bertrt.contract.OPTIONAL_VARIANTS);
            each ships only if its gate passes, and every gate result is recorded.
        min_agreement: a variant's predicted-label agreement with PyTorch, at least.
        max_metric_drop: how much the task metric may drop from PyTorch's, at most.
        int8_search_agreement: the int8 search keeps nodes in fp32 until its agreement with the
            fp32 graph on the calibration texts reaches this (0: no search, everything int8).
        int8_smooth_alpha: SmoothQuant's alpha before int8, from the calibration texts (0: off).
        int8_sensitivity_rows: the int8 search measures how far each node's int8 moves the
            outputs on a seeded sample (`seed`) of this many calibration windows (0: all); its
            agreement is always measured on all of them.
        window_stride: tokens shared by a long text's windows (per-token tasks; 0: cut).
        long_text: how a classifier reads long texts, as evaluated (None: truncate).
        temperature: divides a classifier's logits before the softmax (fitted on validation).
    """

    max_length: int
    opset: int = 17
    parity_atol: float = 1e-4
    batch_size: int = 32
    variants: tuple[str, ...] = ()
    min_agreement: float = 0.995
    max_metric_drop: float = 0.005
    int8_search_agreement: float = 0.0
    int8_smooth_alpha: float = 0.0
    int8_sensitivity_rows: int = 256
    seed: int = 0
    window_stride: int = 0
    long_text: Reading | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in OPTIONAL_VARIANTS]
        if unknown:
            raise ValueError(
                f"unknown variant(s) {unknown}; choose from {list(OPTIONAL_VARIANTS)}"
            )

    @classmethod
    def from_params(
        cls, export: params.Export, max_length: int, seed: int = 0, **reading: Any
    ) -> ExportOptions:
        """params.yaml's export section (and base.seed); `reading` sets window_stride,
        long_text, temperature."""
        return cls(
            max_length=max_length,
            seed=seed,
            opset=export.opset,
            parity_atol=export.parity_atol,
            batch_size=export.batch_size,
            variants=tuple(export.variants),
            min_agreement=export.min_agreement,
            max_metric_drop=export.max_metric_drop,
            int8_search_agreement=export.int8_search_agreement,
            int8_smooth_alpha=export.int8_smooth_alpha,
            int8_sensitivity_rows=export.int8_sensitivity_rows,
            **reading,
        )

    def calibrates_int8(self) -> bool:
        """Whether int8 is asked for with a search or smoothing that reads calibration texts."""
        return any(v in self.variants for v in INT8_VARIANTS) and (
            self.int8_search_agreement > 0 or self.int8_smooth_alpha > 0
        )


@dataclass
class Reference:
    """The export texts' windows and PyTorch's outputs on them: what each variant must match.

    Args:
        outputs: PyTorch's outputs as the runtime's `Engine.infer` shapes them.
        mask: the valid positions of per-token outputs.
        score: the task metric of a variant's outputs (None: agreement alone gates).
    """

    encodings: list[Any]
    outputs: np.ndarray
    mask: np.ndarray
    score: Callable[[np.ndarray], float] | None = None
