"""The project source files a module runs: itself, its packages' `__init__` files and every
`pipeline` or `bertrt` module they import, directly or not, read from the import graph (grimp
parses the files; nothing is imported). `dvc.yaml`'s code deps are checked against this set and
the tokenize stage fingerprints it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grimp

PROJECT_PACKAGES = ("pipeline", "bertrt")


def project_root() -> Path:
    """The folder that holds the project's packages (the repository root)."""
    return Path(__file__).resolve().parents[2]


def imported_modules(module: str, graph: grimp.ImportGraph | None = None) -> set[str]:
    """`module` and every project module that importing it executes."""
    graph = graph or grimp.build_graph(*PROJECT_PACKAGES, cache_dir=None)
    if not graph.find_matching_modules(module):
        raise ValueError(f"{module}: not a module of {list(PROJECT_PACKAGES)}")
    found: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += graph.find_modules_directly_imported_by(name)
    return found


def module_file(module: str, root: Path) -> Path:
    """The file a project module is read from, relative to `root`."""
    path = Path(*module.split("."))
    package = path / "__init__.py"
    return package if (root / package).is_file() else path.with_suffix(".py")


def source_files(
    module: str, root: Path | None = None, graph: grimp.ImportGraph | None = None
) -> list[Path]:
    """The project files (relative to `root`) that running `python -m module` executes."""
    root = root or project_root()
    return sorted(module_file(name, root) for name in imported_modules(module, graph))


def code_digest(module: str, root: Path | None = None) -> str:
    """sha256 over the names and bytes of `source_files(module)`."""
    root = root or project_root()
    digest = hashlib.sha256()
    for path in source_files(module, root):
        digest.update(path.as_posix().encode() + b"\0" + (root / path).read_bytes() + b"\0")
    return digest.hexdigest()


def stage_module(cmd: str) -> str:
    """The module a `dvc.yaml` command runs (`python -m MODULE ...`)."""
    words = cmd.split()
    if words[:2] != ["python", "-m"] or len(words) < 3:
        raise ValueError(f"{cmd!r}: a stage command is `python -m MODULE ...`")
    return words[2]
