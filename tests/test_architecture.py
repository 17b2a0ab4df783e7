"""Code tests for the shape of the code: the import-linter contracts of pyproject.toml hold, and
the modules that the layers name are where the tree says."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_contracts_hold() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("pipeline/core/tables.py", "from pipeline.stages import ingest", "arrows point down"),
        ("pipeline/tasks/base.py", "from pipeline.export import model_card", "arrows point down"),
        ("bertrt/long_text.py", "import torch", "stands alone"),
        ("pipeline/core/precision.py", "from pipeline.core import params", "no import cycles"),
    ],
)
def test_a_wrong_import_breaks_a_contract(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    for item in ("pipeline", "bertrt", "pyproject.toml"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, tmp_path / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (tmp_path / item).write_bytes(src.read_bytes())
    target = tmp_path / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{line}  # noqa\n", "utf-8")
    done = lint_imports(tmp_path, {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1, done.stdout[-2000:]
    assert broken in done.stdout.replace("\n", " ")
