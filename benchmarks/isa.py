"""Run a command with the CPU's AVX-512, VNNI and AMX hidden, so that ONNX Runtime, PyTorch and
numpy choose their AVX2 kernels: how an AVX2-only server computes and roughly how fast, measured
at native speed on a newer x86 CPU.

    python -m benchmarks.isa avx2 -- python -m benchmarks.cpu ...

`avx2_only.c`, preloaded, answers CPUID with those features cleared (Linux's cpuid faulting,
which the CPU must offer: the `cpuid_fault` flag). The kernels are then the ones an AVX2 CPU
runs, so their arithmetic is: on the default model's int8 graphs the logits came out identical
to an emulated AVX2 CPU's (`qemu-x86_64 -cpu EPYC-Rome`). Their speed is this core's running AVX2
code, not another CPU's. glibc picks its string routines before the library loads, and code
that reads /proc/cpuinfo still sees the real flags, so the command gets BENCH_MASKED_FLAGS
naming the hidden ones (`measure.cpu_flags` leaves them out) and BERTRT_INT8_KERNELS=saturating
(what the runtime and the export record as the int8 kernels). A SIGSEGV handler installed later
(Python's faulthandler: PYTHONFAULTHANDLER, -X faulthandler) replaces the one that answers
CPUID, so the command must not install one.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.measure import MASKED_ENV, proc_flags

SOURCE = Path(__file__).with_name("avx2_only.c")
# What the preloaded library hides, as /proc/cpuinfo names them (those benchmarks report).
MASKED = ("avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")
# bertrt.session's name for it, not imported from there: that loads onnxruntime, whose import
# cost `measure.import_rss_mb` measures.
INT8_KERNELS_ENV = "BERTRT_INT8_KERNELS"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bertrt-bench"


def unavailable() -> str | None:
    """Why CPUID cannot be masked here, or None when it can."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"needs Linux on x86_64, not {platform.system()} on {platform.machine()}"
    if "cpuid_fault" not in proc_flags():
        return "this CPU (or its hypervisor) offers no CPUID faulting (no cpuid_fault flag)"
    if not shutil.which("cc"):
        return "no C compiler (cc) to build the preloaded library"
    return None


def library() -> Path:
    """The preloaded library, built once per version of its source."""
    code = SOURCE.read_bytes()
    built = CACHE / f"avx2_only-{hashlib.sha256(code).hexdigest()[:12]}.so"
    if not built.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = built.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run(
            ["cc", "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise RuntimeError(f"cc could not build {SOURCE}:\n{done.stderr}")
        tmp.replace(built)
    return built


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's) with the library preloaded and the masked flags named."""
    env = dict(os.environ if base is None else base)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{library()} {preload}".strip()
    env[MASKED_ENV] = ",".join(MASKED)
    env[INT8_KERNELS_ENV] = "saturating"
    env.pop("PYTHONFAULTHANDLER", None)
    return env


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "avx2" or args[1] != "--":
        print("usage: python -m benchmarks.isa avx2 -- COMMAND ...", file=sys.stderr)
        return 2
    reason = unavailable()
    if reason:
        print(f"benchmarks.isa: cannot hide AVX-512/VNNI/AMX: {reason}", file=sys.stderr)
        return 1
    return subprocess.run(args[2:], env=environment()).returncode


if __name__ == "__main__":
    raise SystemExit(main())
