"""The one allocator of the kernels' launch functions.

Every output and scratch buffer a launch function hands to a kernel comes from ``empty``,
uninitialised: tests replace this function (``poisoned_buffers`` in tests/conftest.py) with one
that fills NaN (floating point) or the most negative integer, so an element a kernel fails to
write fails the comparison with the reference. Call it as ``_alloc.empty(...)``, never through a
``from`` import, or the replacement would not reach the caller.
"""
from __future__ import annotations

import torch


def empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` on ``like``'s device, in ``dtype`` (default: like's)."""
    return torch.empty(tuple(shape), dtype=like.dtype if dtype is None else dtype,
                       device=like.device)
