"""Peak memory and time of the data stages (ingest, validate, tokenize) as rows grow.

Synthetic classification CSVs of each row count are written with the default data's columns
(`category`, `text`, `movie_name`): each text has a word count drawn from the real texts' word
counts and words drawn from their vocabulary (so texts are distinct and deduplication keeps them),
two labels in the real proportion, ten rows a group. Each stage then runs as the pipeline runs it
(`python -m pipeline.stages.X`, the default params with `ingest.source` pointed at the CSV), in a
process of its own whose peak resident memory is the kernel's count for it (`wait4`'s
`ru_maxrss`), also when the kernel stops it for want of memory; the later stages of that row
count are then not run.

`--before TREE` names a checkout of an earlier commit (`git worktree add ../before COMMIT`):
at each row count the same CSV goes through its stages too, one process after another, so
that one run on one machine compares the two pieces of code.

    python -m benchmarks.data_stages --validated data/validated --rows 100000 1000000 5000000 \
        --out docs/benchmarks.md --json reports/bench_data_stages.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from benchmarks import measure, report
from pipeline.core import layout

HEADING = "Data stages as rows grow (CPU)"
ROWS_PER_GROUP = 10
WRITE_CHUNK = 200_000  # rows generated and appended to the CSV at a time
STAGES = ("ingest", "validate", "tokenize")


def real_texts(validated: Path) -> tuple[list[str], np.ndarray, float]:
    """The real training texts' vocabulary, their word counts and the share of the first label."""
    train = pd.read_parquet(layout.split_file(validated, layout.TRAIN))
    words = train["text"].astype(str).str.split()
    vocabulary = sorted({w for row in words for w in row})
    first = float((train["label"] == sorted(train["label"].unique())[0]).mean())
    return vocabulary, words.str.len().clip(lower=1).to_numpy(), first


def synthetic_csv(path: Path, rows: int, validated: Path, seed: int = 0) -> Path:
    """`rows` synthetic rows in the default data's columns, written in chunks."""
    vocabulary, lengths, first = real_texts(validated)
    words = np.asarray(vocabulary, dtype=object)
    rng = np.random.default_rng(seed)
    labels = np.asarray(["fresh", "rotten"], dtype=object)
    with path.open("w", encoding="utf-8", newline="") as out:
        for start in range(0, rows, WRITE_CHUNK):
            n = min(WRITE_CHUNK, rows - start)
            counts = rng.choice(lengths, size=n)
            picked = words[rng.integers(0, len(words), size=int(counts.sum()))]
            ends = np.cumsum(counts)
            texts = [" ".join(picked[e - c : e]) for c, e in zip(counts, ends, strict=True)]
            frame = pd.DataFrame(
                {
                    "category": labels[(rng.random(n) >= first).astype(int)],
                    "text": texts,
                    "movie_name": [
                        f"movie {i // ROWS_PER_GROUP}" for i in range(start, start + n)
                    ],
                }
            )
            frame.to_csv(out, header=start == 0, index=False)
    return path


def stage_commands(work: Path, params: Path) -> dict[str, list[str]]:
    """The three stages' commands, as dvc.yaml gives them, inside `work`."""
    raw, validated, tokenized, reports = (work / n for n in ("raw", "validated", "tok", "rep"))
    return {
        "ingest": [
            "pipeline.stages.ingest",
            *("--params", str(params), "--out", str(raw)),
            *("--report", str(reports / "ingest.json")),
        ],
        "validate": [
            "pipeline.stages.validate",
            *("--raw", str(raw), "--params", str(params), "--out", str(validated)),
            *("--report", str(reports / "validation.json")),
            *("--failures", str(reports / "validation_failures.json")),
        ],
        "tokenize": [
            "pipeline.stages.tokenize_data",
            *("--validated", str(validated), "--params", str(params), "--out", str(tokenized)),
            *("--report", str(reports / "tokenize.json")),
        ],
    }


