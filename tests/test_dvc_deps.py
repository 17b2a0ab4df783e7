"""Code tests for dvc.yaml's code deps: each stage lists exactly the project files its command
runs (pipeline.core.imports), so `dvc repro` re-runs a stage whenever its code changes."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.core import imports, layout, params

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def declared_files(deps: list, root: Path) -> set[Path]:
    """The project .py files a stage's deps cover (a folder covers every file below it)."""
    found = set()
    for dep in deps:
        path = next(iter(dep)) if isinstance(dep, dict) else dep
        if not path.startswith(imports.PROJECT_PACKAGES):
            continue
        if (root / path).is_dir():
            found |= {f.relative_to(root) for f in (root / path).rglob("*.py")}
        else:
            found.add(Path(path))
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_are_the_code_its_command_runs(stage: str) -> None:
    spec = STAGES[stage]
    module = imports.stage_module(spec["cmd"])
    runs = set(imports.source_files(module, ROOT))
    listed = declared_files(spec["deps"], ROOT)
    missing, extra = sorted(map(str, runs - listed)), sorted(map(str, listed - runs))
    fix = "run `make deps` to write them from the import graph"
    assert not missing, f"{stage}: dvc.yaml misses code it runs: {missing}; {fix}"
    assert not extra, f"{stage}: dvc.yaml lists code it never runs: {extra}; {fix}"


def test_the_code_digest_follows_every_imported_file(tmp_path: Path) -> None:
    for package in imports.PROJECT_PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package)
    module = "pipeline.stages.tokenize_data"
    before = imports.code_digest(module, tmp_path)
    assert Path("bertrt/long_text.py") in imports.source_files(module, tmp_path)
    with (tmp_path / "bertrt" / "long_text.py").open("a", encoding="utf-8") as f:
        f.write("# a comment changes the code fingerprint too\n")
    assert imports.code_digest(module, tmp_path) != before
    with (tmp_path / "bertrt" / "server.py").open("a", encoding="utf-8") as f:
        f.write("# tokenize never runs the server\n")
    assert Path("bertrt/server.py") not in imports.source_files(module, tmp_path)


def test_an_unknown_module_is_named() -> None:
    with pytest.raises(ValueError, match="pipeline.stages.nothing"):
        imports.source_files("pipeline.stages.nothing")


def test_every_stage_runs_a_module_of_pipeline_stages() -> None:
    modules = {name: imports.stage_module(spec["cmd"]) for name, spec in STAGES.items()}
    assert all(m.startswith("pipeline.stages.") for m in modules.values()), modules
    assert len(set(modules.values())) == len(modules), "one stage, one module"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_params_are_the_sections_it_reads(stage: str) -> None:
    module = importlib.import_module(imports.stage_module(STAGES[stage]["cmd"]))
    # "${base.task}" (params.TASK_SECTION) is the section of the task the stage runs.
    items = map(str, STAGES[stage].get("params", []))
    listed = {x if x == params.TASK_SECTION else x.split(".")[0] for x in items}
    assert listed == set(module.SECTIONS), (
        f"{stage}: dvc.yaml lists params {sorted(listed)}, {module.__name__} reads "
        f"{sorted(module.SECTIONS)}"
    )


def test_the_paths_code_reads_are_the_outputs_dvc_yaml_writes() -> None:
    outs = set()
    for spec in STAGES.values():
        for kind in ("outs", "metrics", "plots"):
            outs |= {next(iter(o)) if isinstance(o, dict) else o for o in spec.get(kind, [])}
    spelled = {str(path) for path in layout.OUTPUTS}
    assert spelled <= outs, f"pipeline.core.layout names {sorted(spelled - outs)}: not in dvc.yaml"
    # And each stage's command passes them where the stage writes them.
    commands = " ".join(spec["cmd"] for spec in STAGES.values())
    assert all(f" {path}" in commands for path in spelled), "a layout path no stage writes"


def test_the_committed_lock_was_written_by_the_code_and_params_here() -> None:
    """`dvc.lock` is what `make run` wrote for this checkout's code, params and commands, so a
    clone's `dvc repro` re-runs nothing that the lock claims is current. Data and models that a
    clone lacks are not checked (`dvc pull` or `make run` brings them)."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        found = repo.status()
    stale: list[str] = []
    for stage, changes in found.items():
        for change in changes:
            if change in ("changed command", "always changed"):
                stale.append(f"{stage}: {change}")
                continue
            if not isinstance(change, dict):
                continue
            for path, state in change.get("changed deps", {}).items():
                if isinstance(state, dict):  # params: {key: "modified" | "new" | "deleted"}
                    stale += [f"{stage}: {path} {key} {s}" for key, s in state.items()]
                elif path.startswith(imports.PROJECT_PACKAGES) and state == "modified":
                    stale.append(f"{stage}: {path} {state}")
    assert not stale, (
        "dvc.lock is stale for " + "; ".join(stale) + ": run `make run` (or `dvc repro`) and "
        "commit dvc.lock and reports/"
    )
