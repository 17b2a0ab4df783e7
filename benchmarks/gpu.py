"""GPU benchmark: PyTorch fp32, fp16 and bf16 against ONNX Runtime CUDA with IO binding (and
TensorRT where its libraries load), on the test texts' own lengths and on texts of a fixed 128
tokens, batch 1 to 256; then the model alone (token ids already on the GPU) at 128 tokens.

    python -m benchmarks.gpu --model-dir models/onnx --finetuned models/finetuned \
        --test data/validated/test.parquet --out docs/benchmarks.md --json reports/bench_gpu.json

`--device cpu` runs the same harness on the CPU (every GPU-only row left out) to check it on a
machine without a GPU; its numbers say nothing about a GPU and it writes no section.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import measure, report
from benchmarks.cpu import Predict, token_lengths
from bertrt.contract import CUDA, FP16_VARIANT, OPTIMIZED_VARIANT, TENSORRT, TOKENIZER_FILE
from bertrt.session import DeviceError

log = logging.getLogger(__name__)

REFERENCE = "pytorch fp32"
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FIXED_BATCH_SIZES = (1, 32, 256)
MODEL_ONLY_BATCH_SIZES = (32, 256, 1024)
FIXED_TOKENS = 128
# ONNX Runtime on CUDA: fp16 (every fusion) is the variant the runtime picks there;
# fp32-optimized (fused for the CPU: attention unfused) its fallback.
ORT_VARIANTS = (FP16_VARIANT, OPTIMIZED_VARIANT)
TRT = "ort tensorrt fp16"
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
MODEL_ONLY_COLUMNS = {
    "backend": "backend",
    "batch": "batch",
    "ms_per_batch": "ms/batch",
    "sequences_per_s": "sequences/s",
}


class NoCudaError(SystemExit):
    """No CUDA device, or a stack that cannot use it; the message says which."""


class Unavailable(RuntimeError):
    """A backend this machine cannot run as asked (TensorRT without its libraries)."""


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
    if CUDA not in ort.get_available_providers():
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


def fixed_length_texts(texts: list[str], model_dir: Path, tokens: int, count: int) -> list[str]:
    """Up to `count` texts of exactly `tokens` tokens (special tokens included), each made of
    consecutive test texts joined and cut at a token's end."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    stream = itertools.cycle(texts)
    made: list[str] = []
    for _ in range(count * 2):
        text = next(stream)
        encoding = tokenizer.encode(text)
        while len(encoding.ids) < tokens + 8:
            text = f"{text} {next(stream)}"
            encoding = tokenizer.encode(text)
        content = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
        specials = len(encoding.ids) - len(content)
        cut = text[: encoding.offsets[content[tokens - specials - 1]][1]]
        if len(tokenizer.encode(cut).ids) == tokens:  # a cut inside a word can re-tokenise
            made.append(cut)
        if len(made) == count:
            break
    return made


def batches_of(texts: list[str], size: int, count: int) -> list[list[str]]:
    """`count` consecutive batches of `size`, cycling through `texts` when they run out."""
    stream = itertools.cycle(texts)
    return [[next(stream) for _ in range(size)] for _ in range(count)]


