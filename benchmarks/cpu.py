"""CPU benchmark: the plain transformers pipeline against the exported model's ONNX variants."""

from __future__ import annotations

import argparse
import gc
import logging
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import measure, report
from bertrt.contract import CPU, INT8_VARIANT, OPTIMIZED_VARIANT, TOKENIZER_FILE, VARIANTS

log = logging.getLogger(__name__)

PYTORCH = "pytorch"
# The variants built for the CPU (fp16 is a CUDA variant: the CPU provider wraps its nodes in
# casts, so it is not served here).
ORT_VARIANTS = tuple(name for name, v in VARIANTS.items() if CPU in v.providers)
REFERENCE_BATCH = 32
# A 1-minute load average above this share of the threads used means the CPU was not ours.
BUSY = 0.5
# Marks the int8 graph measured although its accuracy gate kept it out of the model folder.
UNSHIPPED = "(not shipped: failed its gate)"


def columns(batch_sizes: Sequence[int]) -> dict[str, str]:
    """Row key -> table header, one throughput column per batch size."""
    return {
        "backend": "backend",
        "file_mb": "file MB",
        "p50_ms": "p50 ms (b=1)",
        "p95_ms": "p95 ms",
        "p99_ms": "p99 ms",
        **{f"texts_per_s_{b}": f"texts/s b={b}" for b in batch_sizes},
        "peak_rss_mb": "peak RSS +MB",
        "agreement": "agreement",
        f"ratio_{REFERENCE_BATCH}": f"× PyTorch b={REFERENCE_BATCH}",
    }


Predict = Callable[[list[str], int], list[str]]


def pytorch_predictor(
    finetuned: Path, max_length: int, device: int = -1, dtype: Any = None
) -> Predict:
    """Labels from `transformers.pipeline`, the way a model card shows it."""
    from transformers import pipeline

    pipe = pipeline(
        "text-classification",
        model=str(finetuned),
        tokenizer=str(finetuned),
        device=device,
        **({"dtype": dtype} if dtype is not None else {}),
    )

    def predict(texts: list[str], batch_size: int) -> list[str]:
        out = pipe(texts, batch_size=batch_size, truncation=True, max_length=max_length)
        return [row["label"] for row in out]

    return predict


def ort_predictor(model_dir: Path, variant: str, device: str, threads: int = 0) -> Predict:
    """Labels from the standalone runtime on one variant of the model folder."""
    from bertrt.api import load

    # device="cuda" raises DeviceError rather than falling back to the CPU.
    runtime = load(model_dir, device=device, variant=variant, threads=threads)

    def predict(texts: list[str], batch_size: int) -> list[str]:
        return [p.label for p in runtime.predict(texts, batch_size)]

    return predict


def bench_backend(
    make: Callable[[], Predict],
    texts: list[str],
    latency_texts: int,
    batch_sizes: Sequence[int],
) -> tuple[dict[str, Any], list[str]]:
    """Load, batch-1 latency and throughput of one backend; return them and its labels."""
    with measure.PeakMemory() as memory:
        start = time.perf_counter()
        predict = make()
        result: dict[str, Any] = {"load_s": time.perf_counter() - start}
        # Warm-up: the first calls pick kernels and grow the allocators.
        predict(texts[:8], 8)
        singles = [[text] for text in texts[:latency_texts]]
        result.update(
            measure.percentiles_ms(measure.timed_calls(lambda b: predict(b, 1), singles))
        )
        labels: list[str] = []
        for batch_size in batch_sizes:
            start = time.perf_counter()
            got = predict(texts, batch_size)
            result[f"texts_per_s_{batch_size}"] = len(texts) / (time.perf_counter() - start)
            if batch_size == REFERENCE_BATCH or not labels:
                labels = got
    result["peak_rss_mb"] = memory.delta_mb
    return result, labels


