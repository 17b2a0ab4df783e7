"""The GPU check's parts, each run in its own process by `benchmarks.gpu_check` under its own
time limit: the machine's facts, the gpu-marked tests, inference (ONNX Runtime CUDA fp16 and
fp32-optimized with IO binding against PyTorch fp32, fp16 and bf16) and fine-tuning speed with
MFU. A part writes what it has measured after every step, so one stopped at its limit still
leaves its rows, and last the modules it imported and where from.

    python -m benchmarks.gpu_parts PART SPEC.json

Each part imports torch before onnxruntime: torch loads the CUDA libraries that onnxruntime-gpu's
CUDA provider links (ONNX Runtime's documented way, instead of `onnxruntime.preload_dlls`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import gpu_stack

log = logging.getLogger(__name__)

# A gpu-marked test: the decorator, or a module-wide `pytestmark`.
GPU_MARK = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bpytest\.mark\.gpu\b)", re.M)


class Record:
    """A part's results, rewritten whole (atomically) after every step."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def nvidia_smi() -> dict[str, str] | str:
    """The driver's view of GPU 0, or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    fields = "name,driver_version,memory.total,compute_cap,power.limit,clocks.max.sm"
    done = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        return f"nvidia-smi failed: {(done.stderr or done.stdout).strip()[:300]}"
    values = [v.strip() for v in done.stdout.splitlines()[0].split(",")]
    return dict(zip(fields.split(","), values, strict=False))


def versions() -> dict[str, str]:
    """The stack's distributions as this process sees them (the carried ones included)."""
    dists, _ = gpu_stack.closure(gpu_stack.STACK + gpu_stack.CARRIED)
    return {dist.metadata["Name"]: dist.version for dist in dists.values()}


def cuda_session(folder: Path, device: str) -> dict[str, Any]:
    """Whether an ONNX Runtime session starts on `device` (a one-node graph), and on what."""
    import onnx
    from onnx import TensorProto, helper

    from bertrt.session import DeviceError, start_session

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # one every ONNX Runtime since 1.10 reads
    path = folder / "probe.onnx"
    onnx.save(model, str(path))
    try:
        return {"provider": start_session(path, device)[1]}
    except DeviceError as exc:
        import onnxruntime as ort

        if not hasattr(ort, "preload_dlls"):
            return {"error": str(exc)}
        ort.preload_dlls()  # then try once more: says whether the libraries were the problem
        try:
            return {"error": str(exc), "after_preload_dlls": start_session(path, device)[1]}
        except DeviceError as again:
            return {"error": str(exc), "after_preload_dlls": f"failed too: {again}"}


