"""``aimnet_fast.flops`` counts what the model does: the matrix products equal torch's own FLOP
counter on a real forward (and forward + backward) of the reference path, the AEV contractions
equal the same sums written as per-atom matrix products, and a model with other layer sizes or
other heads is counted as it is."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from aimnet_fast import aev, flops
from aimnet_fast.batch import Batch
from aimnet_fast.constants import N_ANGULAR, N_FEATURE, N_RADIAL
from aimnet_fast.model import AIMNet, build_elu_mlp
from aimnet_fast.neighbors import build_neighbors

# Water, methanol and a C2H2FCl fragment, Å.
MOLECULES = [
    ([8, 1, 1], [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]),
    ([6, 8, 1, 1, 1, 1], [[0.0, 0.0, 0.0], [1.42, 0.0, 0.0], [1.75, 0.9, 0.0], [-0.36, 1.03, 0.0],
                          [-0.36, -0.52, 0.89], [-0.36, -0.52, -0.89]]),
    ([6, 6, 1, 9, 17, 1], [[0.0, 0.0, 0.0], [1.33, 0.0, 0.0], [-0.55, 0.93, 0.0], [-0.68, -1.15, 0.0],
                           [2.2, 1.45, 0.0], [1.9, -0.92, 0.1]]),
]


@pytest.fixture(scope="module")
def batch():
    b = Batch.from_molecules([(torch.tensor(z), torch.tensor(x)) for z, x in MOLECULES])
    return b, build_neighbors(b.coord, b.mol_idx)


def _contraction_flop(nb, n_pass, atom_f=N_FEATURE, pair_f=N_FEATURE):
    return 2 * n_pass * (nb.radial.shape[1] * N_RADIAL * atom_f + nb.triplets.shape[1] * N_ANGULAR * pair_f)


def _counted(model, b, nb, n_pass, all_passes, backward):
    """Matrix-product FLOPs that torch's counter sees in the reference forward (and backward)."""
    with FlopCounterMode(display=False) as fc:
        out = model(b.numbers, b.coord, b.mol_idx, b.n_mol, neighbors=nb, n_pass=n_pass,
                    all_passes=all_passes)
        if backward:
            loss = sum(v.sum() for k, v in out["passes"].items() if k != "atomic_energies")
            loss.backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("n_pass,all_passes", [(1, True), (3, True), (3, False), (2, True)])
def test_mlp_products_equal_torch_flop_counter(batch, n_pass, all_passes):
    b, nb = batch
    torch.manual_seed(0)
    model = AIMNet(backend="torch")
    c = flops.count_batch(model, nb, b.n_atoms, n_pass=n_pass, all_passes=all_passes)
    # The reference path's contractions are element-wise products and index_add (not counted
    # by torch); every other FLOP of the count is a matrix product the counter sees.
    contraction = _contraction_flop(nb, n_pass)
    assert c.forward_flop - contraction == _counted(model, b, nb, n_pass, all_passes, False)
    # Training: every product once forward, twice backward (inputs and weights).
    assert c.train_flop - 3 * contraction == _counted(model, b, nb, n_pass, all_passes, True)
    assert c == flops.count(model, b.n_atoms, nb.radial.shape[1], nb.triplets.shape[1],
                            nb.pairs.shape[1], n_pass=n_pass, all_passes=all_passes)


def test_contractions_are_the_counted_products(batch):
    """The radial and angular contractions written as one matrix product per centre atom
    (terms × features) give the reference's result with the counted FLOPs."""
    b, nb = batch
    torch.manual_seed(1)
    coord = b.coord.double()
    afv = torch.randn(b.n_atoms, N_FEATURE, dtype=torch.float64)
    pair_feat = torch.randn(nb.pairs.shape[1], N_FEATURE, dtype=torch.float64)
    i, j = nb.radial
    g_r = aev.radial_terms((coord[j] - coord[i]).norm(dim=1))
    ti, tj, tk = nb.triplets
    g_a = aev.angular_terms(coord[tj] - coord[ti], coord[tk] - coord[ti])
    with FlopCounterMode(display=False) as fc:
        x_r = torch.stack([g_r[i == a].T @ afv[j[i == a]] for a in range(b.n_atoms)])
        x_a = torch.stack([g_a[ti == a].T @ pair_feat[nb.triplet_pair[ti == a]]
                           for a in range(b.n_atoms)])
    torch.testing.assert_close(x_r, aev.radial_contract(coord, nb.radial, afv))
    torch.testing.assert_close(x_a, aev.angular_contract(coord, nb.triplets, pair_feat, nb.triplet_pair))
    assert fc.get_total_flops() == _contraction_flop(nb, 1)
    assert nb.triplets.shape[1] > 0


def test_other_layer_sizes_and_heads_are_counted(batch):
    b, nb = batch
    torch.manual_seed(0)
    base = flops.count_batch(AIMNet(backend="torch"), nb, b.n_atoms, n_pass=3)
    model = AIMNet(heads=("energy",), backend="torch")
    aev_size = model.embedding_mlp[0].in_features
    model.embedding_mlp = build_elu_mlp([aev_size, 384, 192, 256], last_activation=True)
    model.interact_mlp = build_elu_mlp([256 + N_FEATURE, 200, 128], last_activation=True)
    c = flops.count_batch(model, nb, b.n_atoms, n_pass=3)
    assert c.forward_flop < base.forward_flop and c.activation_bytes < base.activation_bytes
    assert c.forward_flop - _contraction_flop(nb, 3) == _counted(model, b, nb, 3, True, False)
    # Through a wrapper with .module (DDP) too.
    wrapped = torch.nn.Module()
    wrapped.module = model
    assert flops.count_batch(wrapped, nb, b.n_atoms, n_pass=3) == c


def test_activation_bytes_follow_the_dtype_and_counts(batch):
    b, nb = batch
    m = AIMNet(backend="torch")
    c32 = flops.count_batch(m, nb, b.n_atoms, n_pass=3)
    c64 = flops.count_batch(m.double(), nb, b.n_atoms, n_pass=3)
    assert c64.activation_bytes == 2 * c32.activation_bytes and c64.forward_flop == c32.forward_flop
    # T=1: no update, no combine on pairs; everything else once.
    c1 = flops.count(m, 10, 0, 0, 1000, n_pass=1)
    s = flops.model_sizes(m)
    assert c1.forward_flop == 2 * (10 * (s.embed[0] + s.interact[0] + s.heads[0])
                                   + s.n_elements ** 2 * s.combine[0])
    assert c1.activation_bytes == 2 * 8 * 10 * ((N_RADIAL + N_ANGULAR) * N_FEATURE + s.embed[1]
                                                + s.interact[1] + s.heads[1])


def test_measured_peak_flops():
    assert flops.measured_peak_flops("cpu") is None
    assert flops.measured_peak_flops(torch.device("cpu"), torch.bfloat16) is None
    if not torch.cuda.is_available():
        pytest.skip("CUDA: the timed matrix product")
    p = flops.measured_peak_flops("cuda", torch.float32, seconds=0.1, n=1024)
    assert p is not None and 1e11 < p < 1e16
    assert flops.measured_peak_flops("cuda", torch.float32, seconds=0.1, n=1024) == p   # remembered
    before = torch.backends.cuda.matmul.allow_tf32
    assert flops.measured_peak_flops("cuda", torch.float32, tf32=not before, seconds=0.1, n=1024) > 0
    assert torch.backends.cuda.matmul.allow_tf32 == before
    assert flops.measured_peak_flops("cuda", torch.bfloat16, seconds=0.1, n=1024) > 0
