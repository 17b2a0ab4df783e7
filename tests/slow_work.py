"""What `slow` means, enforced: a test that runs a pipeline stage as a process, `dvc repro`, an
experiment, a release or `torchrun`, trains a model, or builds a virtual environment or a wheel
must be marked `@pytest.mark.slow`. While an unmarked test runs (its setup included, so module
and session fixtures count), such work fails it with the fix, so `make test-fast` stays the quick
suite a developer runs while working. A stage's `run` called in process on tiny data (ingest,
validate, tokenize, evaluate, export) is a unit test; the fine-tune's trains, and is caught there.

Watched: processes (Python's `subprocess.Popen` audit event, so every way of starting one) and
`transformers.Trainer.train` (wrapped when transformers loads it)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Generator, Sequence
from types import ModuleType
from typing import Any

import pytest

# Words in a command line that mean slow work.
SLOW_COMMANDS = (
    "pipeline.stages.",
    "pipeline.ops.release",
    "pipeline.ops.experiment",
    "pipeline.ops.sweep",
    "pipeline.ops.reproduce",
    "dvc repro",
    "dvc exp run",
    "-m venv",
    "pip install",
    "pip wheel",
    "-m build",
    "torchrun",
    "torch.distributed.run",
)

_running: str | None = None  # the node id of the unmarked test running now


def refuse(what: str) -> None:
    """Fail the running unmarked test (pytest's failure is no Exception, so the stages' own
    error handling passes it through)."""
    if _running is not None:
        pytest.fail(
            f"{_running} {what}: mark it @pytest.mark.slow (see tests/slow_work.py), or give "
            "it a lighter fixture",
            pytrace=False,
        )


def _command(args: Any) -> str:
    words = args if isinstance(args, Sequence) and not isinstance(args, str | bytes) else [args]
    return " ".join(str(w) for w in words)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "subprocess.Popen" and _running is not None:
        command = _command(args[1])
        if any(word in command for word in SLOW_COMMANDS):
            refuse(f"starts {command[:160]!r}")


def _guarded(function: Callable[..., Any], what: str) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        refuse(what)
        return function(*args, **kwargs)

    guarded.__wrapped__ = function  # type: ignore[attr-defined]
    return guarded


class _TrainerWatch(importlib.abc.MetaPathFinder):
    """Wraps `Trainer.train` as soon as transformers loads `transformers.trainer`."""

    NAME = "transformers.trainer"

    def find_spec(self, name: str, path: Any, target: ModuleType | None = None) -> Any:
        if name != self.NAME:
            return None
        sys.meta_path.remove(self)  # find the real spec, then watch no more
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader, run = spec.loader, spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            module.Trainer.train = _guarded(module.Trainer.train, "trains a model")

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def pytest_configure(config: pytest.Config) -> None:
    sys.addaudithook(_audit)
    if "transformers.trainer" in sys.modules:
        trainer = sys.modules["transformers.trainer"].Trainer
        trainer.train = _guarded(trainer.train, "trains a model")
    else:
        sys.meta_path.insert(0, _TrainerWatch())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _watching(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _watching(item))


def _watching(item: pytest.Item) -> Generator[None, None, None]:
    global _running
    _running = None if item.get_closest_marker("slow") else item.nodeid
    try:
        return (yield)
    finally:
        _running = None
