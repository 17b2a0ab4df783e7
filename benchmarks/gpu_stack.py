"""The software the GPU machine has, as the GPU check assumes it: its stack by import name, the
distributions those are with everything they require, a mirror of exactly those for rehearsing
the check elsewhere, and an audit of where the modules a process imported came from.

Standard library only at import time: the check's orchestrator runs on the machine's system
Python before anything is installed.
"""

from __future__ import annotations

import inspect
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# Installed on the GPU machine (its system Python), by import name.
STACK = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "numpy",
    "pandas",
    "pyarrow",
    "yaml",
    "sklearn",
    "pytest",
    "accelerate",
)
# Carried there as wheels: the gpu-marked tests' fixtures export their tiny model through
# pipeline.tasks, which validates data with pandera.
CARRIED = ("pandera",)
REPO = Path(__file__).resolve().parents[1]
# The project's own code, which travels with the repository.
PROJECT = tuple(REPO / name for name in ("benchmarks", "bertrt", "pipeline", "tests"))


def canonical(name: str) -> str:
    """A distribution name as the registry compares them (PEP 503)."""
    return "-".join(name.replace("_", "-").replace(".", "-").lower().split("-"))


def _requirements(dist: metadata.Distribution) -> list[tuple[str, str]]:
    """(name, specifier) of what `dist` requires without extras, on this platform."""
    from packaging.requirements import Requirement  # in the stack: transformers needs it

    found = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        found.append((canonical(req.name), str(req.specifier)))
    return found


def installed(path: list[str]) -> dict[str, metadata.Distribution]:
    """The distributions on `path` by canonical name; the first of a name wins, as in imports."""
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions(path=path):
        found.setdefault(canonical(dist.metadata["Name"]), dist)
    return found


def provides(dist: metadata.Distribution) -> set[str]:
    """The top-level import names of a distribution (as importlib.metadata infers them)."""
    listed = dist.read_text("top_level.txt")
    if listed:
        return set(listed.split())
    names = {
        f.parts[0] if len(f.parts) > 1 else inspect.getmodulename(f.name) or ""
        for f in dist.files or []
    }
    return {n for n in names if n and "." not in n}


def closure(
    import_names: tuple[str, ...], path: list[str] | None = None
) -> tuple[dict[str, metadata.Distribution], list[str]]:
    """The distributions on `path` (sys.path by default) that provide `import_names`, with all
    they require, by canonical name; and the import names or requirements not found there."""
    dists = installed(sys.path if path is None else path)
    providers: dict[str, list[str]] = {}
    for name, dist in dists.items():
        for top in provides(dist):
            providers.setdefault(top, []).append(name)
    todo = [d for name in import_names for d in providers.get(name, [])]
    missing = [name for name in import_names if name not in providers]
    found: dict[str, metadata.Distribution] = {}
    while todo:
        name = canonical(todo.pop())
        if name in found:
            continue
        if name not in dists:
            missing.append(name)
            continue
        found[name] = dists[name]
        todo += [req for req, _ in _requirements(found[name])]
    return found, sorted(set(missing))


def carried_specifiers() -> dict[str, str]:
    """Each distribution the CARRIED packages need, with what they require of its version ("" for
    none): the check installs a carried wheel where the machine's version does not satisfy it."""
    dists, _ = closure(CARRIED)
    wanted = {name: set() for name in dists}
    for dist in dists.values():
        for name, spec in _requirements(dist):
            if name in wanted and spec:
                wanted[name].add(spec)
    return {name: ",".join(sorted(specs)) for name, specs in sorted(wanted.items())}


def top_level(dist: metadata.Distribution) -> list[Path]:
    """The site-packages entries a distribution installed (packages, modules, its dist-info)."""
    entries = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}
    entries = {e for e in entries if e != "__pycache__" and not e.endswith(".pth")}
    return [Path(str(dist.locate_file(e))) for e in sorted(entries)]


def mirror(dists: dict[str, metadata.Distribution], folder: Path) -> Path:
    """A folder of links to exactly these distributions' entries: on sys.path in place of
    site-packages, a process sees what the GPU machine has and nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    for dist in dists.values():
        for entry in top_level(dist):
            link = folder / entry.name
            if entry.exists() and not link.exists():
                link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return folder


def allowed_locations(
    dists: dict[str, metadata.Distribution], extra: list[Path]
) -> dict[str, list[str]]:
    """Where an allowed module may live: the standard library, or `extra` (the project's
    packages, the carried wheels' folder) and the entries of these distributions."""
    packages = {str(p) for p in extra} | {str(e) for d in dists.values() for e in top_level(d)}
    return {
        "stdlib": [os.path.realpath(os.path.dirname(os.__file__))],
        "packages": sorted(os.path.realpath(p) for p in packages),
    }


def _under(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root + os.sep) for root in roots)


def imported() -> dict[str, str | None]:
    """Each top-level module this process imported, with the file or folder it came from."""
    found: dict[str, str | None] = {}
    for name, module in list(sys.modules.items()):
        if "." in name or module is None:
            continue
        where: Any = getattr(module, "__file__", None) or next(
            iter(getattr(module, "__path__", []) or []), None
        )
        found[name] = os.path.realpath(where) if isinstance(where, str) else None
    return found


def outside(modules: dict[str, str | None], allowed: dict[str, list[str]]) -> dict[str, str]:
    """The modules whose file lies in none of the `allowed` locations. Built-in ones, with no
    file, are the interpreter's own; the standard library's folder may hold site-packages
    (a venv's or pyenv's Python), which counts as installed, not as the standard library."""

    def fine(where: str) -> bool:
        installed = {"site-packages", "dist-packages"} & set(Path(where).parts)
        return _under(where, allowed["packages"]) or (
            not installed and _under(where, allowed["stdlib"])
        )

    return {
        name: where
        for name, where in sorted(modules.items())
        if where is not None and not fine(where)
    }
