"""Write each `dvc.yaml` stage's code deps from the import graph (`make deps`).

    python -m pipeline.ops.code_deps            # rewrite dvc.yaml's code deps in place
    python -m pipeline.ops.code_deps --check    # exit 1, naming the stages, where they differ

A stage's code deps are the project files its `python -m MODULE` runs
(`pipeline.core.imports.source_files`); a folder stands for them when every .py file in it is
one. Data deps, comments and the order of everything else are kept.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import grimp
import yaml

from pipeline.core import imports

log = logging.getLogger(__name__)


def collapse(files: set[Path], root: Path) -> list[str]:
    """`files` as paths, a folder in place of its files where every .py file below it is one."""
    out: list[str] = []
    covered: set[Path] = set()
    for path in sorted(files, key=lambda p: (len(p.parts), p)):
        if path in covered:
            continue
        # The highest folder (below the package root's parent) wholly made of listed files.
        for depth in range(1, len(path.parts)):
            folder = Path(*path.parts[:depth])
            inside = {f.relative_to(root) for f in (root / folder).rglob("*.py")}
            if inside <= files:
                covered |= inside
                out.append(folder.as_posix())
                break
        else:
            covered.add(path)
            out.append(path.as_posix())
    return sorted(out)


def is_code(dep: object) -> bool:
    return isinstance(dep, str) and dep.split("/")[0] in imports.PROJECT_PACKAGES


def code_deps(cmd: str, root: Path, graph: grimp.ImportGraph | None = None) -> list[str]:
    """The collapsed code deps of a stage command."""
    return collapse(set(imports.source_files(imports.stage_module(cmd), root, graph)), root)


def run(dvc_yaml: Path, check: bool) -> list[str]:
    """Rewrite (or with `check`, only compare) the code deps; return the stages that differ.
    The file is edited as text, so its comments and layout stay as they are."""
    root = dvc_yaml.resolve().parent
    text = dvc_yaml.read_text(encoding="utf-8")
    stages = yaml.safe_load(text)["stages"]
    lines = text.splitlines(keepends=True)
    graph = grimp.build_graph(*imports.PROJECT_PACKAGES, cache_dir=None)
    out: list[str] = []
    stale: list[str] = []
    stage = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        if stage not in stages or line.rstrip() != "    deps:":
            continue
        block = []
        while i < len(lines) and (lines[i].startswith("      ") or not lines[i].strip()):
            block.append(lines[i])
            i += 1
        listed = [b.strip()[2:] for b in block if b.strip().startswith("- ")]
        wanted = code_deps(stages[stage]["cmd"], root, graph)
        if [d for d in listed if is_code(d)] != wanted:
            stale.append(stage)
        out += [f"      - {dep}\n" for dep in wanted]
        out += [b for b in block if not (b.strip().startswith("- ") and is_code(b.strip()[2:]))]
    if stale and not check:
        tmp = dvc_yaml.with_name(dvc_yaml.name + ".tmp")
        tmp.write_text("".join(out), encoding="utf-8")
        tmp.replace(dvc_yaml)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"))
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a diff")
    args = parser.parse_args(argv)
    stale = run(args.dvc_yaml, args.check)
    verb = "differ from the import graph" if args.check else "rewritten"
    print(
        f"{args.dvc_yaml}: code deps {verb}: {', '.join(stale)}"
        if stale
        else f"{args.dvc_yaml}: code deps match the import graph"
    )
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
