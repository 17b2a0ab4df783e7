"""Every writing stage on a disk that is full or read-only: one clear line naming the folder,
and the outputs of the previous good run untouched and loadable.

The stages write into a small tmpfs mounted by the test (root with CAP_SYS_ADMIN, as in CI);
the disk is filled by a file that takes every free byte, or remounted read-only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from conftest import synthetic_reviews, write_params

from pipeline.core import lineage
from pipeline.stages import (
    evaluate_model,
    export_onnx,
    finetune,
    ingest,
    tokenize_data,
    validate,
)

pytestmark = pytest.mark.slow


def _mount(folder: Path) -> str | None:
    """None once a 256 MiB tmpfs is mounted at `folder`; else why it cannot be."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return "mounting a tmpfs needs root and mount(8)"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    return None if done.returncode == 0 else f"cannot mount a tmpfs here: {done.stderr.strip()}"


def _argv(**options: object) -> list[str]:
    """`--name value` pairs (underscores as dashes)."""
    return [
        x for key, value in options.items() for x in (f"--{key.replace('_', '-')}", str(value))
    ]


def stages(m: Path, params: Path) -> dict[str, tuple[Callable, list[str], list[Path]]]:
    """Per stage: its main, its argv, and its outputs (all on the mount `m`)."""
    test = m / "validated" / "test.parquet"
    return {
        "ingest": (
            ingest.main,
            _argv(params=params, out=m / "raw", report=m / "i.json"),
            [m / "raw", m / "i.json"],
        ),
        "validate": (
            validate.main,
            _argv(raw=m / "raw", params=params, out=m / "validated", report=m / "v.json",
                  failures=m / "failures.json"),
            [m / "validated", m / "v.json"],
        ),
        "tokenize": (
            tokenize_data.main,
            _argv(validated=m / "validated", params=params, out=m / "tokenized",
                  report=m / "t.json"),
            [m / "tokenized", m / "t.json"],
        ),
        "finetune": (
            finetune.main,
            _argv(tokenized=m / "tokenized", validated=m / "validated", params=params,
                  out=m / "ft", checkpoints=m / "ckpt", report=m / "train.json",
                  curves=m / "curves"),
            [m / "ft", m / "train.json", m / "curves"],
        ),
        "evaluate": (
            evaluate_model.main,
            _argv(model=m / "ft", tokenized=m / "tokenized", test=test, params=params,
                  metrics=m / "eval.json", plots=m / "plots", headline=m / "metrics.json"),
            [m / "eval.json", m / "plots", m / "metrics.json"],
        ),
        "export": (
            export_onnx.main,
            _argv(model=m / "ft", test=test, eval_report=m / "eval.json", params=params,
                  out=m / "onnx", report=m / "export.json"),
            [m / "onnx", m / "export.json"],
        ),
    }  # fmt: skip


@pytest.fixture(scope="module")
def pipeline_on_a_mount(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[dict]:
    """The tiny pipeline run once onto a tmpfs; the digests of every output."""
    root = tmp_path_factory.mktemp("disk")
    mount = root / "mount"
    mount.mkdir()
    why = _mount(mount)
    if why:
        pytest.skip(why)
    try:
        src = root / "reviews.csv"
        pd.DataFrame(synthetic_reviews(160, seed=5)).to_csv(src, index=False)
        params = write_params(
            root,
            {
                "base.model": str(tiny_model_dir),
                "base.max_length": 32,
                "ingest.source": str(src),
                "finetune.epochs": 1,
                "finetune.batch_size": 16,
                "finetune.learning_rate": 1e-3,
                "finetune.warmup_steps": 0,
                "export.variants": ["fp32-optimized"],
                "export.min_agreement": 0.5,
                "export.max_metric_drop": 0.5,
                "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",  # not on the mount
            },
        )
        table = stages(mount, params)
        for name, (main, argv, _) in table.items():
            assert main(argv) == 0, f"the good run failed at {name}"
        digests = {
            str(out): lineage.file_digest(out) for _, _, outs in table.values() for out in outs
        }
        yield {"mount": mount, "stages": table, "digests": digests}
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path) -> Path:
    """A file that takes every byte the mount has left."""
    filler = mount / "filler"
    with filler.open("wb", buffering=0) as handle:
        for size in (2**20, 2**12, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError:
                continue
    return filler


@pytest.mark.parametrize("fault", ["full", "read-only"])
@pytest.mark.parametrize(
    "stage", ["ingest", "validate", "tokenize", "finetune", "evaluate", "export"]
)
def test_a_stage_on_a_full_or_read_only_disk_names_it_and_keeps_the_previous_outputs(
    pipeline_on_a_mount: dict, stage: str, fault: str, capsys: pytest.CaptureFixture
) -> None:
    import bertrt

    mount = pipeline_on_a_mount["mount"]
    main, argv, outs = pipeline_on_a_mount["stages"][stage]
    capsys.readouterr()
    if fault == "full":
        filler = _fill(mount)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    try:
        code = main(argv)
    finally:
        if fault == "full":
            filler.unlink()
        else:
            subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
    err = capsys.readouterr().err
    assert code == 1, err[-2000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "error: cannot write the outputs:" in line and str(mount) in line
    assert ("read-only file system" if fault == "read-only" else "is full") in line
    assert "Traceback" not in err
    for out in outs:
        assert lineage.file_digest(out) == pipeline_on_a_mount["digests"][str(out)], out
    assert not [p.name for p in mount.iterdir() if p.name.endswith(".tmp")], "no half-writes"
    if stage == "export":
        (prediction,) = bertrt.load(mount / "onnx", device="cpu").predict(["a fine film"])
        assert prediction.label in ("fresh", "rotten")
