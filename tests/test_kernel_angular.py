"""The fused angular Triton kernels against the float64 reference
``aimnet_fast.aev.angular_contract``.

Without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): sizes stay
small but straddle every block boundary (triplets per centre, centres per pair, appearances of an
atom as j or k, features). Every output and scratch buffer is poisoned with NaN.
"""
import json
import math
from dataclasses import fields

import pytest
import torch

from aimnet_fast import aev
from aimnet_fast.constants import ANGULAR_SECTORS_RAD, COS_CLAMP
from aimnet_fast.kernels import _aev_common as common
from aimnet_fast.kernels import angular
from aimnet_fast.neighbors import Neighbors, build_neighbors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("poisoned_buffers")


def _batch(sizes, seed, box_A=2.6, far=()):
    """Random molecules (atoms uniform in a cube of box_A Å, or 10 Å apart for those in ``far``).
    Returns coord (N, 3) float64 Å and the reference Neighbors."""
    g = torch.Generator().manual_seed(seed)
    coords, mol = [], []
    for m, n in enumerate(sizes):
        if m in far:
            x = torch.arange(n, dtype=torch.float64)[:, None] * torch.tensor([10.0, 0.0, 0.0])
        else:
            box = box_A[m] if isinstance(box_A, (list, tuple)) else box_A
            x = torch.rand(n, 3, generator=g, dtype=torch.float64) * box
        coords.append(x + 100.0 * m)
        mol += [m] * n
    coord = torch.cat(coords)
    return coord, build_neighbors(coord, torch.tensor(mol))


def _reference(coord, nb, pair_feat, grad_out):
    c = coord.detach().double().requires_grad_()
    p = pair_feat.detach().double().requires_grad_()
    out = aev.angular_contract(c, nb.triplets, p, nb.triplet_pair)
    gc, gp = torch.autograd.grad(out, (c, p), grad_out.double())
    return out.detach(), gc, gp


def _check(coord, nb, pair_feat, block_t, block_f, block_t_bwd=None, tol=1e-12):
    """Launch forward and backward with the given blocks and compare with the reference."""
    coord, pair_feat = coord.to(DEVICE), pair_feat.to(DEVICE)
    trip, tp = nb.triplets.to(DEVICE).contiguous(), nb.triplet_pair.to(DEVICE).contiguous()
    starts = common.csr_starts(trip[0], coord.shape[0])
    out = angular.angular_forward(coord, trip, tp, starts, pair_feat, block_t=block_t,
                                  block_f=block_f)
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE, pair_feat.dtype)
    gcoord, gpf = angular.angular_backward(grad_out, coord, trip, tp, pair_feat,
                                           block_t=block_t_bwd or block_t, block_f=block_f)
    ref, rc, rp = _reference(coord, nb, pair_feat, grad_out)
    for got, want in ((out, ref), (gcoord, rc), (gpf, rp)):
        assert got.shape == want.shape and torch.isfinite(got).all()
        if want.numel() == 0:
            continue
        scale = max(want.abs().max().item(), 1.0)
        assert (got.double() - want.cpu()).abs().max().item() <= tol * scale
    return out, gcoord, gpf


def _counts(nb, n):
    per_centre = torch.bincount(nb.triplets[0], minlength=n)
    per_pair = torch.bincount(nb.triplet_pair, minlength=nb.pairs.shape[1])
    per_atom_jk = torch.bincount(nb.triplets[1], minlength=n) + torch.bincount(nb.triplets[2],
                                                                               minlength=n)
    return per_centre, per_pair, per_atom_jk


def test_cos_identity_matches_arccos():
    # the kernels use cos(θ − θz) = cos θ cos θz + sin θ sin θz with sin θ = sqrt(1 − cos²θ)
    c = torch.linspace(-COS_CLAMP, COS_CLAMP, 2001, dtype=torch.float64)
    theta = torch.acos(c)
    for tz in ANGULAR_SECTORS_RAD:
        direct = torch.cos(theta - tz)
        identity = c * math.cos(tz) + torch.sqrt(1 - c * c) * math.sin(tz)
        assert (direct - identity).abs().max().item() < 1e-12


@pytest.mark.parametrize("n_dense,block_t,block_t_bwd,block_f,n_feat",
                         [(11, 16, 8, 16, 16), (7, 4, 4, 4, 6), (7, 8, 2, 16, 17),
                          (7, 2, 4, 8, 3)])