def run_stage(command: list[str], work: Path, tree: Path | None = None) -> dict[str, Any]:
    """Wall time and peak RSS of one stage process (its code from `tree`, or this checkout); a
    stage that fails is recorded with its exit (a kill by the kernel for want of memory shows as
    signal 9) and the end of its output."""
    started = time.perf_counter()
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    with open(work / "stage.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", *command], stdout=log, stderr=log, cwd=tree, env=env
        )
        # wait4 gives this child's own peak, also when it was killed.
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux counts in KiB
    }
    code = os.waitstatus_to_exitcode(status)
    if code:
        tail = (work / "stage.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        result["failed"] = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if code == -9:
            result["failed"] += " (the kernel's out-of-memory killer, or a user)"
        result["output_tail"] = tail
    return result


def run_code(n: int, work: Path, params: Path, tree: Path | None) -> dict[str, Any]:
    """The three stages of one piece of code on one CSV, until one fails."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "rep").mkdir(exist_ok=True)
    found: dict[str, Any] = {}
    for stage, command in stage_commands(work, params).items():
        found[stage] = run_stage(command, work, tree)
        print(f"{n:,} rows, {stage}{' (before)' if tree else ''}: {found[stage]}", flush=True)
        if "failed" in found[stage]:
            break
    shutil.rmtree(work, ignore_errors=True)
    return found


def run(
    validated: Path, params_file: Path, rows: list[int], keep: Path | None, before: Path | None
) -> dict[str, Any]:
    """Every stage at every row count, in a scratch folder (`keep` keeps it); with `before`,
    that checkout's stages on the same CSV first."""
    base = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    results = []
    scratch = Path(tempfile.mkdtemp(prefix="data-stages-", dir=keep)).resolve()
    try:
        for n in rows:
            work = scratch / f"rows-{n}"
            work.mkdir(parents=True)
            started = time.perf_counter()
            csv = synthetic_csv(work / "data.csv", n, validated)
            written = time.perf_counter() - started
            values = {**base, "ingest": {**base["ingest"], "source": str(csv), "max_rows": 0}}
            params = work / "params.yaml"
            params.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
            row: dict[str, Any] = {
                "rows": n,
                "csv_mib": round(csv.stat().st_size / 2**20, 1),
                "csv_written_s": round(written, 1),
            }
            if before is not None:
                row["before"] = run_code(n, work / "before", params, before)
            row |= run_code(n, work / "this", params, None)
            results.append(row)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"results": results}


def results_table(results: list[dict[str, Any]], which: str | None = None) -> str:
    """The table of this code's results, or of the `which` key's (an earlier checkout's)."""
    rows = []
    for r in results:
        row = {"rows": f"{r['rows']:,}", "csv": f"{r['csv_mib']:,.0f}"}
        found_in = r.get(which, {}) if which else r
        for stage in STAGES:
            found = found_in.get(stage)
            if found is None:
                row[f"{stage}_s"] = row[f"{stage}_mib"] = "not run"
            elif "failed" in found:
                failed = found["failed"].split(" (")[0]
                row[f"{stage}_s"] = f"{failed} after {found['seconds']:,.0f}"
                row[f"{stage}_mib"] = f"≥ {found['peak_rss_mib']:,.0f}"
            else:
                row[f"{stage}_s"] = f"{found['seconds']:,.1f}"
                row[f"{stage}_mib"] = f"{found['peak_rss_mib']:,.0f}"
        rows.append(row)
    return report.table(
        rows,
        {
            "rows": "rows",
            "csv": "CSV MiB",
            "ingest_s": "ingest s",
            "ingest_mib": "ingest peak MiB",
            "validate_s": "validate s",
            "validate_mib": "validate peak MiB",
            "tokenize_s": "tokenize s",
            "tokenize_mib": "tokenize peak MiB",
        },
    )


def markdown(data: dict[str, Any]) -> str:
    command, machine = data["command"], data["machine"]
    lines = [
        f"Measured {data['date']} with `{command}` on {machine['cpu']} (flags: "
        f"{', '.join(machine['cpu_flags'])}), {machine['logical_cores']} cores, "
        f"{machine['memory_gib']} GiB; {report.versions_line(data)}.",
        "",
        "Synthetic classification CSVs (the default data's columns, word counts and "
        "vocabulary); each stage in a process of its own, as `dvc repro` runs it; its peak "
        "resident memory as the kernel counts it.",
        "",
        f"Commit {data.get('commit') or 'not recorded'}:",
        "",
        results_table(data["results"]),
    ]
    if any("before" in r for r in data["results"]):
        lines += [
            f"The same CSVs, in the same run, through commit "
            f"{data.get('before_commit') or 'not recorded'}:",
            "",
            results_table(data["results"], "before"),
        ]
    return "\n".join(lines)


def commit(tree: Path | None = None) -> str | None:
    """The git commit of the code measured (with `+changes` when its pipeline/ differs)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=tree,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "pipeline"], cwd=tree
        ).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}+changes" if dirty else head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--validated", type=Path, default=layout.VALIDATED)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument("--keep", type=Path, help="a folder to keep the scratch files in")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--json", type=Path, default=Path("reports/bench_data_stages.json"))
    parser.add_argument("--before", type=Path, help="a checkout of an earlier commit, to compare")
    args = parser.parse_args(argv)
    before = args.before.resolve() if args.before else None
    data = run(args.validated, args.params, args.rows, args.keep, before)
    data["commit"] = commit()
    if before is not None:
        data["before_commit"] = commit(before)
    machine = measure.machine()
    report.publish("benchmarks.data_stages", argv, HEADING, data, machine, args.out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