def sweep(
    predict: Predict, texts: list[str], batch_sizes: Sequence[int], batches: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-batch latency and throughput at each size, and the labels of `texts` at batch 32."""
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
    return rows, predict(texts, 32)


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed_runs(step: Callable[[], Any], runs: int, sync: Callable[[], Any]) -> float:
    """Seconds per call of `step` over `runs` calls, after two untimed ones; `sync` waits for
    the device to finish what was queued."""
    for _ in range(2):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(runs):
        step()
    sync()
    return (time.perf_counter() - start) / runs


def token_ids(batch: int, tokens: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Ids of ordinary tokens (past the first 1,000, where BERT vocabularies keep specials)."""
    rng = np.random.default_rng(seed)
    return rng.integers(min(1000, vocab - 1), vocab, size=(batch, tokens), dtype=np.int64)


class OrtBackend:
    """A variant through the runtime: texts end to end, or the graph alone on bound ids."""

    def __init__(self, model_dir: Path, variant: str | None, device: str, tensorrt: bool) -> None:
        from bertrt.api import load

        # device="cuda" raises DeviceError rather than falling back to the CPU.
        self.runtime = load(model_dir, device=device, variant=variant, tensorrt=tensorrt)
        self.device = device
        if tensorrt and self.runtime.provider != TENSORRT:
            raise Unavailable(
                f"TensorRT did not load (the session runs on {self.runtime.provider}); install "
                "TensorRT's libraries where onnxruntime-gpu finds them to measure it"
            )

    def predict(self, texts: list[str], batch_size: int) -> list[str]:
        return [p.label for p in self.runtime.predict(texts, batch_size)]

    def model_only(self, batch: int, tokens: int, runs: int) -> float:
        """Seconds per run of the graph on `batch` x `tokens` ids bound where it computes."""
        import onnxruntime as ort

        engine = self.runtime.engine
        session = engine.session
        vocab = engine.tokenizer.get_vocab_size()
        arrays = {
            "input_ids": token_ids(batch, tokens, vocab),
            "attention_mask": np.ones((batch, tokens), dtype=np.int64),
            "token_type_ids": np.zeros((batch, tokens), dtype=np.int64),
        }
        place = "cuda" if self.device == "cuda" else "cpu"
        binding = session.io_binding()
        for name in engine.input_names:  # bound once: no copies in the timed runs
            binding.bind_ortvalue_input(
                name, ort.OrtValue.ortvalue_from_numpy(arrays[name], place, 0)
            )
        binding.bind_output(engine.output_name, place, 0)
        return timed_runs(
            lambda: session.run_with_iobinding(binding), runs, binding.synchronize_outputs
        )


class TorchBackend:
    """The fine-tuned model in PyTorch: the pipeline end to end, or its module on tensors."""

    def __init__(self, finetuned: Path, max_length: int, dtype: Any, device: str) -> None:
        from transformers import pipeline

        self.pipe = pipeline(
            "text-classification",
            model=str(finetuned),
            tokenizer=str(finetuned),
            device=0 if device == "cuda" else -1,
            dtype=dtype,
        )
        self.max_length, self.device = max_length, device

    def predict(self, texts: list[str], batch_size: int) -> list[str]:
        out = self.pipe(texts, batch_size=batch_size, truncation=True, max_length=self.max_length)
        return [row["label"] for row in out]

    def model_only(self, batch: int, tokens: int, runs: int) -> float:
        import torch

        module = self.pipe.model  # the pipeline's own: no second copy on the device
        ids = torch.from_numpy(token_ids(batch, tokens, module.config.vocab_size))
        ids = ids.to(module.device)
        mask = torch.ones_like(ids)

        def step() -> Any:
            with torch.inference_mode():
                return module(input_ids=ids, attention_mask=mask).logits

        return timed_runs(step, runs, lambda: synchronize(self.device))


def backends(
    model_dir: Path, finetuned: Path, max_length: int, shipped: Sequence[str], device: str
) -> dict[str, Callable[[], Any]]:
    """Name -> loader, ONNX Runtime first: a CUDA provider that cannot start fails before the
    long PyTorch runs. TensorRT, bf16 and the GPU-only rows only where they can run."""
    import onnxruntime as ort
    import torch

    made: dict[str, Callable[[], Any]] = {
        f"ort {'cuda' if device == 'cuda' else 'cpu'} {v}": (
            lambda v=v: OrtBackend(model_dir, v, device, tensorrt=False)
        )
        for v in ORT_VARIANTS
        if v in shipped
    }
    if device == "cuda" and TENSORRT in ort.get_available_providers():
        # The runtime gives TensorRT the plain graph (it parses no fused ONNX Runtime
        # operators) and TensorRT builds its fp16 engine from it.
        made[TRT] = lambda: OrtBackend(model_dir, None, device, tensorrt=True)
    made[REFERENCE] = lambda: TorchBackend(finetuned, max_length, torch.float32, device)
    made["pytorch fp16"] = lambda: TorchBackend(finetuned, max_length, torch.float16, device)
    if device != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False):
        made["pytorch bf16"] = lambda: TorchBackend(finetuned, max_length, torch.bfloat16, device)
    return made


def compare_to_reference(
    rows: list[dict[str, Any]], labels: dict[tuple[str, str], list[str]]
) -> None:
    """Per row, its label agreement with PyTorch fp32's on the same workload and its speed over
    PyTorch fp32's at the same batch (None where the reference did not run)."""
    speed = {
        (r["workload"], r["batch"]): r["texts_per_s"] for r in rows if r["backend"] == REFERENCE
    }
    for row in rows:
        reference = labels.get((REFERENCE, row["workload"]))
        got = labels[row["backend"], row["workload"]]
        # Without the reference (it failed) there is nothing to compare with.
        row["agreement"] = (
            float((np.array(got) == np.array(reference)).mean()) if reference else None
        )
        base = speed.get((row["workload"], row["batch"]))
        row["ratio"] = row["texts_per_s"] / base if base else None


