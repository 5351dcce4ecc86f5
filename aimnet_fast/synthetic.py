"""Synthetic molecular systems for tests and benchmarks (no data files needed)."""
from __future__ import annotations

import math

import torch

_WATER_A = torch.tensor([[0.0, 0.0, 0.0],
                         [0.9572, 0.0, 0.0],
                         [0.9572 * math.cos(math.radians(104.52)),
                          0.9572 * math.sin(math.radians(104.52)), 0.0]], dtype=torch.float64)


def water_cluster(n_water: int, seed: int = 0, spacing_A: float = 3.1) -> tuple[torch.Tensor, torch.Tensor]:
    """A cubic droplet of ``n_water`` randomly oriented waters at about liquid density
    (one molecule per 3.1 Å cube ≈ 1.0 g/cm³). Returns numbers (3n,) and coordinates (3n, 3) in Å."""
    g = torch.Generator().manual_seed(seed)
    side = math.ceil(n_water ** (1 / 3))
    grid = torch.stack(torch.meshgrid(*(torch.arange(side, dtype=torch.float64),) * 3,
                                      indexing="ij"), -1).reshape(-1, 3)[:n_water] * spacing_A
    q, _ = torch.linalg.qr(torch.randn(n_water, 3, 3, generator=g, dtype=torch.float64))
    jitter = 0.2 * (torch.rand(n_water, 1, 3, generator=g, dtype=torch.float64) - 0.5)
    coord = torch.einsum("mij,aj->mai", q, _WATER_A) + grid[:, None, :] + jitter
    numbers = torch.tensor([8, 1, 1]).repeat(n_water)
    return numbers, coord.reshape(-1, 3)
