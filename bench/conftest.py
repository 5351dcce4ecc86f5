"""Shared fixtures of the benchmarks: real molecules (read in place from ../shared/data) and the
released model. Throughput figures are attached to each benchmark as extra_info."""
import os
from pathlib import Path

import pytest
import torch

try:
    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AIMNET_FAST_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared material not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def s66x8_molecules(shared):
    """All 528 conformers of COMP6 S66x8 (6–34 atoms, H C N O) as (numbers, coord_A) pairs."""
    import h5py
    from aimnet_fast.constants import PERIODIC_TABLE
    mols = []
    with h5py.File(shared / "data" / "comp6_s66x8.h5", "r") as f:
        for name in sorted(f["s66x8"]):
            g = f["s66x8"][name]
            numbers = [PERIODIC_TABLE.index(s.decode()) for s in g["species"][:]]
            for xyz in g["coordinates"][:]:
                mols.append((numbers, torch.as_tensor(xyz)))
    return mols


@pytest.fixture(scope="session")
def released_model(shared):
    from aimnet_fast.checkpoint import convert_released
    d = shared / "aimnet_pretrained"
    m = convert_released(d / "aimnet_cv0.pt", d / "aimnet_mt_cv0.pt")
    m.backend = "torch"
    return m