def with_unshipped_int8(model_dir: Path, scratch: Path) -> Path | None:
    """A copy of the folder that adds the int8 graph its gate kept out, to measure it anyway."""
    from bertrt import manifest as manifest_io
    from pipeline.export.graphs import to_int8

    manifest = manifest_io.read(model_dir)
    if INT8_VARIANT in manifest.variants or OPTIMIZED_VARIANT not in manifest.variants:
        return None
    folder = scratch / "model"
    shutil.copytree(model_dir, folder)
    entry = manifest_io.VariantEntry.of(INT8_VARIANT, int8_weights=VARIANTS[INT8_VARIANT].weights)
    to_int8(
        folder / VARIANTS[OPTIMIZED_VARIANT].file, folder / entry.file, weights=entry.int8_weights
    )
    manifest.variants[INT8_VARIANT] = entry
    manifest.files = manifest_io.file_entries(folder, [*manifest.files, entry.file])
    manifest_io.write(folder, manifest)
    return folder


def token_lengths(model_dir: Path, texts: list[str], max_length: int) -> dict[str, float]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    lengths = np.array([len(e.ids) for e in tokenizer.encode_batch(texts)])
    return {"mean": float(lengths.mean()), "p95": float(np.percentile(lengths, 95))}


def run(
    model_dir: Path,
    finetuned: Path,
    test: Path,
    out: Path,
    json_path: Path,
    latency_texts: int = 300,
    batch_sizes: Sequence[int] = (32, 128),
    max_texts: int = 0,
    threads: int = 0,
    command: str = "",
    section: str = "CPU",
) -> dict[str, Any]:
    """Benchmark PyTorch and every shipped CPU variant on the test texts; write both reports."""
    # Import cost is measured apart, so each backend's memory is its model and its runs.
    imports = measure.import_rss_mb()
    import pandas as pd
    import torch

    from bertrt import manifest as manifest_io

    manifest = manifest_io.read(model_dir)
    texts = [str(t) for t in pd.read_parquet(test, columns=["text"])["text"]]
    if max_texts:
        texts = texts[:max_texts]
    if not texts:
        raise ValueError(f"{test}: no texts in column 'text'")
    machine = measure.machine()
    threads = threads or machine["physical_cores"] or 1
    torch.set_num_threads(threads)
    max_length = manifest.max_length
    variants = [v for v in ORT_VARIANTS if v in manifest.variants]
    backends: dict[str, Callable[[], Predict]] = {
        PYTORCH: lambda: pytorch_predictor(finetuned, max_length),
        **{
            f"ort {v}": (lambda v=v: ort_predictor(model_dir, v, "cpu", threads)) for v in variants
        },
    }
    folders = {name: model_dir for name in backends}
    scratch = Path(tempfile.mkdtemp(prefix="bench-"))
    unshipped = with_unshipped_int8(model_dir, scratch)
    if unshipped is not None:
        name = f"ort int8 {UNSHIPPED}"
        backends[name] = lambda: ort_predictor(unshipped, INT8_VARIANT, "cpu", threads)
        folders[name] = unshipped
    sizes = sorted({REFERENCE_BATCH, *batch_sizes})
    load = machine["load_average_1min"]
    if load > BUSY * threads:
        # Seen here: torch at 2 threads on 2 busy cores took 520 ms a text instead of 18 ms.
        log.warning(
            "1-minute load average %.2f with %d threads: other processes share the CPU, the "
            "timings will be distorted (OpenMP threads in PyTorch the most); re-run when idle",
            load,
            threads,
        )
    results, labels = {}, {}
    for name, make in backends.items():
        log.info("%s: %d texts, latency over %d", name, len(texts), min(latency_texts, len(texts)))
        results[name], labels[name] = bench_backend(make, texts, latency_texts, sizes)
        gc.collect()
    reference = np.array(labels[PYTORCH])
    for name, result in results.items():
        result["backend"] = name
        result["agreement"] = float((np.array(labels[name]) == reference).mean())
        ratio = (
            result[f"texts_per_s_{REFERENCE_BATCH}"]
            / results[PYTORCH][f"texts_per_s_{REFERENCE_BATCH}"]
        )
        result[f"ratio_{REFERENCE_BATCH}"] = ratio
        if name != PYTORCH:
            folder_manifest = manifest_io.read(folders[name])
            variant = name.removeprefix("ort ").removesuffix(f" {UNSHIPPED}")
            file = folder_manifest.variants[variant].file
            result["file_mb"] = folder_manifest.files[file]["bytes"] / 2**20
    shutil.rmtree(scratch, ignore_errors=True)
    data = {
        "module": "benchmarks.cpu",
        "heading": section,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "versions": measure.versions(),
        "threads": threads,
        "model": {
            "base_model": manifest.provenance.base_model.name if manifest.provenance else None,
            "folder": str(model_dir),
            "labels": manifest.labels,
            "max_length": max_length,
            "tokens": token_lengths(model_dir, texts, max_length),
        },
        "import_rss_mb": imports,
        "texts": len(texts),
        "latency_texts": min(latency_texts, len(texts)),
        "batch_sizes": sizes,
        "results": results,
    }
    report.save(data, out, json_path)
    return data


