"""The reference path's operations one by one, on 128 S66x8 conformers (≈ 2,600 atoms): neighbor
search, AEV contractions (forward, backward to features and coordinates) and the ELU MLP stack
(embedding_mlp forward + backward). Guarded side by side with the base commit (bench/guard_ab.py).

    pytest bench/test_bench_ops.py
"""
import pytest
import torch

from aimnet_fast import aev
from aimnet_fast.batch import Batch
from aimnet_fast.neighbors import build_neighbors


@pytest.fixture(scope="module")
def batch(s66x8_molecules):
    return Batch.from_molecules(s66x8_molecules[::4][:128])


@pytest.fixture(scope="module")
def nb(batch):
    return build_neighbors(batch.coord, batch.mol_idx)


@pytest.fixture(scope="module")
def features(batch, nb):
    g = torch.Generator().manual_seed(0)
    afv = torch.randn(batch.n_atoms, 16, generator=g)
    pair_feat = torch.randn(nb.pairs.shape[1], 16, generator=g)
    return afv, pair_feat


def test_neighbor_search(benchmark, guard, batch):
    guard.measure(benchmark, "reference.neighbors", lambda: build_neighbors(batch.coord, batch.mol_idx),
                  rounds=10, inner=4)


def test_aev_forward(benchmark, guard, batch, nb, features):
    afv, pf = features

    def run():
        with torch.no_grad():
            aev.radial_contract(batch.coord, nb.radial, afv)
            aev.angular_contract(batch.coord, nb.triplets, pf, nb.triplet_pair)

    guard.measure(benchmark, "reference.aev_forward", run, rounds=10)


def test_aev_backward(benchmark, guard, batch, nb, features):
    """Forward + backward to atom features, pair features and coordinates (forces)."""
    afv0, pf0 = features
    g = torch.Generator().manual_seed(1)
    w_r = torch.randn(batch.n_atoms, 16, 16, generator=g)
    w_a = torch.randn(batch.n_atoms, 32, 16, generator=g)

    def run():
        c = batch.coord.clone().requires_grad_(True)
        afv, pf = afv0.clone().requires_grad_(True), pf0.clone().requires_grad_(True)
        x_r = aev.radial_contract(c, nb.radial, afv)
        x_a = aev.angular_contract(c, nb.triplets, pf, nb.triplet_pair)
        ((x_r * w_r).sum() + (x_a * w_a).sum()).backward()

    guard.measure(benchmark, "reference.aev_backward", run, rounds=10)


def test_elu_mlp_stack(benchmark, guard, released_model, batch):
    """embedding_mlp (768→512→256→256) forward and backward on one row per atom."""
    x0 = torch.randn(batch.n_atoms, 768, generator=torch.Generator().manual_seed(2))
    mlp = released_model.embedding_mlp

    def run():
        x = x0.clone().requires_grad_(True)
        mlp.zero_grad(set_to_none=True)
        mlp(x).sum().backward()

    guard.measure(benchmark, "reference.elu_mlp_stack", run, rounds=8)
