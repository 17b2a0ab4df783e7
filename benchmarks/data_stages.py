"""Peak memory and time of the data stages (ingest, validate, tokenize) as rows grow.

Synthetic classification CSVs of each row count are written with the default data's columns
(`category`, `text`, `movie_name`): each text has a word count drawn from the real texts' word
counts and words drawn from their vocabulary (so texts are distinct and deduplication keeps them),
two labels in the real proportion, ten rows a group. Each stage then runs as the pipeline runs it
(`python -m pipeline.stages.X`, the default params with `ingest.source` pointed at the CSV), in a
process of its own whose peak resident memory (its own and its children's) is read at exit.

    python -m benchmarks.data_stages --validated data/validated --rows 100000 1000000 5000000 \
        --out docs/benchmarks.md --json reports/bench_data_stages.json
"""

from __future__ import annotations

import argparse
import json
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
# Runs a stage module as `python -m` would and writes the process's peak RSS (and that of the
# children it waited for) to $PEAK_RSS_FILE at exit, whatever the exit status.
WRAPPER = """
import atexit, json, os, resource, runpy, sys

def peak():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(os.environ["PEAK_RSS_FILE"], "w") as f:
        json.dump({"peak_rss_kib": max(own, children)}, f)

atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def real_texts(validated: Path) -> tuple[list[str], np.ndarray, float]:
    """The real training texts' vocabulary, their word counts and the share of the first label."""
    train = pd.read_parquet(layout.split_file(validated, layout.TRAIN))
    words = train["text"].astype(str).str.split()
    vocabulary = sorted({w for row in words for w in row})
    first = float((train["category"] == sorted(train["category"].unique())[0]).mean())
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


def run_stage(command: list[str], work: Path) -> dict[str, float]:
    """Wall time and peak RSS of one stage process; raises with its output when it fails."""
    peak_file = work / "peak.json"
    env = {**os.environ, "PEAK_RSS_FILE": str(peak_file)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak = json.loads(peak_file.read_text(encoding="utf-8"))["peak_rss_kib"]
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak / 1024, 1)}


def run(validated: Path, params_file: Path, rows: list[int], keep: Path | None) -> dict[str, Any]:
    """Every stage at every row count, in a scratch folder (`keep` keeps it)."""
    base = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    results = []
    scratch = Path(tempfile.mkdtemp(prefix="data-stages-", dir=keep))
    try:
        for n in rows:
            work = scratch / f"rows-{n}"
            (work / "rep").mkdir(parents=True)
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
            for stage, command in stage_commands(work, params).items():
                row[stage] = run_stage(command, work)
                print(f"{n:,} rows, {stage}: {row[stage]}", flush=True)
            results.append(row)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"results": results}


def markdown(data: dict[str, Any]) -> str:
    command, machine = data["command"], data["machine"]
    rows = []
    for r in data["results"]:
        row = {"rows": f"{r['rows']:,}", "csv": f"{r['csv_mib']:,.0f}"}
        for stage in ("ingest", "validate", "tokenize"):
            row[f"{stage}_s"] = f"{r[stage]['seconds']:,.1f}"
            row[f"{stage}_mib"] = f"{r[stage]['peak_rss_mib']:,.0f}"
        rows.append(row)
    return "\n".join(
        [
            f"Measured {data['date']} with `{command}` on {machine['cpu']} (flags: "
            f"{', '.join(machine['cpu_flags'])}), {machine['logical_cores']} cores; "
            f"{report.versions_line(data)}.",
            "",
            "Synthetic classification CSVs (the default data's columns, word counts and "
            "vocabulary); each stage in a process of its own, as `dvc repro` runs it; peak "
            "resident memory of the stage's process and its children.",
            "",
            report.table(
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
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--validated", type=Path, default=layout.VALIDATED)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument("--keep", type=Path, help="a folder to keep the scratch files in")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--json", type=Path, default=Path("reports/bench_data_stages.json"))
    args = parser.parse_args(argv)
    data = run(args.validated, args.params, args.rows, args.keep)
    machine = measure.machine()
    report.publish("benchmarks.data_stages", argv, HEADING, data, machine, args.out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
