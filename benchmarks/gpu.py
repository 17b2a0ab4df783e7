"""GPU benchmark: PyTorch fp32 and fp16 against ONNX Runtime CUDA with IO binding, batch 1-256."""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import measure, report
from benchmarks.cpu import Predict, ort_predictor, pytorch_predictor, token_lengths
from bertrt.session import DeviceError

log = logging.getLogger(__name__)

REFERENCE = "pytorch fp32"
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# ONNX Runtime on CUDA: fp16 (every fusion) is the variant the runtime picks there;
# fp32-optimized (fused for the CPU: attention unfused) its fallback.
ORT_VARIANTS = ("fp16", "fp32-optimized")
COLUMNS = {
    "backend": "backend",
    "batch": "batch",
    "p50_ms": "p50 ms/batch",
    "p95_ms": "p95 ms",
    "p99_ms": "p99 ms",
    "texts_per_s": "texts/s",
    "peak_device_mb": "peak GPU +MB",
    "agreement": "agreement",
    "ratio": "× PyTorch fp32",
}


class NoCudaError(SystemExit):
    """No CUDA device, or a stack that cannot use it; the message says which."""


def require_cuda() -> str:
    """The GPU's name, or exit with why this machine cannot run the benchmark."""
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU-only wheel)"
        raise NoCudaError(
            f"benchmarks.gpu: no CUDA device visible to torch {torch.__version__} (CUDA build: "
            f"{build}); run it on a machine with an NVIDIA GPU, or use benchmarks.cpu"
        )
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise NoCudaError(
            f"benchmarks.gpu: onnxruntime {ort.__version__} has no CUDAExecutionProvider; "
            "install onnxruntime-gpu"
        )
    return torch.cuda.get_device_name(0)


def device_used_bytes() -> int:
    """Memory in use on GPU 0 by every process and allocator (torch's and ONNX Runtime's)."""
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return total - free


def batches_of(texts: list[str], size: int, count: int) -> list[list[str]]:
    """`count` consecutive batches of `size`, cycling through `texts` when they run out."""
    stream = itertools.cycle(texts)
    return [[next(stream) for _ in range(size)] for _ in range(count)]


def sweep(
    make: Callable[[], Predict],
    texts: list[str],
    batch_sizes: Sequence[int],
    batches: int,
) -> tuple[list[dict[str, Any]], list[str], float]:
    """Per-batch latency and throughput at each size; labels at batch 32; peak GPU memory."""
    with measure.PeakMemory(device_used_bytes) as memory:
        predict = make()
        rows = []
        for size in batch_sizes:
            work = batches_of(texts, size, batches)
            # One untimed call per size: CUDA picks kernels and grows its pools per shape.
            predict(work[0], size)
            seconds = measure.timed_calls(lambda b, size=size: predict(b, size), work)
            rows.append(
                {
                    "batch": size,
                    **measure.percentiles_ms(seconds),
                    "texts_per_s": size * len(work) / sum(seconds),
                }
            )
        labels = predict(texts, 32)
    return rows, labels, memory.delta_mb


