"""Another graph file of the model folder behind an engine already open on it: the folder's
manifest, tokenizer and batching are read once, and each graph gets one session of its own."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bertrt.engine import Engine
from bertrt.session import start_session
from pipeline.export import quiet


def engine_on(base: Engine, graph: Path, variant: str, device: str = "cpu") -> Engine:
    """`base` with a session on `graph` started on `device` ("cpu" or "cuda": DeviceError
    where no CUDA session starts, GraphError where the graph does not load)."""
    profile = (base.manifest.inputs, base.manifest.max_length)
    with quiet.loggers("bertrt.session"):  # one INFO line per candidate graph otherwise
        session, provider = start_session(graph, device, profile=profile)
    return dataclasses.replace(base, variant=variant, session=session, provider=provider)
