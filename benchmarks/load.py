"""The server under sustained mixed load: throughput, latency, errors and resident memory.

Many concurrent clients on loopback send single texts and batches (three in four requests are
one text, the fourth a batch), a fixed number of requests after a warm-up, while the server's
resident memory is read every few hundred requests. Bounded by count and by a deadline.

    python -m benchmarks.load --model-dir models/onnx --test data/validated/test.parquet \
        --out docs/benchmarks.md --json reports/bench_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import measure, report
from benchmarks.serving import Server

HEADING = "Server under sustained load (CPU, HTTP on loopback)"
BATCH = 16  # texts in every fourth request
SAMPLE_EVERY = 250  # requests between two readings of the server's memory


async def soak(
    url: str,
    pid: int,
    texts: list[str],
    clients: int,
    warmup: int,
    requests: int,
    deadline_s: float = 600.0,
) -> dict[str, Any]:
    """`warmup` then `requests` requests from `clients` concurrent clients; statuses, latency
    by kind, and the server's RSS over the measured requests. Each client holds one keep-alive
    connection of the lean `benchmarks.http_load` client, so that the clients take little of
    the cores they share with the server."""
    import psutil

    from benchmarks.http_load import Connection, ProtocolError

    server = psutil.Process(pid)
    latencies: dict[str, list[float]] = {"single": [], "batch": []}
    statuses: dict[str, int] = {}
    rss: list[tuple[int, int]] = []
    sent = 0
    texts_done = 0
    stop = time.monotonic() + deadline_s
    total = warmup + requests
    began = 0.0

    async def client(connection: Connection) -> None:
        nonlocal sent, texts_done, began
        while sent < total and time.monotonic() < stop:
            n = sent
            sent += 1
            if n == warmup:
                began = time.monotonic()
            kind = "batch" if n % 4 == 3 else "single"
            size = BATCH if kind == "batch" else 1
            body = {"texts": [texts[(n * 7 + j) % len(texts)] for j in range(size)]}
            start = time.perf_counter()
            try:
                code, _ = await connection.send(connection.request("/predict", body))
                status = str(code)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ProtocolError) as exc:
                status = type(exc).__name__  # counted, then the connection is opened again
                await connection.close()
            if n >= warmup:
                latencies[kind].append(time.perf_counter() - start)
                statuses[status] = statuses.get(status, 0) + 1
                texts_done += size if status == "200" else 0
                if (n - warmup) % SAMPLE_EVERY == 0:
                    rss.append((n - warmup, server.memory_info().rss))

    connections = [Connection(url) for _ in range(clients)]
    try:
        await asyncio.gather(*(client(c) for c in connections))
    finally:
        for connection in connections:
            await connection.close()
    elapsed = time.monotonic() - began
    rss.append((requests, server.memory_info().rss))
    mib = [value / 2**20 for _, value in rss]
    done = sum(statuses.values())

    def ms(kind: str, q: float) -> float:
        values = latencies[kind]
        return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")

    return {
        "clients": clients,
        "warmup": warmup,
        "requests": done,
        "finished_in_time": done == requests,
        "seconds": round(elapsed, 2),
        "requests_per_s": done / elapsed if elapsed else 0.0,
        "texts_per_s": texts_done / elapsed if elapsed else 0.0,
        "p50_ms_single": ms("single", 50),
        "p99_ms_single": ms("single", 99),
        "p50_ms_batch": ms("batch", 50),
        "p99_ms_batch": ms("batch", 99),
        "statuses": statuses,
        "server_errors": sum(v for k, v in statuses.items() if k.startswith("5")),
        "failed": sum(v for k, v in statuses.items() if k != "200"),
        "rss_mib": [round(m, 1) for m in mib],
        "rss_start_mib": round(mib[0], 1),
        "rss_end_mib": round(mib[-1], 1),
        "rss_growth_mib": round(mib[-1] - mib[0], 1),
        "rss_spread_mib": round(max(mib) - min(mib), 1),
    }


def run(
    model_dir: Path, test: Path, clients: int, warmup: int, requests: int, threads: int
) -> dict[str, Any]:
    texts = pd.read_parquet(test)["text"].astype(str).tolist()
    server = Server(model_dir, threads, [])
    with server as url:
        return asyncio.run(soak(url, server.process.pid, texts, clients, warmup, requests))


def markdown(data: dict[str, Any]) -> str:
    command, machine = data["command"], data["machine"]
    return "\n".join(
        [
            f"Measured with `{command}` on {machine['cpu']} "
            f"(flags: {', '.join(machine['cpu_flags'])}).",
            "",
            f"- {data['clients']} concurrent clients on loopback, {data['warmup']:,} requests of "
            f"warm-up, then {data['requests']:,} requests in {data['seconds']:g} s (three in four "
            f"one text, every fourth {BATCH} texts); `bertrt serve` with its defaults.",
            f"- {data['requests_per_s']:.0f} requests/s, {data['texts_per_s']:.0f} texts/s; "
            f"single texts p50 {data['p50_ms_single']:.1f} ms, p99 {data['p99_ms_single']:.1f} "
            f"ms; batches p50 {data['p50_ms_batch']:.1f} ms, p99 {data['p99_ms_batch']:.1f} ms.",
            f"- Statuses: {data['statuses']}; 5xx: {data['server_errors']}.",
            f"- Server resident memory after warm-up {data['rss_start_mib']} MiB, at the end "
            f"{data['rss_end_mib']} MiB (growth {data['rss_growth_mib']} MiB, spread "
            f"{data['rss_spread_mib']} MiB over {len(data['rss_mib'])} readings, one every "
            f"{SAMPLE_EVERY} requests).",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=0, help="0: as many as cores")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    machine = measure.machine()
    threads = args.threads or machine["logical_cores"]
    data = run(args.model_dir, args.test, args.clients, args.warmup, args.requests, threads)
    report.publish("benchmarks.load", argv, HEADING, data, machine, args.out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
