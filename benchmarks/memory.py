"""Peak memory of the runtime on very long texts: `bertrt predict` reading one JSONL line of
tens of megabytes, and `bertrt serve` answering concurrent requests of a megabyte each.

Each CLI case runs in its own process, and its peak resident memory is the kernel's count for
that process (`wait4`'s `ru_maxrss`, what `/usr/bin/time -f %M` prints). The server's is its
`VmHWM` (peak resident set) once it is ready and again after the requests.

    python -m benchmarks.memory --model-dir models/onnx --out docs/benchmarks.md \
        --json reports/bench_memory.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks import measure, report
from benchmarks.serving import Server

HEADING = "Memory of long texts (CPU)"
# A review-like vocabulary; the texts are these words in a seeded order.
REVIEW = (
    "the movie was a quiet study of grief and the actors carry every scene with a warmth that "
    "makes its slow middle worth the wait although the ending feels rushed and the score is loud"
)
WORDS = tuple(REVIEW.split(" "))


CHUNK = 1 << 20  # characters generated and written at a time


def words_text(chars: int, seed: int) -> str:
    """About `chars` characters of space-separated English words, in a seeded order."""
    rng = np.random.default_rng(seed)
    mean = sum(len(w) + 1 for w in WORDS) / len(WORDS)
    picks = rng.integers(0, len(WORDS), size=int(chars / mean * 1.25) + 16)  # then cut to size
    return " ".join(WORDS[i] for i in picks)[:chars]


def cjk_text(chars: int, seed: int) -> str:
    """`chars` characters drawn from the CJK Unified Ideographs block, no spaces."""
    rng = np.random.default_rng(seed)
    return "".join(map(chr, rng.integers(0x4E00, 0x9FA6, size=chars, dtype=np.int32).tolist()))


def write_line(path: Path, kind: str, chars: int, seed: int) -> dict[str, Any]:
    """One JSONL line `{"text": ...}` of `chars` characters of `kind` ("words" or "cjk"),
    generated and written a chunk at a time: a process started later inherits the peak memory
    of the one that starts it (Linux counts the parent's resident set at the fork), so this
    one stays small. Neither kind needs JSON escaping."""
    make = words_text if kind == "words" else cjk_text
    written = size = 0
    with path.open("w", encoding="utf-8") as out:
        out.write('{"text": "')
        for part in range((chars + CHUNK - 1) // CHUNK):
            piece = make(min(CHUNK, chars - written), seed + part)
            if kind == "words" and written:
                piece = " " + piece[1:]  # chunks meet at a space, not inside a word
            out.write(piece)
            written += len(piece)
            size += len(piece.encode("utf-8"))
        out.write('"}\n')
    return {"chars": written, "utf8_mb": round(size / 1e6, 1)}


def predict_peak(model_dir: Path, line: Path, extra: list[str]) -> dict[str, Any]:
    """One `bertrt predict --input line` process: peak RSS, seconds, exit code, its answer."""
    cmd = [
        sys.executable,
        *("-m", "bertrt", "--log-level", "warning", "predict"),
        *("--model", str(model_dir), "--device", "cpu", "--no-progress"),
        *("--input", str(line), "--output", "-", *extra),
    ]
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait4 gives this child's own peak (RUSAGE_CHILDREN would keep the largest child so far).
    out_fd, err_fd = process.stdout, process.stderr
    assert out_fd is not None and err_fd is not None
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        out = pool.submit(out_fd.read)
        err = pool.submit(err_fd.read)
        _, status, usage = os.wait4(process.pid, 0)
        stdout, stderr = out.result(), err.result()
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    answer = ""
    if process.returncode == 0 and stdout.strip():
        result = json.loads(stdout.splitlines()[0])
        answer = result.get("label") or f"{len(result.get('entities', []))} entities"
    else:
        lines = stderr.decode(errors="replace").strip().splitlines()
        answer = f"refused: {lines[-1][:120]}" if lines else f"exit {process.returncode}"
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux counts in KiB
        "seconds": round(seconds, 2),
        "exit_code": process.returncode,
        "answer": answer,
    }


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmHWM for process {pid}")


def server_peak(model_dir: Path, clients: int, chars: int, seed: int) -> dict[str, Any]:
    """`bertrt serve`, then `clients` concurrent POST /predict of one `chars`-character text."""
    import httpx

    server = Server(model_dir, threads=0, extra=[])
    with server as url:
        idle = vm_hwm_mb(server.process.pid)
        texts = [words_text(chars, seed + i) for i in range(clients)]

        def post(text: str) -> int:
            return httpx.post(f"{url}/predict", json={"texts": [text]}, timeout=600).status_code

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(post, texts))
        seconds = time.perf_counter() - start
        busy = vm_hwm_mb(server.process.pid)
    return {
        "clients": clients,
        "chars": chars,
        "variant": server.variant,
        "peak_rss_ready_mb": idle,
        "peak_rss_after_mb": busy,
        "seconds": round(seconds, 2),
        "statuses": {str(code): statuses.count(code) for code in sorted(set(statuses))},
    }


def run(
    model_dir: Path, seed: int, words_chars: int, cjk_chars: int, clients: int, server_chars: int
) -> dict[str, Any]:
    manifest = json.loads((model_dir / "manifest.json").read_text(encoding="utf-8"))
    cases = [
        ("default variant", "words", []),
        ("default variant", "cjk", []),
        ("default variant", "three words", []),
    ]
    if "int8" in manifest.get("variants", {}):  # one graph named: no timing at load
        cases.append(("--variant int8 (no timing at load)", "words", ["--variant", "int8"]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths, sizes = {}, {}
        for name, chars in (("words", words_chars), ("cjk", cjk_chars)):
            paths[name] = Path(tmp) / f"{name}.jsonl"
            sizes[name] = write_line(paths[name], name, chars, seed)
        paths["three words"] = Path(tmp) / "three-words.jsonl"
        paths["three words"].write_text('{"text": "a quiet film"}\n', encoding="utf-8")
        sizes["three words"] = {"chars": 12, "utf8_mb": 0.0}
        launcher = round(psutil.Process().memory_info().rss / 2**20, 1)
        for how, name, extra in cases:
            rows.append(
                {
                    "model": how,
                    "text": name,
                    **sizes[name],
                    **predict_peak(model_dir, paths[name], extra),
                }
            )
            print(f"{how:<36} {name:<12} {rows[-1]['peak_rss_mb']:>8.1f} MB", flush=True)
    served = server_peak(model_dir, clients, server_chars, seed)
    print(f"server: {served}", flush=True)
    return {
        "model_dir": str(model_dir),
        "task": manifest.get("task"),
        "max_length": manifest.get("max_length"),
        "reading": manifest.get("long_text") or {},
        "seed": seed,
        "launcher_rss_mb": launcher,  # a floor under every CLI peak (see write_line)
        "predict": rows,
        "server": served,
    }


def markdown(data: dict[str, Any]) -> str:
    machine = data["machine"]
    served = data["server"]
    statuses = ", ".join(f"{n} × {code}" for code, n in served["statuses"].items())
    rows = [
        {
            **row,
            "text": {
                "words": "space-separated words",
                "cjk": "CJK characters, no spaces",
                "three words": "three words",
            }[row["text"]],
            "chars": f"{row['chars']:,}",
        }
        for row in data["predict"]
    ]
    return "\n".join(
        [
            f"Measured with `{data['command']}` on {data['date']}, {machine['cpu']} "
            f"(flags: {', '.join(machine['cpu_flags'])}), {machine['logical_cores']} logical "
            f"cores, {machine['memory_gib']} GiB; {report.versions_line(data)}.",
            "",
            f"`python -m bertrt predict --model {data['model_dir']} --device cpu --input "
            'line.jsonl`, where the file is one JSONL line `{"text": ...}`; peak resident '
            "memory of that process, start to exit (started from a process of "
            f"{data['launcher_rss_mb']:.0f} MB, a floor under each figure). The model "
            f"({data['task']}, `max_length` {data['max_length']}) reads a long text as "
            f"`{json.dumps(data['reading'], sort_keys=True)}`.",
            "",
            report.table(
                rows,
                {
                    "model": "graph",
                    "text": "text",
                    "chars": "characters",
                    "utf8_mb": "MB of UTF-8",
                    "peak_rss_mb": "peak RSS (MB)",
                    "seconds": "seconds",
                    "answer": "answer",
                },
            ),
            "",
            f"`python -m bertrt serve --model {data['model_dir']} --device cpu` "
            f"({served['variant']}), {served['clients']} concurrent requests of one "
            f"{served['chars']:,}-character text each: peak resident memory "
            f"{served['peak_rss_ready_mb']:.0f} MB once ready, "
            f"{served['peak_rss_after_mb']:.0f} MB after the requests ({statuses} "
            f"in {served['seconds']:.1f} s).",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/onnx"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--words-chars", type=int, default=50_000_000)
    parser.add_argument("--cjk-chars", type=int, default=17_000_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--server-chars", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--json", type=Path, default=Path("reports/bench_memory.json"))
    args = parser.parse_args(argv)
    sizes = (args.words_chars, args.cjk_chars, args.clients, args.server_chars)
    data = run(args.model_dir, args.seed, *sizes)
    report.publish(
        "benchmarks.memory", argv, HEADING, data, measure.machine(), args.out, args.json
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