def run(
    model_dir: Path,
    finetuned: Path,
    test: Path,
    out: Path,
    json_path: Path,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    batches: int = 20,
    max_texts: int = 0,
    command: str = "",
) -> dict[str, Any]:
    """Sweep batch sizes for PyTorch fp32/fp16 and ONNX Runtime CUDA; write both reports."""
    gpu = require_cuda()
    import pandas as pd
    import torch

    from bertrt import manifest as manifest_io

    manifest = manifest_io.read(model_dir)
    texts = [str(t) for t in pd.read_parquet(test, columns=["text"])["text"]]
    texts = texts[:max_texts] if max_texts else texts
    if not texts:
        raise ValueError(f"{test}: no texts in column 'text'")
    max_length = manifest.max_length
    # ONNX Runtime first: a CUDA provider that cannot start fails before the long PyTorch runs.
    backends: dict[str, Callable[[], Predict]] = {
        **{
            f"ort cuda {v}": (lambda v=v: ort_predictor(model_dir, v, "cuda"))
            for v in ORT_VARIANTS
            if v in manifest.variants
        },
        REFERENCE: lambda: pytorch_predictor(finetuned, max_length, 0, torch.float32),
        "pytorch fp16": lambda: pytorch_predictor(finetuned, max_length, 0, torch.float16),
    }
    rows, labels, memory = [], {}, {}
    for name, make in backends.items():
        log.info("%s: batches %s, %d each", name, list(batch_sizes), batches)
        got, labels[name], memory[name] = sweep(make, texts, batch_sizes, batches)
        rows += [{"backend": name, **row} for row in got]
        gc.collect()
        torch.cuda.empty_cache()
    reference = np.array(labels[REFERENCE])
    speed = {r["batch"]: r["texts_per_s"] for r in rows if r["backend"] == REFERENCE}
    for row in rows:
        row["agreement"] = float((np.array(labels[row["backend"]]) == reference).mean())
        row["peak_device_mb"] = memory[row["backend"]]
        row["ratio"] = row["texts_per_s"] / speed[row["batch"]]
    data = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": {**measure.machine(), "gpu": gpu, "cuda": torch.version.cuda},
        "versions": measure.versions(),
        "model": {
            "base_model": manifest.provenance.get("base_model", {}).get("name"),
            "folder": str(model_dir),
            "labels": manifest.labels,
            "max_length": max_length,
            "tokens": token_lengths(model_dir, texts, max_length),
        },
        "texts": len(texts),
        "batches_per_size": batches,
        "results": rows,
    }
    body = markdown(data)
    print(body)
    report.write_section(out, "GPU", body)
    report.write_json(json_path, data)
    return data


def markdown(data: dict[str, Any]) -> str:
    """The GPU section: how it was measured, the table, and what it means."""
    m, model = data["machine"], data["model"]
    at32 = {r["backend"]: r for r in data["results"] if r["batch"] == 32}
    lines = [
        f"Measured {data['date']} with",
        "",
        f"    {data['command']}",
        "",
        f"- Machine: {m['gpu']} (CUDA {m['cuda']}), {m['cpu']}, {m['physical_cores']} cores, "
        f"{m['memory_gib']} GiB, {m['os']}, Python {m['python']}.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".",
        f"- Model: `{model['folder']}` (base {model['base_model'] or 'not recorded'}), labels "
        f"{model['labels']}, max_length "
        f"{model['max_length']}; texts from the {data['texts']} test texts "
        f"({model['tokens']['mean']:.1f} tokens on average), {data['batches_per_size']} timed "
        "batches per size after one untimed one.",
        "",
        report.table(data["results"], COLUMNS),
    ]
    for name, row in at32.items():
        if name.startswith("ort"):
            torch16 = at32.get("pytorch fp16", {}).get("texts_per_s")
            lines.append(
                f"At batch 32, {name} runs at {row['ratio']:.2f}× PyTorch fp32"
                + (f" and {row['texts_per_s'] / torch16:.2f}× PyTorch fp16." if torch16 else ".")
            )
    lines.append(
        "PyTorch is `pipeline('text-classification', device=0, dtype=...)`; ONNX Runtime goes "
        "through `bertrt.load(..., device='cuda', variant=...)`, which binds inputs and outputs "
        "on the GPU (IO binding) and sorts texts by length before batching. Latency is per batch, "
        "tokenisation included. Peak GPU memory is the rise in the device's used memory "
        "(`torch.cuda.mem_get_info`) while a backend loads and runs. Agreement: the share of all "
        "test texts given the same label as PyTorch fp32, at batch 32."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="exported model folder")
    parser.add_argument("--finetuned", type=Path, required=True, help="fine-tuned HF folder")
    parser.add_argument("--test", type=Path, required=True, help="Parquet with a 'text' column")
    parser.add_argument("--out", type=Path, required=True, help="markdown file to update")
    parser.add_argument("--json", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--batches", type=int, default=20, help="timed batches per size")
    parser.add_argument("--max-texts", type=int, default=0, help="0 uses every test text")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv_used = sys.argv[1:] if argv is None else argv
    try:
        run(
            args.model_dir,
            args.finetuned,
            args.test,
            args.out,
            args.json,
            args.batch_sizes,
            args.batches,
            args.max_texts,
            shlex.join(["python", "-m", "benchmarks.gpu", *argv_used]),
        )
    except DeviceError as exc:
        raise NoCudaError(f"benchmarks.gpu: {exc}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
