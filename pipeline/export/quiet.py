"""Third-party chatter silenced where it is raised, so that the export's own lines stand out:
each filter names the message (or logger) it drops and holds only while the call runs."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# ONNX Runtime's quantizer warns on the root logger, once per call (dozens of times in an int8
# search), that the graph was not pre-processed: ours comes from ORT's transformer optimizer.
PRE_PROCESSING_HINT = "Please consider to run pre-processing before quantization"

# torch.onnx's tracer on BERT: transformers' attention mask turns a shape into a Python bool
# (fixed for the traced batch shape, which the dynamic axes and the parity check cover), and
# opset 17 spells advanced indexing with several operators.
EXPORT_WARNINGS = (
    (r"Converting a tensor to a Python boolean might cause the trace", "TracerWarning"),
    (r"Exporting aten::index operator of advanced indexing", "UserWarning"),
)


class _Drop(logging.Filter):
    """Drops records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextmanager
def quantizer() -> Iterator[None]:
    """While ORT's quantizer runs: its per-tensor INFO lines (logged on the root logger, so the
    root's level is raised) and its pre-processing hint are dropped; other warnings pass."""
    root = logging.getLogger()
    level, drop = root.level, _Drop(PRE_PROCESSING_HINT)
    root.setLevel(max(level, logging.WARNING))
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        root.setLevel(level)


@contextmanager
def optimizer() -> Iterator[None]:
    """While ORT's transformer optimizer runs: its INFO line per fusion and save (its modules
    log under their bare names, fusion_base, onnx_model, ..., which reach the root's handler);
    its warnings pass."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


@contextmanager
def onnx_export() -> Iterator[None]:
    """While torch.onnx traces the model: the two known tracer warnings (EXPORT_WARNINGS)."""
    import torch.jit

    categories = {"TracerWarning": torch.jit.TracerWarning, "UserWarning": UserWarning}
    with warnings.catch_warnings():
        for message, category in EXPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=categories[category])
        yield


@contextmanager
def loggers(*names: str) -> Iterator[None]:
    """Our own per-graph INFO lines (a session started, a variant loaded) held back while many
    candidate graphs are opened; warnings pass."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, level in saved:
        logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)
