"""Serving under concurrent clients: the HTTP server with dynamic batching against the same
server running each request on its own, on loopback, bounded in time.

    python -m benchmarks.serving --model-dir models/onnx --test data/validated/test.parquet \
        --out docs/benchmarks.md --json reports/bench_serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import measure, report
from pipeline.core import layout

HEADING = "Serving (CPU, HTTP on loopback)"


class Server:
    """`bertrt serve` in its own process (so the clients do not share its interpreter) on a
    free loopback port."""

    def __init__(self, model_dir: Path, threads: int, extra: list[str]) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.variant: str | None = None  # from /health once it answers
        self.cmd = [
            sys.executable,
            *("-m", "bertrt", "--log-level", "warning", "serve"),
            *("--model", str(model_dir), "--device", "cpu", "--threads", str(threads)),
            *("--port", str(self.port), *extra),
        ]

    def __enter__(self) -> str:
        import httpx

        self.process = subprocess.Popen(self.cmd)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                health = httpx.get(f"{url}/health", timeout=1)
                if health.status_code == 200:
                    self.variant = health.json()["variant"]  # the graph it serves
                    return url
            except httpx.HTTPError:
                time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(f"the server did not start: {' '.join(self.cmd)}")

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def load(url: str, texts: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` clients, each on its own keep-alive connection sending one text at a time,
    for `seconds`. The client is `benchmarks.http_load`: it costs the shared cores little."""
    from benchmarks.http_load import Connection

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    connections = [Connection(url) for _ in range(clients)]
    requests = [connections[0].request("/predict", {"texts": [text]}) for text in texts]
    stop = time.monotonic() + seconds

    async def client(i: int, connection: Connection) -> None:
        n = i
        while time.monotonic() < stop:
            start = time.perf_counter()
            try:
                status, _ = await connection.send(requests[n % len(requests)])
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                status = 0  # a dropped connection: counted as an error, then reopened
                await connection.close()
            latencies.append(time.perf_counter() - start)
            statuses[status] = statuses.get(status, 0) + 1
            n += clients

    warm_up = connections[0].request("/predict", {"texts": texts[:32]})
    status, body = await connections[0].send(warm_up)
    if status != 200:
        raise RuntimeError(f"warm-up request failed with {status}: {body[:200]!r}")
    began = time.monotonic()
    await asyncio.gather(*(client(i, c) for i, c in enumerate(connections)))
    elapsed = time.monotonic() - began
    for connection in connections:
        await connection.close()
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "texts_per_s": statuses.get(200, 0) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": sum(v for k, v in statuses.items() if k != 200),
        "server_errors": sum(v for k, v in statuses.items() if k >= 500),
    }


def ceiling(predictor: Any, texts: list[str], group: int, seconds: float) -> dict[str, float]:
    """What batching can gain at most, with no HTTP: the same predictor in this process run on
    one text at a time, then on runs of `group` consecutive texts (the most that `group`
    clients with one text each can have waiting at once), each for about `seconds`."""

    def rate(size: int) -> float:
        done, at = 0, 0
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            chunk = [texts[(at + i) % len(texts)] for i in range(size)]
            predictor.predict(chunk, batch_size=size)
            done, at = done + size, at + size
        return done / (time.perf_counter() - began)

    predictor.predict(texts[:group], batch_size=group)  # warm-up
    one, grouped = rate(1), rate(group)
    return {"one_per_s": one, "grouped_per_s": grouped, "ratio": grouped / one}


