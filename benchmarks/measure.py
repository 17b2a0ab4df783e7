"""Timing, peak memory and machine facts for the benchmarks."""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil

PACKAGES = ("torch", "transformers", "onnxruntime-gpu", "onnxruntime", "tokenizers", "numpy")
# CPU flags that decide which int8 and fp32 kernels ONNX Runtime picks.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
# Names the flags `benchmarks.isa` hid from CPUID, for a process it runs.
MASKED_ENV = "BENCH_MASKED_FLAGS"


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


class PeakMemory:
    """Sample a memory reading in a thread; `delta_mb` is the peak over the start, in MiB."""

    def __init__(self, read: Callable[[], int] = rss_bytes, interval_s: float = 0.01) -> None:
        self.read, self.interval_s = read, interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def import_rss_mb() -> dict[str, float]:
    """Resident memory each backend's libraries add when imported, in MiB (first import only)."""
    before = rss_bytes()
    import bertrt.api  # noqa: F401 - imported for its memory cost

    middle = rss_bytes()
    import torch  # noqa: F401
    from transformers import pipeline  # noqa: F401

    after = rss_bytes()
    return {
        "onnxruntime": (middle - before) / 2**20,
        "torch+transformers": (after - middle) / 2**20,
    }


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def timed_calls(fn: Callable[[list[str]], Any], batches: Sequence[list[str]]) -> list[float]:
    """Wall time of `fn` on each batch, in seconds."""
    out = []
    for batch in batches:
        start = time.perf_counter()
        fn(batch)
        out.append(time.perf_counter() - start)
    return out


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def masked_flags() -> list[str]:
    """The flags `benchmarks.isa` hid from CPUID for this process (none when not run under it)."""
    return [f for f in os.environ.get(MASKED_ENV, "").split(",") if f]


def proc_flags() -> set[str]:
    """Every flag /proc/cpuinfo lists (none where it cannot be read)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_flags() -> list[str]:
    """The FLAGS this CPU has, less those hidden from CPUID (the kernels the libraries chose)."""
    present = proc_flags() - set(masked_flags())
    return [flag for flag in FLAGS if flag in present]


def machine() -> dict[str, Any]:
    """CPU, cores, memory, OS and the load other processes put on the machine at the start."""
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "masked_flags": masked_flags(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],
    }


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s, matched in
# order against torch.cuda.get_device_name(): the first name part found wins, so a longer name
# comes before any name it contains. None: no published figure (pass --peak-tflops).
BF16_DENSE_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", None),  # AWS's variant of the A10: no data sheet
    ("A10", 125.0),
)


def bf16_peak_tflops(gpu_name: str) -> float | None:
    """The GPU's dense bf16 peak in TFLOP/s, or None when it is not known."""
    for part, peak in BF16_DENSE_TFLOPS:
        if part in gpu_name:
            return peak
    return None


def encoder_training_flops(config: Any, lengths: Sequence[int], num_labels: int) -> float:
    """Model FLOPs of one training step (forward and backward, 3× the forward's matrix
    products) over sequences of these token counts, for a BERT-style encoder classifier:
    the layers' weight products (2·L·weights), attention's scores and weighted sum
    (4·L²·hidden per layer), the pooler and the classifier on the first token. Padding is
    not counted, so a padded run scores what it computes to no use as lost utilisation."""
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    ffn = config.intermediate_size
    weights = layers * (4 * hidden * hidden + 2 * hidden * ffn)
    head = hidden * hidden + hidden * num_labels
    lengths = np.asarray(lengths, dtype=np.float64)
    forward = 2 * weights * lengths + 4 * layers * hidden * lengths**2 + 2 * head
    return float(3 * forward.sum())
