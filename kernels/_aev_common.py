"""Triton helpers shared by the fused radial and angular AEV kernels, and the index preparation
(CSR row starts, stable orderings) their launch functions need.

Distances in Å. Every literal below is weakly typed in Triton, so a float64 kernel computes the
cutoff and Gaussians in float64 exactly like ``aimnet_fast.aev`` (no float32 rounding of 4.6 or π).
Keep the tensor on the left of a constexpr in products: Triton's interpreter fails on
``constexpr * tensor``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

PI = tl.constexpr(math.pi)


@triton.jit
def cosine_cutoff(d, RC: tl.constexpr):
    """fc(d) = 0.5·cos(π·min(d/Rc, 1)) + 0.5 (d in Å, Rc in Å), elementwise."""
    return 0.5 * tl.cos(tl.minimum(d / RC, 1.0) * PI) + 0.5


@triton.jit
def cosine_cutoff_grad(d, RC: tl.constexpr):
    """dfc/dd in Å⁻¹; zero beyond the cutoff, where the reference's clamp stops the gradient."""
    return tl.where(d / RC <= 1.0, tl.sin((d / RC) * PI) * (-0.5 * PI / RC), 0.0)


@triton.jit
def cosine_cutoff_grad2(d, RC: tl.constexpr):
    """d²fc/dd² in Å⁻²; zero beyond the cutoff."""
    return tl.where(d / RC <= 1.0, tl.cos((d / RC) * PI) * (-0.5 * (PI / RC) * (PI / RC)), 0.0)


def csr_starts(sorted_index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Row starts (n_rows + 1,) int64 of a non-decreasing index vector (e.g. pairs[0]).

    A binary search, not bincount: no device-to-host sync, so a step stays capturable by a CUDA
    graph."""
    rows = torch.arange(n_rows + 1, dtype=sorted_index.dtype, device=sorted_index.device)
    return torch.searchsorted(sorted_index, rows).to(torch.int64)


def group_by(index: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stable ordering of ``index`` and the CSR row starts of the sorted values.

    Returns ``order`` (len,) int64 with index[order] non-decreasing (ties keep their original order,
    so reductions over a row are deterministic) and ``starts`` (n_rows + 1,) int64.
    """
    values, order = torch.sort(index, stable=True)
    return order.contiguous(), csr_starts(values, n_rows)


def check_inputs(name: str, coord: torch.Tensor, feat: torch.Tensor) -> None:
    if coord.dtype != feat.dtype:
        raise TypeError(f"{name}: coord ({coord.dtype}) and features ({feat.dtype}) must share a "
                        f"dtype in the Triton kernels")
    if coord.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: the Triton kernels take float32 or float64, got {coord.dtype}")
    if coord.ndim != 2 or coord.shape[1] != 3:
        raise ValueError(f"{name}: coord must be (N, 3), got {tuple(coord.shape)}")
