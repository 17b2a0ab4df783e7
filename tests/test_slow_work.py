"""The `slow` marker is enforced: slow work in an unmarked test fails it, naming the marker."""

from __future__ import annotations

import subprocess
import sys

import pytest
import slow_work


def test_a_stage_process_in_an_unmarked_test_fails_it_naming_the_marker() -> None:
    command = [sys.executable, "-m", "pipeline.stages.ingest", "--help"]
    with pytest.raises(pytest.fail.Exception, match=r"mark it @pytest\.mark\.slow"):
        subprocess.run(command, capture_output=True, check=False)
    with pytest.raises(pytest.fail.Exception, match="dvc repro"):
        subprocess.run(["dvc", "repro", "--dry"], capture_output=True, check=False)
    quick = subprocess.run([sys.executable, "-c", "print(2)"], capture_output=True, text=True)
    assert quick.stdout == "2\n", "other processes run as usual"


@pytest.mark.slow
def test_a_marked_test_may_start_a_stage_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.ingest", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--params" in done.stdout


def test_training_in_an_unmarked_test_fails_it() -> None:
    calls = []
    train = slow_work._guarded(lambda: calls.append(1), "trains a model")
    with pytest.raises(pytest.fail.Exception, match="trains a model: mark it"):
        train()
    assert calls == []
    trainer = sys.modules.get("transformers.trainer")
    if trainer is None:  # wrapped when transformers loads it
        assert any(isinstance(f, slow_work._TrainerWatch) for f in sys.meta_path)
    else:
        assert hasattr(trainer.Trainer.train, "__wrapped__")