def env(spec: dict[str, Any], rec: Record) -> None:
    """GPU, driver, CUDA, cuDNN and the versions that ran."""
    import torch

    from benchmarks import measure

    cuda = torch.cuda.is_available()
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nvidia_smi": nvidia_smi(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        facts |= {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
            "bf16_peak_tflops": measure.bf16_peak_tflops(props.name),
        }
    rec.data["facts"] = facts
    rec.save()
    import onnxruntime as ort

    facts["onnxruntime"] = {
        "version": ort.__version__,
        "file": ort.__file__,
        "providers": ort.get_available_providers(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        facts["onnxruntime"]["session"] = cuda_session(Path(tmp), spec["device"])
    facts["machine"] = measure.machine()
    facts["versions"] = versions()
    rec.save()


def gpu_test_files(tests: Path) -> list[str]:
    """The test modules that hold gpu-marked tests (only those are collected: the others import
    what the GPU machine lacks, such as mlflow and dvc)."""
    return sorted(
        str(path.relative_to(gpu_stack.REPO))
        for path in tests.glob("test_*.py")
        if GPU_MARK.search(path.read_text(encoding="utf-8"))
    )


def tests(spec: dict[str, Any], rec: Record) -> None:
    """`pytest -m gpu` on the modules that have gpu-marked tests; each outcome as it comes."""
    import pytest
    import torch  # noqa: F401 - before onnxruntime, for its CUDA libraries (module docstring)

    files = gpu_test_files(gpu_stack.REPO / "tests")
    rec.data |= {"files": files, "tests": []}

    class Recorder:
        def pytest_runtest_logreport(self, report: Any) -> None:
            if report.when != "call" and report.passed:
                return
            entry = {
                "test": report.nodeid,
                "when": report.when,
                "outcome": report.outcome,
                "seconds": round(report.duration, 2),
            }
            if report.skipped and isinstance(report.longrepr, tuple):
                entry["reason"] = str(report.longrepr[2]).removeprefix("Skipped: ")
            elif report.failed:
                entry["reason"] = report.longreprtext[-3000:]
            rec.data["tests"].append(entry)
            rec.save()

    basetemp = Path(tempfile.mkdtemp(prefix="gpu-check-pytest-"))
    args = ["-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", f"--basetemp={basetemp}/t"]
    try:
        code = pytest.main(
            [*args, *files],
            plugins=[Recorder()],
        )
    finally:
        shutil.rmtree(basetemp, ignore_errors=True)
    rec.data["exit_code"] = int(code)
    rec.save()
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        raise SystemExit(f"pytest -m gpu exited with {code!r}")


def compare(data: dict[str, Any], labels: dict[tuple[str, str], list[str]]) -> None:
    """Agreement with PyTorch fp32's labels and speed over its, per row."""
    from benchmarks.gpu import compare_to_reference

    compare_to_reference(data["results"], labels)


def headline(data: dict[str, Any]) -> dict[str, Any]:
    """The fastest backend on texts of the fixed length end to end, and of the model alone."""
    fixed = f"{data['fixed_tokens']} tokens"
    rows = [r for r in data["results"] if r["workload"] == fixed]
    best: dict[str, Any] = {}
    if rows:
        top = max(rows, key=lambda r: r["texts_per_s"])
        best["end_to_end"] = {k: top[k] for k in ("backend", "batch", "texts_per_s")}
    if data["model_only"]:
        top = max(data["model_only"], key=lambda r: r["sequences_per_s"])
        best["model_only"] = {k: top[k] for k in ("backend", "batch", "sequences_per_s")}
    return best


def inference(spec: dict[str, Any], rec: Record) -> None:
    """Every backend of benchmarks.gpu but TensorRT, on the test texts and on texts of 128
    tokens at each batch size, then the model alone on bound token ids."""
    import pandas as pd
    import torch

    from benchmarks import gpu, measure
    from benchmarks.cpu import token_lengths
    from bertrt import manifest as manifest_io

    device, cuda = spec["device"], spec["device"] == "cuda"
    name = gpu.require_cuda() if cuda else "none: the check rehearsed on the CPU"
    model_dir, finetuned = Path(spec["model_dir"]), Path(spec["finetuned"])
    manifest = manifest_io.read(model_dir)
    test = Path(spec["validated"]) / "test.parquet"
    texts = [str(t) for t in pd.read_parquet(test, columns=["text"])["text"]]
    tokens = min(gpu.FIXED_TOKENS, manifest.max_length)
    sizes = spec["batch_sizes"]
    fixed = gpu.fixed_length_texts(texts, model_dir, tokens, max(sizes) * 4)
    workloads = {"test texts": texts, f"{tokens} tokens": fixed}
    data: dict[str, Any] = {
        "date": spec["date"],
        "command": spec["command"],
        "device": device,
        "machine": {**measure.machine(), "gpu": name, "cuda": torch.version.cuda},
        "versions": measure.versions(),
        "model": {
            "base_model": (manifest.provenance.base_model.name if manifest.provenance else None),
            "folder": str(model_dir),
            "labels": manifest.labels,
            "max_length": manifest.max_length,
            "tokens": token_lengths(model_dir, texts, manifest.max_length),
        },
        "texts": len(texts),
        "fixed_tokens": tokens,
        "fixed_texts": len(fixed),
        "batches_per_size": spec["batches"],
        "model_only_runs": spec["model_only_runs"],
        "results": [],
        "model_only": [],
        "notes": [],
    }
    labels: dict[tuple[str, str], list[str]] = {}

    def save() -> None:
        compare(data, labels)
        rec.data |= {"inference": data, "headline": headline(data)}
        rec.data["markdown"] = gpu.markdown(data)
        rec.save()

    made = gpu.backends(model_dir, finetuned, manifest.max_length, list(manifest.variants), device)
    made.pop(gpu.TRT, None)  # TensorRT's libraries are not on the machine
    read: Callable[[], int] = gpu.device_used_bytes if cuda else measure.rss_bytes
    for backend_name, make in made.items():
        backend, rows = None, []
        try:  # one backend failing costs its rows only
            with measure.PeakMemory(read) as memory:
                backend = make()
                for workload, work in workloads.items():
                    got, labels[backend_name, workload] = gpu.sweep(
                        backend.predict, work, sizes, spec["batches"]
                    )
                    rows += [{"backend": backend_name, "workload": workload, **r} for r in got]
                    data["results"] += rows[-len(got) :]
                    save()
            for row in rows:
                row["peak_device_mb"] = memory.delta_mb
            for size in spec["model_only_batch_sizes"]:
                seconds = backend.model_only(size, tokens, spec["model_only_runs"])
                data["model_only"].append(
                    {
                        "backend": backend_name,
                        "batch": size,
                        "ms_per_batch": seconds * 1e3,
                        "sequences_per_s": size / seconds,
                    }
                )
                save()
        except Exception as exc:
            log.exception("%s failed", backend_name)
            data["notes"].append(f"{backend_name}: failed ({type(exc).__name__}: {exc})")
        finally:
            backend = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        save()


def training_data(finetuned: Path, validated: Path, rows: int, max_length: int) -> dict[str, Any]:
    """What benchmarks.train_cls.train_once trains on, as lists of encoded rows: its own
    `prepare` builds `datasets` objects, and `datasets` is not on the GPU machine."""
    import pandas as pd
    from transformers import AutoConfig, AutoTokenizer

    from benchmarks import measure
    from pipeline.core import layout

    tokenizer = AutoTokenizer.from_pretrained(finetuned)
    config = AutoConfig.from_pretrained(finetuned)
    full = pd.read_parquet(layout.split_file(validated, layout.TRAIN))
    train = full.sample(n=rows, random_state=42) if 0 < rows < len(full) else full
    validation = pd.read_parquet(layout.split_file(validated, layout.VALIDATION))
    ids = {label: i for i, label in enumerate(sorted(set(full["label"])))}
    length = min(max_length, config.max_position_embeddings)

    def encode(frame: pd.DataFrame, padding: bool | str) -> list[dict[str, Any]]:
        enc = tokenizer(
            frame["text"].tolist(), truncation=True, max_length=length, padding=padding
        )
        return [
            {**{k: enc[k][i] for k in enc}, "labels": ids[label]}
            for i, label in enumerate(frame["label"])
        ]

    dynamic = encode(train, False)
    lengths = [len(row["input_ids"]) for row in dynamic]
    flops = measure.encoder_training_flops(config, lengths, len(ids))
    return {
        "model": str(finetuned),
        "tokenizer": tokenizer,
        "fixed": encode(train, "max_length"),
        "dynamic": dynamic,
        "flops_per_text": flops / len(lengths),
        "validation": encode(validation, False),
        "num_labels": len(ids),
        "rows": len(train),
    }


def training(spec: dict[str, Any], rec: Record) -> None:
    """The plain recipe against this pipeline's settings (bf16 where native), one epoch each,
    from the fine-tuned weights; on CUDA with peak memory, model TFLOP/s and MFU."""
    import torch

    from benchmarks import measure, train_cls

    device = spec["device"]
    machine = measure.machine()
    if device == "cuda":
        machine |= train_cls.cuda_machine(None)
        torch.ones(64, 64, device="cuda").matmul(torch.ones(64, 64, device="cuda"))
        torch.cuda.synchronize()  # CUDA's start-up is not the first row's training time
    threads = machine["logical_cores"]
    data = training_data(
        Path(spec["finetuned"]), Path(spec["validated"]), spec["train_rows"], train_cls.MAX_LENGTH
    )
    bf16, no_bf16 = train_cls.bf16_available(device)
    tf32 = train_cls.tf32_available(device)
    settings = train_cls.SETTINGS[device]
    runnable = [n for n, s in settings.items() if (bf16 or not s.bf16) and (tf32 or not s.tf32)]
    notes = [] if bf16 else [f"bf16 autocast: skipped, {no_bf16}"]
    notes.append(
        f"Trained from the fine-tuned weights (`{spec['finetuned']}`): the speed and MFU are the "
        "base model's; the accuracy starts high."
    )
    result: dict[str, Any] = {
        "device": device,
        "model": spec["finetuned"],
        "rows": data["rows"],
        "threads": threads,
        "results": [],
        "notes": notes,
    }
    peak = machine.get("bf16_peak_tflops")
    for name in (train_cls.PLAIN, runnable[-1]):
        row = train_cls.train_once(name, settings[name], data, threads, device=device)
        if peak and "model_tflops" in row:
            row["mfu_percent"] = 100 * row["model_tflops"] / peak
        result["results"].append(row)
        for done in result["results"]:
            done["speedup"] = done["samples_per_s"] / result["results"][0]["samples_per_s"]
        rec.data |= {"training": result, "machine": machine}
        rec.data["markdown"] = train_cls.markdown(
            {**result, "command": spec["command"], "machine": machine}
        )
        rec.save()


PARTS: dict[str, Callable[[dict[str, Any], Record], None]] = {
    "env": env,
    "tests": tests,
    "inference": inference,
    "training": training,
}


def main(argv: list[str] | None = None) -> int:
    name, spec_path = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rec = Record(Path(spec["results"]))
    try:
        PARTS[name](spec, rec)
    finally:
        rec.data["modules"] = gpu_stack.imported()
        rec.data["python_path"] = sys.path
        rec.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