def test_random_float64_every_tile_boundary(n_dense, block_t, block_t_bwd, block_f, n_feat):
    # n_dense atoms in a 2.3 Å cube: (n−1)(n−2)/2 triplets per centre, n−2 centres per pair; the
    # sparse molecule gives short lists, so lists end inside, on and beyond a block.
    coord, nb = _batch([n_dense, 7], seed=block_t * 100 + n_feat, box_A=[2.3, 4.5])
    per_centre, per_pair, per_jk = _counts(nb, coord.shape[0])
    for counts, block in ((per_centre, block_t), (per_centre, block_t_bwd),
                          (per_pair, block_t_bwd)):
        assert counts.max() > block and (counts % block != 0).any()
    assert per_jk.max() > block_t_bwd
    pair_feat = torch.randn(nb.pairs.shape[1], n_feat, dtype=torch.float64)
    _check(coord, nb, pair_feat, block_t, block_f, block_t_bwd)


def test_small_and_isolated_molecules_in_a_mixed_batch():
    # sizes 1 and 2 (no triplet), a molecule whose atoms are all beyond the cutoff, a 3-atom one
    coord, nb = _batch([1, 2, 3, 3, 8], seed=3, box_A=2.0, far=(2,))
    per_centre, _, _ = _counts(nb, coord.shape[0])
    assert (per_centre[:6] == 0).all() and (per_centre[6:9] == 1).all()
    pair_feat = torch.randn(nb.pairs.shape[1], 16, dtype=torch.float64)
    out, gcoord, _ = _check(coord, nb, pair_feat, block_t=4, block_f=8)
    assert (out[:6] == 0).all() and (gcoord[:6] == 0).all()


def test_no_triplets_at_all():
    coord, nb = _batch([1, 2], seed=0)
    assert nb.triplets.shape[1] == 0
    pair_feat = torch.zeros(0, 16, dtype=torch.float64)
    out, gcoord, gpf = _check(coord, nb, pair_feat, block_t=4, block_f=16)
    assert (out == 0).all() and (gcoord == 0).all() and gpf.shape == (0, 16)


def test_collinear_atoms_hit_the_cos_clamp():
    # cos θ = ±1 (clamped: no gradient through the angle) and cos θ just inside the clamp
    coord = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0],
                          [0.0, 0.0, 10.0], [1.2, 0.0, 10.0], [-1.1, 0.01, 10.0]],
                         dtype=torch.float64)
    nb = build_neighbors(coord, torch.tensor([0, 0, 0, 1, 1, 1]))
    i, j, k = nb.triplets
    r1, r2 = coord[j] - coord[i], coord[k] - coord[i]
    cos = (r1 * r2).sum(1) / (r1.norm(dim=1) * r2.norm(dim=1))
    assert (cos.abs() > COS_CLAMP).any() and ((cos.abs() < COS_CLAMP) & (cos.abs() > 0.999)).any()
    pair_feat = torch.randn(nb.pairs.shape[1], 16, dtype=torch.float64)
    _check(coord, nb, pair_feat, block_t=4, block_f=16, tol=1e-11)


def test_real_molecules(shared):
    data = json.loads((shared / "reference" / "aimnet_original_outputs.json").read_text())
    mols = data["molecules"][:3]
    coord = torch.cat([torch.tensor(m["coord_A"], dtype=torch.float64) for m in mols])
    mol_idx = torch.cat([torch.full((len(m["numbers"]),), k) for k, m in enumerate(mols)])
    nb = build_neighbors(coord, mol_idx)
    pair_feat = torch.randn(nb.pairs.shape[1], 16, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(1))
    _check(coord, nb, pair_feat, block_t=angular.BLOCK_T, block_f=16,
           block_t_bwd=angular.BLOCK_T_BWD)


def test_float32_against_float64_reference():
    coord, nb = _batch([9, 6], seed=11, box_A=2.5)
    pair_feat = torch.randn(nb.pairs.shape[1], 16, dtype=torch.float64)
    c32, p32 = coord.float(), pair_feat.float()
    _check(c32, nb, p32, angular.BLOCK_T, 16, angular.BLOCK_T_BWD, tol=2e-6)


def test_public_op_autograd_and_gradcheck():
    coord, nb = _batch([4], seed=5, box_A=2.0)
    coord = coord.to(DEVICE).requires_grad_()
    pair_feat = torch.randn(nb.pairs.shape[1], 3, dtype=torch.float64, device=DEVICE,
                            requires_grad=True)
    trip, tp = nb.triplets.to(DEVICE), nb.triplet_pair.to(DEVICE)
    assert torch.autograd.gradcheck(lambda c, p: angular.angular_contract(c, trip, p, tp),
                                    (coord, pair_feat), fast_mode=True)
    out = angular.angular_contract(coord, trip, pair_feat, tp)
    ref = aev.angular_contract(coord, trip, pair_feat, tp)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)