def markdown(data: dict[str, Any]) -> str:
    """The CPU section: how it was measured, the table, and what it means."""
    m, model = data["machine"], data["model"]
    rows = list(data["results"].values())
    lines = [
        f"Measured {data['date']} with",
        "",
        f"    {data['command']}",
        "",
        f"- Machine: {m['cpu']} (flags: {', '.join(m['cpu_flags']) or 'none listed'}), "
        f"{m['physical_cores']} cores / {m['logical_cores']} threads, {m['memory_gib']} GiB, "
        f"{m['os']}, Python {m['python']}; 1-minute load average {m['load_average_1min']:.2f} "
        "when it started"
        + (
            f", run under `python -m benchmarks.isa avx2`: CPUID hid "
            f"{', '.join(m['masked_flags'])}, so every library ran its AVX2 kernels"
            if m.get("masked_flags")
            else ""
        )
        + (
            " (**the CPU was shared with other processes: timings are distorted**)."
            if m["load_average_1min"] > BUSY * data["threads"]
            else "."
        ),
        f"- Threads: {data['threads']} for PyTorch and for ONNX Runtime.",
        f"- Versions: {report.versions_line(data)}.",
        f"- Model: `{model['folder']}` (base {model['base_model'] or 'not recorded'}), labels "
        f"{model['labels']}, max_length "
        f"{model['max_length']}; {data['texts']} test texts, {model['tokens']['mean']:.1f} tokens "
        f"on average (p95 {model['tokens']['p95']:.0f}). Latency: {data['latency_texts']} texts "
        "one at a time; throughput: all the texts at each batch size.",
        "",
        report.table(rows, columns(data["batch_sizes"])),
    ]
    ours = [r for r in rows if r["backend"] != PYTORCH]
    if ours:
        ratios = ", ".join(
            f"{r[f'ratio_{REFERENCE_BATCH}']:.2f}× on {r['backend'].removeprefix('ort ')}"
            for r in ours
        )
        lines.append(
            f"At batch {REFERENCE_BATCH}, `bertrt` runs at {ratios} the throughput of the "
            "transformers pipeline; agreement is the share of texts given the same label as it."
        )
    lines.append(
        "PyTorch is `pipeline('text-classification', device=-1)`; ONNX Runtime goes through "
        "`bertrt.load(..., device='cpu', variant=...)`, which sorts texts by length and cuts "
        "batches (of at most the batch size) where padding would cost more than a run. Peak "
        "RSS is the rise in the process's resident memory from just before a backend loads "
        "to the end of its runs, sampled every 10 ms in one process after the "
        "libraries were imported (importing onnxruntime added "
        f"{data['import_rss_mb']['onnxruntime']:.0f} MB, torch and transformers "
        f"{data['import_rss_mb']['torch+transformers']:.0f} MB); memory a previous backend "
        "freed may be reused, which understates the later rows."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="exported model folder")
    parser.add_argument("--finetuned", type=Path, required=True, help="fine-tuned HF folder")
    parser.add_argument("--test", type=Path, required=True, help="Parquet with a 'text' column")
    parser.add_argument("--out", type=Path, required=True, help="markdown file to update")
    parser.add_argument("--json", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--latency-texts", type=int, default=300)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--max-texts", type=int, default=0, help="0 uses every test text")
    parser.add_argument("--threads", type=int, default=0, help="0: one per physical core")
    parser.add_argument("--section", default="CPU", help="heading of the section to replace")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = shlex.join(
        ["python", "-m", "benchmarks.cpu", *(sys.argv[1:] if argv is None else argv)]
    )
    run(
        args.model_dir,
        args.finetuned,
        args.test,
        args.out,
        args.json,
        args.latency_texts,
        args.batch_sizes,
        args.max_texts,
        args.threads,
        command,
        args.section,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
