"""The training precision a machine can run: bf16 where it is native, fp32 otherwise."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp32")
# CPU flags of a native bf16 matrix unit (Intel AMX, AVX512-BF16); without them bf16 is emulated
# and slower than fp32.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def native_bf16_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bf16 itself, from its flags (False where they cannot be read)."""
    try:
        flags = set(cpuinfo.read_text(encoding="utf-8", errors="replace").split())
    except OSError:
        return False
    return bool(flags & NATIVE_BF16_FLAGS)


def training_precision(requested: str, cuda: bool, cuda_bf16: bool, cpu_bf16: bool) -> str:
    """The precision to train in: `requested`, or fp32 (logged) where bf16 is not native."""
    if requested == "fp32":
        return "fp32"
    if (cuda and cuda_bf16) or (not cuda and cpu_bf16):
        return "bf16"
    where = "this GPU has no bf16" if cuda else "this CPU has no native bf16 (AMX or AVX512-BF16)"
    log.info("finetune.precision bf16: %s; training in fp32", where)
    return "fp32"


def precision_here(requested: str) -> str:
    """The precision this machine trains `requested` (finetune.precision) in."""
    import torch  # only here: the rest of this module is read without torch

    cuda = torch.cuda.is_available()
    return training_precision(
        requested,
        cuda=cuda,
        cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
        cpu_bf16=native_bf16_cpu(),
    )