def run(
    model_dir: Path,
    finetuned: Path,
    test: Path,
    out: Path | None,
    json_path: Path | None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    batches: int = 20,
    max_texts: int = 0,
    command: str = "",
    device: str = "cuda",
    fixed_batch_sizes: Sequence[int] = FIXED_BATCH_SIZES,
    model_only_batch_sizes: Sequence[int] = MODEL_ONLY_BATCH_SIZES,
    model_only_runs: int = 50,
) -> dict[str, Any]:
    """Sweep batch sizes for PyTorch and ONNX Runtime on both workloads, time the model alone
    at FIXED_TOKENS; write both reports (on CUDA only)."""
    gpu = require_cuda() if device == "cuda" else "none: the harness run on the CPU"
    import pandas as pd
    import torch

    from bertrt import manifest as manifest_io

    manifest = manifest_io.read(model_dir)
    texts = [str(t) for t in pd.read_parquet(test, columns=["text"])["text"]]
    texts = texts[:max_texts] if max_texts else texts
    if not texts:
        raise ValueError(f"{test}: no texts in column 'text'")
    max_length = manifest.max_length
    tokens = min(FIXED_TOKENS, max_length)
    fixed = fixed_length_texts(texts, model_dir, tokens, max(fixed_batch_sizes) * 4)
    if not fixed:
        raise ValueError(f"no text of exactly {tokens} tokens could be made from {test}")
    workloads = {
        "test texts": (texts, batch_sizes),
        f"{tokens} tokens": (fixed, fixed_batch_sizes),
    }
    read = device_used_bytes if device == "cuda" else measure.rss_bytes
    rows, model_rows, labels, notes = [], [], {}, []
    made = backends(model_dir, finetuned, max_length, list(manifest.variants), device)
    for name, make in made.items():
        log.info("%s: %s", name, {w: list(b) for w, (_, b) in workloads.items()})
        backend, got_rows = None, []
        try:  # one backend failing (an engine build, out of memory) costs its rows only
            with measure.PeakMemory(read) as memory:  # loading and the end-to-end runs
                backend = make()
                for workload, (work, sizes) in workloads.items():
                    got, labels[name, workload] = sweep(backend.predict, work, sizes, batches)
                    got_rows += [{"backend": name, "workload": workload, **r} for r in got]
            for row in got_rows:
                row["peak_device_mb"] = memory.delta_mb
            rows += got_rows
            for size in model_only_batch_sizes:
                try:
                    seconds = backend.model_only(size, tokens, model_only_runs)
                except Exception as exc:
                    notes.append(f"{name}, the model alone at batch {size}: failed ({exc})")
                    continue
                model_rows.append(
                    {
                        "backend": name,
                        "batch": size,
                        "ms_per_batch": seconds * 1e3,
                        "sequences_per_s": size / seconds,
                    }
                )
        except Unavailable as exc:
            notes.append(f"{name}: left out: {exc}")
        except Exception as exc:
            log.exception("%s failed", name)
            notes.append(f"{name}: failed, its rows left out ({type(exc).__name__}: {exc})")
        finally:
            backend = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    compare_to_reference(rows, labels)
    data = {
        "module": "benchmarks.gpu",
        "heading": "GPU",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "device": device,
        "machine": {**measure.machine(), "gpu": gpu, "cuda": torch.version.cuda},
        "versions": measure.versions(),
        "model": {
            "base_model": manifest.provenance.base_model.name if manifest.provenance else None,
            "folder": str(model_dir),
            "labels": manifest.labels,
            "max_length": max_length,
            "tokens": token_lengths(model_dir, texts, max_length),
        },
        "texts": len(texts),
        "fixed_tokens": tokens,
        "fixed_texts": len(fixed),
        "batches_per_size": batches,
        "model_only_runs": model_only_runs,
        "results": rows,
        "model_only": model_rows,
        "notes": notes,
    }
    if device == "cuda" and out is not None and json_path is not None:
        report.save(data, out, json_path)
    else:
        print(report.render(data))
    return data


