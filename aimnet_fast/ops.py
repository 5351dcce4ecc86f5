"""The seam between the model and its backends: each operation here has a reference (PyTorch)
implementation and, where written, a Triton one in ``aimnet_fast.kernels``.

``backend``: ``"torch"`` forces the reference path, ``"triton"`` forces the kernels, ``"auto"``
uses Triton on CUDA tensors and the reference path elsewhere. This module holds no math.
"""
from __future__ import annotations

import torch
from torch import nn

from . import aev

BACKENDS = ("auto", "torch", "triton")


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    return x.is_cuda and _triton_available()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    from . import kernels
    return kernels


def radial_contract(coord, pairs, afv, backend: str = "auto"):
    if _use_triton(backend, coord):
        return _kernels().radial_contract(coord, pairs, afv)
    return aev.radial_contract(coord, pairs, afv)


def angular_contract(coord, triplets, pair_feat, triplet_pair, backend: str = "auto"):
    if _use_triton(backend, coord):
        return _kernels().angular_contract(coord, triplets, pair_feat, triplet_pair)
    return aev.angular_contract(coord, triplets, pair_feat, triplet_pair)


def elu_mlp(x: torch.Tensor, layers: nn.Sequential, backend: str = "auto",
            precision: str = "ieee") -> torch.Tensor:
    """``precision`` ("ieee", "tf32", "bf16") applies to the Triton kernels; the reference path
    always computes in the tensors' own dtype."""
    if _use_triton(backend, x):
        return _kernels().elu_mlp(x, layers, precision)
    return layers(x)


def elu_mlp_cat(x1: torch.Tensor, x2: torch.Tensor, layers: nn.Sequential, backend: str = "auto",
                precision: str = "ieee") -> torch.Tensor:
    """``elu_mlp`` of [x1 ‖ x2]; the kernels read both parts in place instead of concatenating."""
    if _use_triton(backend, x1):
        return _kernels().elu_mlp_cat(x1, x2, layers, precision)
    return layers(torch.cat([x1, x2], dim=1))