def _on_device(*ts):
    """Neighbors and tensors on DEVICE (a GPU when there is one)."""
    return [Neighbors(*(getattr(t, f.name).to(DEVICE) for f in fields(Neighbors)))
            if isinstance(t, Neighbors) else t.to(DEVICE) for t in ts]


def _force_training_grads(fn, coord, nb, pair_feat, w):
    """Gradient wrt coord and pair_feat of a loss on forces −dE/dR, E = ½‖x_a‖²: the first
    backward's grad_out then depends on both, so every path of the double backward is used."""
    c = coord.clone().requires_grad_()
    p = pair_feat.clone().requires_grad_()
    energy = 0.5 * fn(c, nb.triplets, p, nb.triplet_pair).square().sum()
    forces = -torch.autograd.grad(energy, c, create_graph=True)[0]
    return (forces.detach(), *torch.autograd.grad((forces * w).sum(), (c, p)))


@pytest.mark.parametrize("block_t,n_feat", [(None, 16), (4, 5)])
def test_double_backward_matches_the_reference(monkeypatch, block_t, n_feat):
    # a dense molecule (many triplets per centre and per pair), a sparse one, a lone atom
    coord, nb = _batch([7, 4, 1], seed=2, box_A=[2.3, 3.0, 1.0])
    g = torch.Generator().manual_seed(3)
    w = torch.randn(coord.shape, dtype=torch.float64, generator=g)
    pair_feat = torch.randn(nb.pairs.shape[1], n_feat, dtype=torch.float64, generator=g)
    if block_t:
        monkeypatch.setattr(angular, "BLOCK_T_BWD2_FP64", block_t)
    coord, nb, pair_feat, w = _on_device(coord, nb, pair_feat, w)
    got = _force_training_grads(angular.angular_contract, coord, nb, pair_feat, w)
    want = _force_training_grads(aev.angular_contract, coord, nb, pair_feat, w)
    for x, y in zip(got, want):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=0, atol=1e-11 * max(y.abs().max(), 1.0))


def test_double_backward_at_the_cos_clamp():
    coord = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0],
                          [0.0, 0.0, 10.0], [1.2, 0.0, 10.0], [-1.1, 0.01, 10.0]],
                         dtype=torch.float64)
    nb = build_neighbors(coord, torch.tensor([0, 0, 0, 1, 1, 1]))
    g = torch.Generator().manual_seed(5)
    w = torch.randn(coord.shape, dtype=torch.float64, generator=g)
    pair_feat = torch.randn(nb.pairs.shape[1], 16, dtype=torch.float64, generator=g)
    coord, nb, pair_feat, w = _on_device(coord, nb, pair_feat, w)
    got = _force_training_grads(angular.angular_contract, coord, nb, pair_feat, w)
    want = _force_training_grads(aev.angular_contract, coord, nb, pair_feat, w)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10 * max(y.abs().max(), 1.0))