def markdown(data: dict[str, Any]) -> str:
    """The GPU section: how it was measured, the tables, and what they mean."""
    m, model = data["machine"], data["model"]
    lines = [
        f"Measured {data['date']} with",
        "",
        f"    {data['command']}",
        "",
        f"- Machine: {m['gpu']} (CUDA {m['cuda']}), {m['cpu']}, {m['physical_cores']} cores, "
        f"{m['memory_gib']} GiB, {m['os']}, Python {m['python']}.",
        f"- Versions: {report.versions_line(data)}.",
        f"- Model: `{model['folder']}` (base {model['base_model'] or 'not recorded'}), labels "
        f"{model['labels']}, max_length {model['max_length']}. Workloads: the "
        f"{data['texts']} test texts ({model['tokens']['mean']:.1f} tokens on average), and "
        f"{data['fixed_texts']} texts of exactly {data['fixed_tokens']} tokens (test texts "
        f"joined and cut at a token); {data['batches_per_size']} timed batches per size after "
        "one untimed one.",
        *[f"- {note}" for note in data["notes"]],
    ]
    workloads = list(dict.fromkeys(r["workload"] for r in data["results"]))
    for workload in workloads:
        rows = [r for r in data["results"] if r["workload"] == workload]
        lines += ["", f"### {workload.capitalize()}", "", report.table(rows, COLUMNS).rstrip()]
        at32 = {r["backend"]: r for r in rows if r["batch"] == 32}
        torch16 = at32.get("pytorch fp16", {}).get("texts_per_s")
        said = [
            f"At batch 32, {name} runs at {row['ratio']:.2f}× PyTorch fp32"
            + (f" and {row['texts_per_s'] / torch16:.2f}× PyTorch fp16." if torch16 else ".")
            for name, row in at32.items()
            if name.startswith("ort") and row["ratio"] is not None
        ]
        lines += ["", *said] if said else []
    if data["model_only"]:
        best = max(data["model_only"], key=lambda r: r["sequences_per_s"])
        lines += [
            "",
            f"### The model alone, {data['fixed_tokens']} tokens",
            "",
            report.table(data["model_only"], MODEL_ONLY_COLUMNS).rstrip(),
            "",
            f"Token ids already where the model computes (ONNX Runtime: bound once with IO "
            f"binding; PyTorch: tensors on the device), the mean of {data['model_only_runs']} "
            f"runs after two untimed ones. Fastest: {best['backend']} at batch {best['batch']}, "
            f"{best['sequences_per_s']:,.0f} sequences/s.",
        ]
    lines += [
        "",
        "PyTorch end to end is `pipeline('text-classification', device=0, dtype=...)`; ONNX "
        "Runtime goes through `bertrt.load(..., device='cuda', variant=...)` (TensorRT: "
        "`tensorrt=True`: TensorRT builds its fp16 engine from the plain graph, since it parses "
        "none of ONNX Runtime's fused operators; one optimisation profile covers batch 1 to "
        "1,024 and every length), which binds inputs and outputs on the GPU (IO binding) and "
        "sorts texts by length before batching. Latency is per batch, tokenisation included. "
        "Peak GPU memory is the rise in the device's used memory (`torch.cuda.mem_get_info`) "
        "while a backend loads and runs end to end (not the model-alone runs). Agreement: the "
        "share of the workload's texts given the same label as PyTorch fp32, at batch 32.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="exported model folder")
    parser.add_argument("--finetuned", type=Path, required=True, help="fine-tuned HF folder")
    parser.add_argument("--test", type=Path, required=True, help="Parquet with a 'text' column")
    parser.add_argument("--out", type=Path, required=True, help="markdown file to update")
    parser.add_argument("--json", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument(
        "--fixed-batch-sizes", type=int, nargs="+", default=list(FIXED_BATCH_SIZES)
    )
    parser.add_argument(
        "--model-only-batch-sizes", type=int, nargs="+", default=list(MODEL_ONLY_BATCH_SIZES)
    )
    parser.add_argument("--batches", type=int, default=20, help="timed batches per size")
    parser.add_argument("--model-only-runs", type=int, default=50)
    parser.add_argument("--max-texts", type=int, default=0, help="0 uses every test text")
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: check the harness without a GPU (prints, writes nothing)",
    )
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
            args.device,
            args.fixed_batch_sizes,
            args.model_only_batch_sizes,
            args.model_only_runs,
        )
    except DeviceError as exc:
        raise NoCudaError(f"benchmarks.gpu: {exc}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
