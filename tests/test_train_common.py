"""Helpers shared by the trainer tests: ``Batch``es as ``aimnet_fast.data.collate`` returns them,
built from real molecules (the ANI-1x sample in the shared folder, ωB97X/def2-TZVPP labels)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from aimnet_fast.batch import Batch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ANI1X_SAMPLE = SHARED / "data" / "ani1x_sample.h5"


def sample_conformers() -> list[dict]:
    """The 8 conformers of ani1x_sample.h5: numbers, coord (Å), energy (Ha), forces (Ha/Å),
    charges (e, MBIS), volumes (bohr³, MBIS)."""
    if not ANI1X_SAMPLE.exists():
        pytest.skip(f"shared data not found at {ANI1X_SAMPLE}")
    import h5py
    confs = []
    with h5py.File(ANI1X_SAMPLE, "r") as f:
        for g in sorted(f):
            grp = f[g]
            for c in range(grp["coordinates"].shape[0]):
                confs.append({"numbers": np.asarray(grp["atomic_numbers"][:], np.int64),
                              "coord": np.asarray(grp["coordinates"][c], np.float32),
                              "energy": float(grp["wb97x_tz.energy"][c]),
                              "forces": np.asarray(grp["wb97x_tz.forces"][c], np.float32),
                              "charges": np.asarray(grp["wb97x_tz.mbis_charges"][c], np.float32),
                              "volumes": np.asarray(grp["wb97x_tz.mbis_volumes"][c], np.float32)})
    return confs


def make_batch(confs: list[dict], labels=("energy", "forces", "charges", "volumes")) -> Batch:
    """Collate conformers as ``aimnet_fast.data.collate`` does: flat tensors, ``labels[name]`` and
    ``masks[name]`` per label, masked values set to 0. A NaN label (or NaN row) is missing."""
    sizes = [len(c["numbers"]) for c in confs]
    n_atoms = torch.tensor(sizes, dtype=torch.long)
    lab, masks = {}, {}
    for name in labels:
        if name == "energy":
            v = torch.tensor([c["energy"] for c in confs], dtype=torch.float64)
            mask = torch.isfinite(v)
        else:
            v = torch.as_tensor(np.concatenate([c[name] for c in confs]))
            mask = torch.isfinite(v) if v.dim() == 1 else torch.isfinite(v).all(dim=-1)
        lab[name] = torch.where(torch.isfinite(v), v, torch.zeros((), dtype=v.dtype))
        masks[name] = mask
    return Batch(numbers=torch.as_tensor(np.concatenate([c["numbers"] for c in confs])),
                 coord=torch.as_tensor(np.concatenate([c["coord"] for c in confs])),
                 mol_idx=torch.repeat_interleave(torch.arange(len(confs)), n_atoms),
                 offsets=torch.cat([torch.zeros(1, dtype=torch.long), n_atoms.cumsum(0)]),
                 labels=lab, masks=masks)


def test_make_batch_layout():
    confs = sample_conformers()
    b = make_batch(confs[:3])
    n = sum(len(c["numbers"]) for c in confs[:3])
    assert b.coord.shape == (n, 3) and b.coord.dtype == torch.float32
    assert b.mol_idx.tolist() == sorted(b.mol_idx.tolist())
    assert b.n_mol == 3 and b.mol_sizes.tolist() == [len(c["numbers"]) for c in confs[:3]]
    assert b.labels["energy"].shape == (3,) and b.masks["energy"].all()
    assert b.labels["energy"].dtype == torch.float64
    assert b.labels["charges"].shape == (n,) and b.labels["forces"].shape == (n, 3)
    assert math.isclose(float(b.labels["energy"][0]), confs[0]["energy"])


def test_batch_to_moves_all_and_casts_only_coordinates():
    b = make_batch(sample_conformers()[:2])
    d = b.to("cpu", torch.float64, non_blocking=True)
    assert d.coord.dtype == torch.float64 and torch.equal(d.coord, b.coord.double())
    for name, t in b.tensors():
        got = dict(d.tensors())[name]
        if name != "coord":
            assert got.dtype == t.dtype and torch.equal(got, t), name
    assert [n for n, _ in b.tensors()] == [n for n, _ in d.tensors()]
