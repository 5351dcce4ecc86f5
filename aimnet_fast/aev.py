"""Reference atomic environment vectors (AEV) contracted with atomic and pair features.

This is the float64-capable ground truth for the Triton kernels in ``aimnet_fast.kernels``: same
signatures, same results. Gradients (features, pair features, coordinates) come from autograd.

Units: coordinates and distances in Å; AEV terms are dimensionless.
"""
from __future__ import annotations

import math

import torch

from .constants import (ANGULAR_CUTOFF_A, ANGULAR_ETA_PER_A2, ANGULAR_SECTORS_RAD,
                        ANGULAR_SHIFTS_A, ANGULAR_ZETA, COS_CLAMP, N_ANGULAR, N_RADIAL,
                        RADIAL_CUTOFF_A, RADIAL_ETA_PER_A2, RADIAL_SHIFTS_A)


def cosine_cutoff(d: torch.Tensor, cutoff_A: float) -> torch.Tensor:
    """fc(d) = 0.5·cos(π·min(d/Rc, 1)) + 0.5 (d in Å)."""
    return 0.5 * torch.cos(math.pi * torch.clamp(d / cutoff_A, max=1.0)) + 0.5


def radial_terms(d: torch.Tensor) -> torch.Tensor:
    """g_r for pair distances d (P,) in Å → (P, 16)."""
    shifts = torch.tensor(RADIAL_SHIFTS_A, dtype=d.dtype, device=d.device)
    return torch.exp(-RADIAL_ETA_PER_A2 * (d[:, None] - shifts).square()) \
        * cosine_cutoff(d, RADIAL_CUTOFF_A)[:, None]


def angular_terms(r_ij: torch.Tensor, r_ik: torch.Tensor) -> torch.Tensor:
    """g_a for triplets from the two bond vectors (T, 3) in Å → (T, 32), channel c = z·4 + a."""
    d_ij = r_ij.norm(dim=1)
    d_ik = r_ik.norm(dim=1)
    cos = (r_ij * r_ik).sum(1) / (d_ij * d_ik)
    theta = torch.acos(cos.clamp(-COS_CLAMP, COS_CLAMP))
    sectors = torch.tensor(ANGULAR_SECTORS_RAD, dtype=r_ij.dtype, device=r_ij.device)
    shifts = torch.tensor(ANGULAR_SHIFTS_A, dtype=r_ij.dtype, device=r_ij.device)
    ang = (1.0 + torch.cos(theta[:, None] - sectors)).pow(ANGULAR_ZETA)            # (T, 8)
    rad = torch.exp(-ANGULAR_ETA_PER_A2 * (0.5 * (d_ij + d_ik)[:, None] - shifts).square())  # (T, 4)
    fc = cosine_cutoff(d_ij, ANGULAR_CUTOFF_A) * cosine_cutoff(d_ik, ANGULAR_CUTOFF_A)
    g = (2.0 ** (1.0 - ANGULAR_ZETA)) * fc[:, None, None] * ang[:, :, None] * rad[:, None, :]
    return g.reshape(-1, N_ANGULAR)


def radial_contract(coord: torch.Tensor, pairs: torch.Tensor, afv: torch.Tensor) -> torch.Tensor:
    """x_r[i, s, f] = Σ_j g_r[i, s, j] · afv[j, f].

    coord (N, 3) Å; pairs (2, P) ordered (i, j); afv (N, F) → (N, 16, F).
    """
    i, j = pairs[0], pairs[1]
    d = (coord[j] - coord[i]).norm(dim=1)
    g = radial_terms(d)
    out = coord.new_zeros(coord.shape[0], N_RADIAL, afv.shape[1], dtype=afv.dtype)
    return out.index_add_(0, i, g[:, :, None].to(afv.dtype) * afv[j][:, None, :])


def angular_contract(coord: torch.Tensor, triplets: torch.Tensor, pair_feat: torch.Tensor,
                     triplet_pair: torch.Tensor) -> torch.Tensor:
    """x_a[i, c, f] = Σ_{j<k} g_a[i, c, jk] · p_jk[f].

    coord (N, 3) Å; triplets (3, T) rows i, j, k; pair_feat (Q, F); triplet_pair (T,) → (N, 32, F).
    """
    i, j, k = triplets[0], triplets[1], triplets[2]
    g = angular_terms(coord[j] - coord[i], coord[k] - coord[i])
    out = coord.new_zeros(coord.shape[0], N_ANGULAR, pair_feat.shape[1], dtype=pair_feat.dtype)
    return out.index_add_(0, i, g[:, :, None].to(pair_feat.dtype) * pair_feat[triplet_pair][:, None, :])