def run(model_dir: Path, test: Path, clients: int, seconds: float, threads: int) -> dict:
    import bertrt

    texts = pd.read_parquet(test)["text"].astype(str).tolist()
    # The variant the runtime picks here, pinned for both servers: each would otherwise time the
    # variants at its own start, and on shared cores the two modes could run different graphs.
    predictor = bertrt.load(model_dir, device="cpu", threads=threads)
    variant = predictor.variant
    bound = ceiling(predictor, texts, clients, seconds / 4)
    del predictor  # its sessions' threads and memory are not the servers' to share
    modes = {
        "one request per run": ["--gather-texts", "1", "--gather-ms", "0"],
        "dynamic batching (5 ms, 64 texts)": ["--gather-texts", "64", "--gather-ms", "5"],
    }
    results = {}
    for name, extra in modes.items():
        server = Server(model_dir, threads, [*extra, "--variant", variant])
        with server as url:
            if server.variant != variant:
                raise RuntimeError(f"{name}: the server runs {server.variant}, not {variant}")
            results[name] = asyncio.run(load(url, texts, clients, seconds))
    base, ours = (results[name] for name in modes)
    ratio = ours["texts_per_s"] / base["texts_per_s"] if base["texts_per_s"] else None
    return {
        "clients": clients,
        "seconds": seconds,
        "variant": variant,
        "threads": threads,
        "results": results,
        "ratio": ratio,
        "ceiling": bound,
        "share_of_gain": (ratio - 1) / (bound["ratio"] - 1)
        if ratio and bound["ratio"] > 1
        else None,
    }


def markdown(data: dict[str, Any]) -> str:
    command, machine = data["command"], data["machine"]
    bound = data["ceiling"]
    share = (
        f"The server's gain ({data['ratio'] - 1:+.0%}) is {data['share_of_gain']:.0%} of the "
        f"ceiling's ({bound['ratio'] - 1:+.0%}): batching saves only what a run of one text "
        "costs beyond its share of a batch."
        if data["share_of_gain"] is not None
        else "Runs of several texts were no faster per text than runs of one here."
    )
    rows = [{"mode": name, **values} for name, values in data["results"].items()]
    return "\n".join(
        [
            f"Measured with `{command}` on {machine['cpu']} "
            f"(flags: {', '.join(machine['cpu_flags'])}).",
            "",
            f"- {data['clients']} concurrent clients on loopback, each sending one test text per "
            f"request for {data['seconds']:g} s per mode; `bertrt serve` (variant "
            f"{data['variant']}) in its own process; the clients share its cores.",
            f"- Dynamic batching against one request per run: **{data['ratio']:.2f}×** "
            "the texts per second.",
            f"- Ceiling, measured first in the benchmark's process with no HTTP (the same "
            f"variant and threads, {data['seconds'] / 4:g} s each): one text per run "
            f"{bound['one_per_s']:.1f} texts/s, runs of {data['clients']} consecutive test "
            f"texts (the most {data['clients']} one-text clients can have waiting) "
            f"{bound['grouped_per_s']:.1f} texts/s, **{bound['ratio']:.2f}×**. {share}",
            "",
            report.table(
                rows,
                {
                    "mode": "mode",
                    "texts_per_s": "texts / s",
                    "p50_ms": "p50 ms",
                    "p99_ms": "p99 ms",
                    "requests": "requests",
                    "errors": "non-200",
                },
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=layout.ONNX_MODEL)
    parser.add_argument(
        "--test", type=Path, default=layout.split_file(layout.VALIDATED, layout.TEST)
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: all)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--json", type=Path, default=Path("reports/bench_serving.json"))
    args = parser.parse_args(argv)
    data = run(args.model_dir, args.test, args.clients, args.seconds, args.threads)
    report.publish(
        "benchmarks.serving", argv, HEADING, data, measure.machine(), args.out, args.json
    )
    for name, values in data["results"].items():
        print(
            f"{name:<36} {values['texts_per_s']:8.1f} texts/s  p50 {values['p50_ms']:7.1f} ms  "
            f"p99 {values['p99_ms']:7.1f} ms  non-200 {values['errors']}"
        )
    bound = data["ceiling"]["ratio"]
    print(f"dynamic batching: {data['ratio']:.2f}x; in-process ceiling {bound:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
