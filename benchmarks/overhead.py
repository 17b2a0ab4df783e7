"""The pipeline's own overhead: the tokenize stage against the tokenizer's batched ceiling, a
no-op `dvc repro` against DVC alone, and the import time of each stage module, alone and with
every library its code may import when it runs.

    python -m benchmarks.overhead --validated data/validated --params params.yaml \
        --out docs/benchmarks.md --json reports/bench_overhead.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks import measure, report
from pipeline.core import layout

HEADING = "Pipeline overhead (CPU)"
STAGES = (
    "pipeline.stages.ingest",
    "pipeline.stages.validate",
    "pipeline.stages.tokenize_data",
    "pipeline.stages.finetune",
    "pipeline.stages.evaluate_model",
    "pipeline.stages.export_onnx",
)
REPEATS = 5  # each timing is the median of this many runs


# A module whose import alone takes seconds and that only the fine-tune needs.
TRAINER = "transformers.trainer"


def run_imports(module: str) -> list[str]:
    """The import statements of libraries (not `pipeline` or `bertrt`) anywhere in the project
    files `python -m module` runs, those inside functions included: what running the stage may
    import, at most (other tasks' libraries too)."""
    import ast

    from pipeline.core import imports

    root = imports.project_root()
    found: set[str] = set()
    for path in imports.source_files(module, root):
        for node in ast.walk(ast.parse((root / path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [(alias.name, f"import {alias.name}") for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [
                    (node.module, f"from {node.module} import {alias.name}")
                    for alias in node.names
                ]
            else:
                continue
            top = {name.split(".")[0] for name, _ in names}
            if not top & {*imports.PROJECT_PACKAGES, "__future__"}:
                found |= {statement for _, statement in names}
    return sorted(found)


def _run_import_script(module: str) -> str:
    """Python that imports `module` and then what it may run (an optional library that is not
    installed is skipped), and prints whether the Trainer was imported."""
    lines = [f"import {module}"]
    for statement in run_imports(module):
        lines += ["try:", f"    {statement}", "except ImportError:", "    pass"]
    lines += ["import sys", f"print({TRAINER!r} in sys.modules)"]
    return "\n".join(lines)


def import_times(python: str, bare: float) -> dict[str, dict[str, Any]]:
    """Per stage module: its import alone and with its libraries (a Python start subtracted),
    and whether the second imports transformers' Trainer."""
    out: dict[str, dict[str, Any]] = {}
    for module in STAGES:
        script = _run_import_script(module)
        check = subprocess.run([python, "-c", script], check=True, capture_output=True, text=True)
        out[module] = {
            "module_s": round(_median_s([python, "-c", f"import {module}"]) - bare, 3),
            "with_libraries_s": round(_median_s([python, "-c", script]) - bare, 3),
            "imports_trainer": check.stdout.strip().splitlines()[-1] == "True",
        }
    return out


def _median_s(cmd: list[str]) -> float:
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def tokenize_rates(validated: Path, params_path: Path) -> dict[str, Any]:
    """Texts/s of the tokenize stage end to end (Parquet in, dataset and report out), of the
    same tokenizer over all texts in batches of 1,000 (the ceiling: the transformers call, and
    its Rust backend's `encode_batch` alone) and one text at a time."""
    from transformers import AutoTokenizer

    from pipeline.core import params
    from pipeline.core.sources import resolve_model
    from pipeline.stages import tokenize_data
    from pipeline.tasks.columns import plain_encoding

    p = params.load(params_path, "base")
    texts = [
        t for split in layout.SPLITS
        for t in pd.read_parquet(layout.split_file(validated, split))["text"].astype(str)
    ]  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(p.base.model))

    def batched_s(encode: Any) -> float:
        runs = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            for i in range(0, len(texts), 1000):
                encode(texts[i : i + 1000])
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    batched = len(texts) / batched_s(tokenizer)
    with plain_encoding(tokenizer) as backend:
        rust = len(texts) / batched_s(backend.encode_batch)
    sample = texts[:2000]
    start = time.perf_counter()
    for text in sample:
        tokenizer(text)
    single = len(sample) / (time.perf_counter() - start)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(REPEATS):
            start = time.perf_counter()
            out, report_path = Path(tmp) / f"t{i}", Path(tmp) / "t.json"
            tokenize_data.run(validated, params.load(params_path), out, report_path)
            runs.append(time.perf_counter() - start)
    # The first run also imports datasets and pyarrow's Parquet reader (see the import table).
    stage = len(texts) / statistics.median(runs)
    return {
        "texts": len(texts),
        "stage_first_run_texts_per_s": len(texts) / runs[0],
        "stage_texts_per_s": stage,
        "batched_texts_per_s": batched,
        "rust_batched_texts_per_s": rust,
        "one_at_a_time_texts_per_s": single,
        "stage_vs_batched": stage / batched,
        "stage_vs_rust": stage / rust,
    }


def run(validated: Path, params_path: Path) -> dict[str, Any]:
    python = sys.executable
    dvc = str(Path(python).parent / "dvc")
    if subprocess.run([dvc, "status", "--quiet"], capture_output=True).returncode != 0:
        raise SystemExit("the pipeline is not up to date: run `make run` first (a no-op repro)")
    imports = import_times(python, _median_s([python, "-c", "pass"]))
    return {
        "tokenize": tokenize_rates(validated, params_path),
        "noop_repro_s": _median_s([dvc, "repro"]),
        "dvc_alone_s": _median_s([dvc, "version"]),
        "import_s": {module: times["module_s"] for module, times in imports.items()},
        "import_with_libraries_s": {m: t["with_libraries_s"] for m, t in imports.items()},
        "imports_trainer": {m: t["imports_trainer"] for m, t in imports.items()},
    }


def markdown(data: dict[str, Any]) -> str:
    command, machine, tok = data["command"], data["machine"], data["tokenize"]
    rows = [
        {
            "module": m,
            "import s": s,
            "with libraries s": data.get("import_with_libraries_s", {}).get(m),
            "Trainer": {True: "yes", False: "no"}.get(data.get("imports_trainer", {}).get(m)),
        }
        for m, s in data["import_s"].items()
    ]
    return "\n".join(
        [
            f"Measured with `{command}` on {machine['cpu']} "
            f"(flags: {', '.join(machine['cpu_flags'])}); medians of {REPEATS} runs.",
            "",
            f"- Tokenize stage, end to end (Parquet in, dataset and report out), over "
            f"{tok['texts']:,} texts: {tok['stage_texts_per_s']:,.0f} texts/s (its first run "
            f"in the process, which also imports datasets and pyarrow: "
            f"{tok['stage_first_run_texts_per_s']:,.0f}); the same "
            f"tokenizer called in batches of 1,000 (`tokenizer(texts)`, its Python lists "
            f"included): {tok['batched_texts_per_s']:,.0f} texts/s (the stage reaches "
            f"**{tok['stage_vs_batched']:.0%}** of it); its Rust `encode_batch` alone, no "
            f"Python lists made: {tok['rust_batched_texts_per_s']:,.0f} texts/s (the stage: "
            f"{tok['stage_vs_rust']:.0%}); one text at a time: "
            f"{tok['one_at_a_time_texts_per_s']:,.0f} texts/s.",
            f"- A `dvc repro` with nothing to do: {data['noop_repro_s']:.2f} s; "
            f"`dvc version` (DVC starting alone): {data['dvc_alone_s']:.2f} s.",
            "- Import time of each stage module (a Python start subtracted), alone and with "
            "every library its code may import when it runs (function-level imports of the "
            "project files it runs, other tasks' included), and whether those import "
            "transformers' Trainer:",
            "",
            report.table(
                rows,
                {
                    "module": "module",
                    "import s": "alone s",
                    "with libraries s": "with libraries s",
                    "Trainer": "Trainer",
                },
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--validated", type=Path, required=True)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    machine = measure.machine()
    data = run(args.validated, args.params)
    report.publish("benchmarks.overhead", argv, HEADING, data, machine, args.out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
