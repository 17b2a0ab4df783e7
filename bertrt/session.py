"""ONNX Runtime sessions: provider choice that never silently falls back, and IO binding."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import onnxruntime as ort
except ModuleNotFoundError:  # a wheel installed without its [cpu] or [gpu] extra
    raise ModuleNotFoundError(
        "bertrt needs ONNX Runtime: install the model's wheel with an extra, "
        "pip install 'bertrt-model-NAME[cpu]' (onnxruntime) or '[gpu]' (onnxruntime-gpu)"
    ) from None

from bertrt.contract import CPU, CUDA, TENSORRT

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")


class DeviceError(RuntimeError):
    """The requested device cannot run the model."""


class GraphError(ValueError):
    """An ONNX graph that ONNX Runtime cannot load (corrupt, or an opset it does not know)."""


def _options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the CUDA fallback warning is handled below
    if threads > 0:
        options.intra_op_num_threads = threads
    return options


# The largest batch a TensorRT engine is built for (its optimisation profile's maximum).
TRT_MAX_BATCH = 1024


def tensorrt_options(inputs: Sequence[str] = (), max_length: int = 0) -> dict[str, Any]:
    """TensorRT in fp16, with its engines and kernel timings kept on disk: an engine build costs
    seconds to minutes, once per machine rather than once per load. The folder is
    `BERTRT_TENSORRT_CACHE`, else ~/.cache/bertrt/tensorrt. Given the graph's inputs and
    max_length, one optimisation profile covers every batch up to TRT_MAX_BATCH and every
    length, so that no new shape rebuilds the engine while serving."""
    cache = Path(
        os.environ.get("BERTRT_TENSORRT_CACHE") or Path.home() / ".cache" / "bertrt" / "tensorrt"
    )
    cache.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
    }
    if inputs and max_length:

        def shapes(batch: int, length: int) -> str:
            return ",".join(f"{name}:{batch}x{length}" for name in inputs)

        options |= {
            "trt_profile_min_shapes": shapes(1, 1),
            "trt_profile_opt_shapes": shapes(32, max_length),
            "trt_profile_max_shapes": shapes(TRT_MAX_BATCH, max_length),
        }
    return options


# CPU flags with which ONNX Runtime multiplies int8 by uint8 into 32-bit sums exactly (VNNI,
# AMX). Without them (AVX2, AVX-512 before VNNI) its u8 x s8 kernels add pairs of products in 16
# bits, which saturate on large activations: on the default model, on AVX2 kernels, the int8
# graph gated here at 0.9956 agreed with PyTorch on 0.9928 of the test texts.
EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Overrides what /proc/cpuinfo says, where it is not what ONNX Runtime reads from CPUID (a
# process whose CPUID hides features) or cannot be read.
INT8_KERNELS_ENV = "BERTRT_INT8_KERNELS"
INT8_KERNELS = ("exact", "saturating")


@functools.cache
def int8_kernels() -> str | None:
    """This CPU's int8 kernels: "exact" with VNNI or AMX, "saturating" without, None where the
    flags cannot be read (not Linux, not x86); `BERTRT_INT8_KERNELS` overrides them."""
    declared = os.environ.get(INT8_KERNELS_ENV)
    if declared:
        if declared not in INT8_KERNELS:
            raise ValueError(f"{INT8_KERNELS_ENV}={declared!r}: use one of {list(INT8_KERNELS)}")
        return declared
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        None,
    )
    if flags is None:
        return None
    return "exact" if any(flag in flags for flag in EXACT_INT8_FLAGS) else "saturating"


@functools.cache
def cuda_driver() -> bool:
    """Whether the NVIDIA driver library is present. Without it no CUDA session can start, so
    CUDA is not tried (onnxruntime-gpu would print library errors on every load)."""
    for name in ("libcuda.so.1", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def cuda_possible() -> bool:
    """Whether a CUDA session could start here at all (the CUDA build and a driver)."""
    return CUDA in ort.get_available_providers() and cuda_driver()


def _start(path: Path, providers: list[Any], threads: int) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=_options(threads), providers=providers)
    except Exception as exc:  # ORT raises its own pybind classes (Fail, InvalidGraph, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphError(
            f"{path}: ONNX Runtime {ort.__version__} cannot load this graph ({reason:.300}); "
            "re-export the model, or install the ONNX Runtime it was exported for"
        ) from None


def start_session(
    path: Path,
    device: str = "auto",
    threads: int = 0,
    tensorrt: bool = False,
    profile: tuple[Sequence[str], int] | None = None,
) -> tuple[ort.InferenceSession, str]:
    """Start a session on `device` and return it with the provider that actually runs it;
    `profile` (the graph's inputs and max_length) sizes a TensorRT engine."""
    if device not in DEVICES:
        raise DeviceError(f"device {device!r} is not one of {list(DEVICES)}")
    if device in ("auto", "cuda") and cuda_possible():
        providers: list[Any] = [CUDA, CPU]
        if tensorrt and TENSORRT in ort.get_available_providers():
            options = tensorrt_options(*profile) if profile else tensorrt_options()
            providers.insert(0, (TENSORRT, options))
        try:
            session = _start(path, providers, threads)
        except GraphError as exc:  # reported below with the cause
            if device == "cuda":
                raise DeviceError(f"CUDA session for {path} failed to start: {exc}") from exc
            session = None
        if session is not None and session.get_providers()[0] in (CUDA, TENSORRT):
            provider = session.get_providers()[0]
            log.info("%s runs on %s", path.name, provider)
            return session, provider
        if session is not None and device == "auto":
            # onnxruntime-gpu lists CUDA even without a GPU and silently runs on the CPU.
            log.info("%s runs on %s (no CUDA device)", path.name, CPU)
            return session, CPU
    if device == "cuda":
        raise DeviceError(
            "device='cuda' was asked for but no CUDA session starts on this machine "
            f"(available providers: {ort.get_available_providers()}); install onnxruntime-gpu "
            "with a matching CUDA/cuDNN, or use device='cpu'"
        )
    session = _start(path, [CPU], threads)
    log.info("%s runs on %s", path.name, CPU)
    return session, CPU


def run(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], output: str, provider: str
) -> np.ndarray:
    """One forward pass; on GPU the inputs and output go through IO binding."""
    if provider == CPU:
        return session.run([output], feeds)[0]
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
    binding.bind_output(output, "cuda", 0)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]