def test_gradgradcheck_and_third_derivative_raises():
    coord, nb = _batch([4], seed=9, box_A=2.0)
    c = coord.to(DEVICE).requires_grad_()
    p = torch.randn(nb.pairs.shape[1], 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    trip, tp = nb.triplets.to(DEVICE), nb.triplet_pair.to(DEVICE)
    assert torch.autograd.gradgradcheck(lambda c, p: angular.angular_contract(c, trip, p, tp),
                                        (c, p), fast_mode=True)
    e = angular.angular_contract(c, trip, p, tp).square().sum()
    (g1,) = torch.autograd.grad(e, c, create_graph=True)
    (g2,) = torch.autograd.grad(g1.square().sum(), c, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        g2.sum().backward()


def test_fake_tensor_registration():
    coord, nb = _batch([4], seed=4, box_A=2.0)
    pair_feat = torch.randn(nb.pairs.shape[1], 16, dtype=torch.float64)
    coord, nb, pair_feat = _on_device(coord, nb, pair_feat)
    torch.library.opcheck(angular._angular_op,
                          (coord.requires_grad_(), nb.triplets, pair_feat, nb.triplet_pair),
                          test_utils=("test_schema", "test_faketensor"))


def test_index_helpers():
    index = torch.tensor([3, 0, 3, 1, 0, 3])
    order, starts = common.group_by(index, 5)
    assert order.tolist() == [1, 4, 3, 0, 2, 5]       # stable: ties keep their order
    assert starts.tolist() == [0, 2, 3, 3, 6, 6]
    assert common.csr_starts(torch.tensor([0, 0, 2]), 4).tolist() == [0, 2, 2, 3, 3]
    assert common.csr_starts(torch.zeros(0, dtype=torch.long), 2).tolist() == [0, 0, 0]


def test_torch_compile_traces_forward_and_backward():
    coord, nb = _on_device(*_batch([6], seed=6, box_A=2.5))
    pair_feat = torch.randn(nb.pairs.shape[1], 16, dtype=torch.float64, device=DEVICE,
                            requires_grad=True)
    results = []
    for fn in (torch.compile(angular.angular_contract, backend="aot_eager", fullgraph=True),
               aev.angular_contract):
        c = coord.clone().requires_grad_()
        e = fn(c, nb.triplets, pair_feat, nb.triplet_pair).square().sum()
        results.append((e.detach(), *torch.autograd.grad(e, (c, pair_feat))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("need_coord,need_pf", [(True, False), (False, True)])
def test_only_the_gradients_asked_for(need_coord, need_pf):
    # training on energies needs no coordinate gradient: those kernels are then not launched
    coord, nb = _batch([7, 4], seed=8, box_A=2.4)
    pair_feat = torch.randn(nb.pairs.shape[1], 16, dtype=torch.float64)
    c = coord.to(DEVICE).requires_grad_(need_coord)
    p = pair_feat.to(DEVICE).requires_grad_(need_pf)
    trip, tp = nb.triplets.to(DEVICE), nb.triplet_pair.to(DEVICE)
    out = angular.angular_contract(c, trip, p, tp)
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, c if need_coord else p, grad_out)
    _, rc, rp = _reference(coord, nb, pair_feat, grad_out.cpu())
    want = rc if need_coord else rp
    assert (got.cpu() - want).abs().max().item() <= 1e-12 * max(want.abs().max().item(), 1.0)
    gcoord, gpf = angular.angular_backward(grad_out, c.detach(), trip, tp, p.detach(),
                                           need_coord=need_coord, need_pair_feat=need_pf)
    assert (gcoord.numel() == 0) != need_coord and (gpf.numel() == 0) != need_pf


def test_double_backward_float32_against_float64_reference():
    coord, nb = _batch([7, 4], seed=12, box_A=2.4)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(coord.shape, dtype=torch.float64, generator=g)
    pair_feat = torch.randn(nb.pairs.shape[1], 16, dtype=torch.float64, generator=g)
    coord, nb, pair_feat, w = _on_device(coord, nb, pair_feat, w)
    c32, p32, w32 = coord.float(), pair_feat.float(), w.float()
    got = _force_training_grads(angular.angular_contract, c32, nb, p32, w32)
    want = _force_training_grads(aev.angular_contract, c32.double(), nb, p32.double(), w32.double())
    for x, y in zip(got, want):
        assert x.dtype == torch.float32
        assert ((x.double() - y).norm() / y.norm()).item() < 1e-5


def test_int32_indices():
    coord, nb = _batch([6], seed=13, box_A=2.3)
    c = coord.to(DEVICE).requires_grad_()
    pair_feat = torch.randn(nb.pairs.shape[1], 16, dtype=torch.float64, device=DEVICE)
    trip, tp = nb.triplets.to(DEVICE), nb.triplet_pair.to(DEVICE)
    out = angular.angular_contract(c, trip.int(), pair_feat, tp.int())
    ref = aev.angular_contract(c, trip, pair_feat, tp)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), c)[0],
                               torch.autograd.grad(ref.square().sum(), c)[0], rtol=0, atol=1e-11)


def test_a_list_that_breaks_the_preconditions_raises():
    """The kernels walk each centre's triplets from its CSR start: an unsorted list would drop
    terms, so the public op refuses it, and indices out of range, before computing anything."""
    coord, nb = _batch([6, 5], seed=31)
    coord = coord.to(DEVICE)
    trip, tp = nb.triplets.to(DEVICE), nb.triplet_pair.to(DEVICE)
    pf = torch.randn(nb.pairs.shape[1], 4, dtype=torch.float64, device=DEVICE)
    assert trip.shape[1] > 4 and (trip[0] != trip[0, 0]).any()
    order = torch.arange(trip.shape[1] - 1, -1, -1, device=DEVICE)
    with pytest.raises(ValueError, match="sorted by centre"):
        angular.angular_contract(coord, trip[:, order], pf, tp[order])
    with pytest.raises(ValueError, match="triplet_pair outside"):
        angular.angular_contract(coord, trip, pf[:-1], tp)
    with pytest.raises(ValueError, match="triplet_pair must be"):
        angular.angular_contract(coord, trip, pf, tp[:-1])
    bad = trip.clone()
    bad[2, -1] = coord.shape[0]
    with pytest.raises(ValueError, match="triplet indices outside"):
        angular.angular_contract(coord, bad, pf, tp)
    out = angular.angular_contract(coord, trip, pf, tp)
    torch.testing.assert_close(out, aev.angular_contract(coord, trip, pf, tp), rtol=0, atol=1e-12)
