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

from aimnet_fast.index_memo import IndexMemo

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


# -- the backward's preconditions on the index lists ---------------------------------------------
#: Lists already checked: a model's T passes and their backward reuse one list per batch, so each
#: list is checked once, not at every call.
_CHECKED = IndexMemo()


def _cannot_sync() -> bool:
    """Inside CUDA-graph capture or torch.compile tracing a check would need a host sync (or see
    no values): the lists there come from the capturable neighbor search, checked by its tests."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_pairs(name: str, pairs: torch.Tensor, n_atoms: int) -> None:
    """The radial kernels' list: (2, P) pairs (i, j) sorted by centre i, 0 ≤ i, j < n_atoms, and
    both directions of every pair. The forward walks each centre's rows; the backward gathers the
    feature gradient of j over j's own rows, which is right only when (j, i) is listed for every
    (i, j). A list that breaks this raises ValueError instead of giving a wrong gradient."""
    if pairs.ndim != 2 or pairs.shape[0] != 2:
        raise ValueError(f"{name}: pairs must be (2, P), got {tuple(pairs.shape)}")
    bounds = ("pairs", n_atoms)
    if pairs.shape[1] == 0 or _cannot_sync() or _CHECKED.get(pairs, bounds):
        return
    i, j = pairs[0].long(), pairs[1].long()
    if bool((i[1:] < i[:-1]).any()):
        raise ValueError(f"{name}: pairs must be sorted by centre atom (pairs[0] non-decreasing)")
    if bool((pairs.min() < 0) | (pairs.max() >= n_atoms)):
        raise ValueError(f"{name}: pair indices outside 0 … {n_atoms - 1}")
    forward_keys = torch.sort(i * n_atoms + j).values
    reverse_keys = torch.sort(j * n_atoms + i).values
    if not torch.equal(forward_keys, reverse_keys):
        raise ValueError(f"{name}: pairs must list both directions of every pair: some (i, j) has "
                         f"no (j, i)")
    _CHECKED.put(pairs, True, bounds)


def check_triplets(name: str, triplets: torch.Tensor, triplet_pair: torch.Tensor, n_atoms: int,
                   n_pairs: int) -> None:
    """The angular kernels' list: (3, T) triplets (i, j, k) sorted by centre i, indices in
    0 … n_atoms − 1, and ``triplet_pair`` (T,) in 0 … n_pairs − 1. The forward and the centre
    backward walk each centre's rows by their CSR starts; an unsorted list would drop terms."""
    if triplets.ndim != 2 or triplets.shape[0] != 3:
        raise ValueError(f"{name}: triplets must be (3, T), got {tuple(triplets.shape)}")
    if triplet_pair.shape != (triplets.shape[1],):
        raise ValueError(f"{name}: triplet_pair must be ({triplets.shape[1]},), got "
                         f"{tuple(triplet_pair.shape)}")
    bounds = ("triplets", n_atoms, n_pairs)
    if triplets.shape[1] == 0 or _cannot_sync() or _CHECKED.get((triplets, triplet_pair), bounds):
        return
    i = triplets[0]
    if bool((i[1:] < i[:-1]).any()):
        raise ValueError(f"{name}: triplets must be sorted by centre atom (triplets[0] "
                         f"non-decreasing)")
    if bool((triplets.min() < 0) | (triplets.max() >= n_atoms)):
        raise ValueError(f"{name}: triplet indices outside 0 … {n_atoms - 1}")
    if bool((triplet_pair.min() < 0) | (triplet_pair.max() >= n_pairs)):
        raise ValueError(f"{name}: triplet_pair outside 0 … {n_pairs - 1}")
    _CHECKED.put((triplets, triplet_pair), True, bounds)
