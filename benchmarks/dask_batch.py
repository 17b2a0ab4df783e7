"""Bulk scoring on Dask against the single-process command line, on the same Parquet files.

    python -m benchmarks.dask_batch --model-dir models/onnx --test data/validated/test.parquet \
        --out docs/benchmarks.md --json reports/bench_dask.json

The test texts, repeated to `--texts` rows, in `--files` Parquet files. The command line
(`bertrt predict --input FILE.jsonl`, one process, every core) and `bertrt.batch.run` on a
LocalCluster of one single-threaded worker per core each score all of it, model loads included;
the cluster's start is timed apart. Memory: each worker's peak resident set, read in the worker
when the job is done, and the command line's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks import measure, report
from pipeline.core import layout

HEADING = "Bulk scoring on Dask (CPU)"


def peak_rss_mib() -> float:
    """This process's peak resident set (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_input(test: Path, texts: int, files: int, folder: Path) -> tuple[Path, Path]:
    """`texts` rows (the test texts repeated) as Parquet files and as one JSONL file."""
    pool = pd.read_parquet(test, columns=["text"])["text"].astype(str).tolist()
    rows = [pool[i % len(pool)] for i in range(texts)]
    parquet = folder / "parquet"
    parquet.mkdir()
    size = -(-texts // files)
    for i in range(files):
        chunk = rows[i * size : (i + 1) * size]
        pd.DataFrame({"text": chunk}).to_parquet(parquet / f"part-{i:03d}.parquet", index=False)
    jsonl = folder / "texts.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows)
    return parquet, jsonl


def run_cli(model_dir: Path, jsonl: Path, out: Path) -> dict[str, float]:
    """`bertrt predict` over the JSONL file in its own process: wall seconds and peak RSS."""
    code = (
        "import resource, sys; from bertrt import cli; rc = cli.main(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr); "
        "sys.exit(rc)"
    )
    argv = ["predict", "--model", str(model_dir), "--device", "cpu"]
    argv += ["--input", str(jsonl), "--output", str(out)]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"bertrt predict failed: {done.stderr[-2000:]}")
    return {"seconds": seconds, "peak_rss_mib": float(done.stderr.strip().splitlines()[-1])}


def run_dask(model_dir: Path, parquet: Path, out: Path, workers: int) -> dict[str, Any]:
    """`bertrt.batch.run` on a LocalCluster of `workers` one-thread processes."""
    from bertrt import batch

    start = time.perf_counter()
    client, cluster = batch.open_client(None, workers)
    started = time.perf_counter() - start
    try:
        spec = batch.ModelSpec(str(model_dir), device="cpu", threads=1)
        start = time.perf_counter()
        summary = batch.run(str(parquet), str(out), spec, client)
        seconds = time.perf_counter() - start
        peaks = sorted(client.run(peak_rss_mib).values())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return {
        "seconds": seconds,
        "cluster_start_s": started,
        "partitions": summary.partitions,
        "rows": summary.rows_written,
        "worker_peak_rss_mib": peaks,
    }


def run(model_dir: Path, test: Path, texts: int, files: int, workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        folder = Path(tmp)
        parquet, jsonl = write_input(test, texts, files, folder)
        cli = run_cli(model_dir, jsonl, folder / "cli.jsonl")
        dask = run_dask(model_dir, parquet, folder / "dask", workers)
    if dask["rows"] != texts:
        raise RuntimeError(f"the Dask job wrote {dask['rows']} rows of {texts}")
    cli["texts_per_s"] = texts / cli["seconds"]
    dask["texts_per_s"] = texts / dask["seconds"]
    return {
        "texts": texts,
        "files": files,
        "workers": workers,
        "cli": cli,
        "dask": dask,
        "ratio": dask["texts_per_s"] / cli["texts_per_s"],
    }


def markdown(data: dict[str, Any]) -> str:
    command, machine = data["command"], data["machine"]
    cli, dask = data["cli"], data["dask"]
    peaks = ", ".join(f"{mib:.0f}" for mib in dask["worker_peak_rss_mib"])
    rows = [
        {
            "how": "`bertrt predict` (one process, every core)",
            "texts_per_s": cli["texts_per_s"],
            "seconds": cli["seconds"],
            "peak": f"{cli['peak_rss_mib']:.0f}",
        },
        {
            "how": f"`bertrt batch`, LocalCluster of {data['workers']} one-thread workers",
            "texts_per_s": dask["texts_per_s"],
            "seconds": dask["seconds"],
            "peak": f"{peaks} (per worker)",
        },
    ]
    return "\n".join(
        [
            f"Measured {data['date']} with `{command}` on {machine['cpu']} (flags: "
            f"{', '.join(machine['cpu_flags'])}), {machine['logical_cores']} cores; "
            f"{report.versions_line(data)}.",
            "",
            f"- {data['texts']:,} texts (the test texts repeated) in {data['files']} Parquet "
            f"files, the same rows as one JSONL file for the command line; model loads "
            f"included; the cluster's start ({dask['cluster_start_s']:.1f} s) is not.",
            f"- The Dask job reaches **{data['ratio']:.2f}×** the command line's texts/s.",
            "",
            report.table(
                rows,
                {"how": "how", "texts_per_s": "texts / s", "seconds": "s", "peak": "peak RSS MiB"},
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=layout.ONNX_MODEL)
    parser.add_argument(
        "--test", type=Path, default=layout.split_file(layout.VALIDATED, layout.TEST)
    )
    parser.add_argument("--texts", type=int, default=50_000)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--json", type=Path, default=Path("reports/bench_dask.json"))
    args = parser.parse_args(argv)
    machine = measure.machine()
    workers = args.workers or machine["logical_cores"]
    data = run(args.model_dir, args.test, args.texts, args.files, workers)
    report.publish("benchmarks.dask_batch", argv, HEADING, data, machine, args.out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
