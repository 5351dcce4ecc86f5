"""Synthetic inputs for tests and benchmarks (no project code uses them).

``water_cluster``: a liquid-density droplet of randomly oriented waters, for cost-per-atom and
large-system checks.

Synthetic files in ANI-1x release layout, for tests and for the large-file memory check.

Templates are real molecules (``ani1x_sample.h5`` of the shared data); each conformer is a template
with Gaussian displacements δ (Å), and labels that are consistent with a harmonic model around it:
E = E0 + ½ k |δ|², F = −k δ (true forces, Ha/Å), charges and volumes of the template plus noise.
Written group by group, so a file of millions of conformers needs little memory.
"""
from __future__ import annotations

import math

import h5py
import numpy as np
import torch

#: Harmonic constant of the synthetic labels, Ha/Å².
K_HA_PER_A2 = 0.5


def load_templates(ani1x_path) -> list[dict]:
    """Every conformer of an ANI-1x layout file as a template (numbers, coord, energy, charges,
    volumes)."""
    out = []
    with h5py.File(ani1x_path, "r") as f:
        for name in sorted(f):
            g = f[name]
            for c in range(g["coordinates"].shape[0]):
                out.append({"formula": name, "numbers": g["atomic_numbers"][()].astype(np.uint8),
                            "coord": g["coordinates"][c].astype(np.float64),
                            "energy": float(g["wb97x_tz.energy"][c]),
                            "charges": g["wb97x_tz.mbis_charges"][c].astype(np.float64),
                            "volumes": g["wb97x_tz.mbis_volumes"][c].astype(np.float64)})
    return out


def write_synthetic_ani1x(path, templates: list[dict], n_conformers: int, n_groups: int,
                          seed: int = 0, sigma_a: float = 0.05, nan_energy_every: int = 0) -> dict:
    """Write ``n_conformers`` conformers in ``n_groups`` formula groups; return their counts.

    Group g uses template g % len(templates) and is named ``<formula>_<g>``. Keys: atomic_numbers,
    coordinates (Å), wb97x_tz.energy (Ha), wb97x_tz.forces (Ha/Å), wb97x_tz.mbis_charges (e),
    wb97x_tz.mbis_volumes (bohr³), wb97x_dz.energy (unused). ``nan_energy_every`` > 0 sets every
    n-th energy of a group to NaN (a missing label).
    """
    rng = np.random.default_rng(seed)
    sizes = np.full(n_groups, n_conformers // n_groups, np.int64)
    sizes[: n_conformers % n_groups] += 1
    atoms = 0
    with h5py.File(path, "w") as f:
        for gi, nc in enumerate(sizes):
            t = templates[gi % len(templates)]
            na = t["numbers"].size
            g = f.create_group(f"{t['formula']}_{gi}")
            d = rng.normal(0.0, sigma_a, (nc, na, 3))
            e = t["energy"] + 0.5 * K_HA_PER_A2 * (d ** 2).sum(axis=(1, 2))
            if nan_energy_every:
                e[::nan_energy_every] = np.nan
            g["atomic_numbers"] = t["numbers"]
            g["coordinates"] = (t["coord"] + d).astype(np.float32)
            g["wb97x_tz.energy"] = e
            g["wb97x_dz.energy"] = e - 0.1
            g["wb97x_tz.forces"] = (-K_HA_PER_A2 * d).astype(np.float32)
            g["wb97x_tz.mbis_charges"] = (t["charges"] + rng.normal(0, 0.01, (nc, na))).astype(np.float32)
            g["wb97x_tz.mbis_volumes"] = (t["volumes"] + rng.normal(0, 0.5, (nc, na))).astype(np.float32)
            atoms += int(nc) * na
    return {"conformers": int(n_conformers), "groups": int(n_groups), "atoms": atoms}

_WATER_A = torch.tensor([[0.0, 0.0, 0.0],
                         [0.9572, 0.0, 0.0],
                         [0.9572 * math.cos(math.radians(104.52)),
                          0.9572 * math.sin(math.radians(104.52)), 0.0]], dtype=torch.float64)


def water_cluster(n_water: int, seed: int = 0,
                  spacing_A: float = 3.1) -> tuple[torch.Tensor, torch.Tensor]:
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
