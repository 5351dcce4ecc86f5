"""CPU-side settings for the command-line entry points (training, prediction, benchmarks).

Not applied on import: they change process-wide behaviour, which a library must not do behind its
user's back.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Serve large tensors from the heap instead of fresh mmaps (glibc only).

    By default glibc hands every allocation above a (slowly adapting) threshold to mmap and back to
    the kernel on free, so each step pays page faults to zero its activation buffers again: on the
    2-core CPU a T = 3 forward+backward of 128 molecules took 1.68 s that way and 0.92 s with this
    (bench/RESULTS.md). Returns whether the setting was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1
    return mallopt(_M_TRIM_THRESHOLD, threshold_bytes) == 1 and ok


def flush_denormals() -> bool:
    """Treat denormal floats as zero on this process's CPU threads (where the CPU supports it).

    The Gaussians of the AEV and the ELU's exp underflow into denormals at the edges of the
    cutoffs, and each denormal operation costs ~100 cycles: training steps ran ~50× slower
    without this (bench/RESULTS.md). Changes results only below 1.2e-38 (float32) / 2.2e-308
    (float64). Returns whether the CPU supports it."""
    return bool(torch.set_flush_denormal(True))
