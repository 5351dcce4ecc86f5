"""The fused radial Triton kernel against the float64 reference ``aimnet_fast.aev.radial_contract``.

Without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): sizes stay
small but straddle every block boundary (neighbor lists shorter and longer than BLOCK_P, feature
counts that are not a multiple of BLOCK_F). Every output and scratch buffer is poisoned with NaN.
"""
import json

import pytest
import torch

from aimnet_fast import aev
from aimnet_fast.constants import ELEMENTS, RADIAL_CUTOFF_A
from aimnet_fast.kernels import _aev_common as common
from aimnet_fast.kernels import radial
from aimnet_fast.neighbors import neighbor_pairs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("poisoned_buffers")


def _batch(sizes, seed, box_A=5.0, far=()):
    """Random molecules of the given sizes; molecules listed in ``far`` have atoms 10 Å apart (no
    neighbor within the cutoff). Returns coord (N, 3) float64 Å, mol_idx, pairs."""
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
    mol_idx = torch.tensor(mol)
    return coord, mol_idx, neighbor_pairs(coord, mol_idx, RADIAL_CUTOFF_A)


def _reference(coord, pairs, afv, grad_out):
    c = coord.detach().double().requires_grad_()
    a = afv.detach().double().requires_grad_()
    out = aev.radial_contract(c, pairs, a)
    gc, ga = torch.autograd.grad(out, (c, a), grad_out.double())
    return out.detach(), gc, ga


def _check(coord, pairs, afv, block_p, block_f, block_p_bwd=None, tol=1e-12):
    """Launch forward and backward with the given blocks and compare with the reference."""
    coord, pairs, afv = coord.to(DEVICE), pairs.to(DEVICE), afv.to(DEVICE)
    starts = common.csr_starts(pairs[0], coord.shape[0])
    nbr = pairs[1].contiguous()
    out = radial.radial_forward(coord, nbr, starts, afv, block_p=block_p, block_f=block_f)
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE, afv.dtype)
    gcoord, gafv = radial.radial_backward(grad_out, coord, nbr, starts, afv,
                                          block_p=block_p_bwd or block_p, block_f=block_f)
    ref, rc, ra = _reference(coord, pairs, afv, grad_out)
    for got, want in ((out, ref), (gcoord, rc), (gafv, ra)):
        assert torch.isfinite(got).all()
        scale = max(want.abs().max().item(), 1.0)
        assert (got.double() - want).abs().max().item() <= tol * scale
    return out, gcoord, gafv


@pytest.mark.parametrize("block_p,block_f,n_feat",
                         [(4, 4, 6), (16, 16, 16), (8, 16, 17), (2, 8, 3)])
def test_random_float64_every_tile_boundary(block_p, block_f, n_feat):
    # The dense molecule gives lists of ~18 neighbors, the sparse one of a few, so lists end inside,
    # on and beyond a block; n_feat cuts feature tiles short.
    coord, _, pairs = _batch([19, 8], seed=block_p * 100 + n_feat, box_A=[3.5, 9.0])
    counts = torch.bincount(pairs[0], minlength=coord.shape[0])
    assert counts.max() > block_p and (counts % block_p != 0).any()
    afv = torch.randn(coord.shape[0], n_feat, dtype=torch.float64)
    _check(coord, pairs, afv, block_p, block_f)


def test_small_and_isolated_molecules_in_a_mixed_batch():
    # sizes 1 and 2, a molecule whose atoms are all beyond the cutoff, and larger ones
    coord, _, pairs = _batch([1, 2, 3, 11, 6], seed=3, box_A=3.0, far=(2,))
    counts = torch.bincount(pairs[0], minlength=coord.shape[0])
    assert counts[0] == 0 and counts[1] == 1 and counts[2] == 1 and (counts[3:6] == 0).all()
    afv = torch.randn(coord.shape[0], 16, dtype=torch.float64)
    out, gcoord, gafv = _check(coord, pairs, afv, block_p=4, block_f=8)
    assert (out[0] == 0).all() and (out[3:6] == 0).all()
    assert (gcoord[3:6] == 0).all()


def test_no_pairs_at_all():
    coord, _, pairs = _batch([1, 1, 1], seed=0)
    assert pairs.shape[1] == 0
    afv = torch.randn(3, 16, dtype=torch.float64)
    out, gcoord, gafv = _check(coord, pairs, afv, block_p=4, block_f=16)
    assert (out == 0).all() and (gafv == 0).all()


def test_real_molecules(shared):
    data = json.loads((shared / "reference" / "aimnet_original_outputs.json").read_text())
    mols = data["molecules"][:3]
    coord = torch.cat([torch.tensor(m["coord_A"], dtype=torch.float64) for m in mols])
    mol_idx = torch.cat([torch.full((len(m["numbers"]),), k) for k, m in enumerate(mols)])
    numbers = torch.cat([torch.tensor(m["numbers"]) for m in mols])
    pairs = neighbor_pairs(coord, mol_idx, RADIAL_CUTOFF_A)
    # features that depend on the element, as in pass 1 (an embedding table row per element)
    table = torch.randn(max(ELEMENTS) + 1, 16, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))
    _check(coord, pairs, table[numbers], block_p=16, block_f=16, block_p_bwd=8)


def test_float32_against_float64_reference():
    coord, _, pairs = _batch([12, 7], seed=11, box_A=4.0)
    afv = torch.randn(coord.shape[0], 16, dtype=torch.float64)
    # float32 inputs; the reference sees the same (rounded) values in float64
    c32, a32 = coord.float(), afv.float()
    _check(c32.double(), pairs, a32.double(), 16, 16, 8)  # float64 path on the rounded inputs
    _check(c32, pairs, a32, 16, 16, 8, tol=2e-6)


def test_public_op_autograd_and_gradcheck():
    coord, _, pairs = _batch([4], seed=5, box_A=2.5)
    coord = coord.to(DEVICE).requires_grad_()
    afv = torch.randn(4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    pairs = pairs.to(DEVICE)
    assert torch.autograd.gradcheck(lambda c, a: radial.radial_contract(c, pairs, a),
                                    (coord, afv), fast_mode=True)
    out = radial.radial_contract(coord, pairs, afv)
    ref = aev.radial_contract(coord, pairs, afv)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)


def _force_training_grads(fn, coord, pairs, afv, w):
    """Gradient wrt coord and afv of a loss on forces −dE/dR, E = ½‖x_r‖²: the first backward's
    grad_out then depends on both, so every path of the double backward is used."""
    c = coord.clone().requires_grad_()
    a = afv.clone().requires_grad_()
    energy = 0.5 * fn(c, pairs, a).square().sum()
    forces = -torch.autograd.grad(energy, c, create_graph=True)[0]
    return (forces.detach(), *torch.autograd.grad((forces * w).sum(), (c, a)))


@pytest.mark.parametrize("block_p,n_feat", [(None, 16), (4, 5)])
def test_double_backward_matches_the_reference(monkeypatch, block_p, n_feat):
    coord, _, pairs = _batch([9, 3, 1], seed=2, box_A=[3.5, 3.0, 1.0])
    g = torch.Generator().manual_seed(3)
    w = torch.randn(coord.shape, dtype=torch.float64, generator=g)
    afv = torch.randn(coord.shape[0], n_feat, dtype=torch.float64, generator=g)
    if block_p:
        monkeypatch.setattr(radial, "BLOCK_P_BWD2_FP64", block_p)
    args = [x.to(DEVICE) for x in (coord, pairs, afv, w)]
    got = _force_training_grads(radial.radial_contract, *args)
    want = _force_training_grads(aev.radial_contract, *args)
    for x, y in zip(got, want):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12 * max(y.abs().max(), 1.0))


def test_double_backward_of_feature_loss_and_gradgradcheck():
    # a loss on grad afv alone (v = 0 path) and torch's own second-order check
    coord, _, pairs = _batch([4], seed=9, box_A=2.5)
    c = coord.to(DEVICE).requires_grad_()
    a = torch.randn(4, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    p = pairs.to(DEVICE)
    assert torch.autograd.gradgradcheck(lambda c, a: radial.radial_contract(c, p, a), (c, a),
                                        fast_mode=True)


def test_third_derivative_raises():
    coord, _, pairs = _batch([3], seed=2, box_A=2.0)
    c = coord.to(DEVICE).requires_grad_()
    a = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    e = radial.radial_contract(c, pairs.to(DEVICE), a).square().sum()
    (g1,) = torch.autograd.grad(e, c, create_graph=True)
    (g2,) = torch.autograd.grad(g1.square().sum(), c, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        g2.sum().backward()


def test_mixed_dtypes_are_refused():
    coord, _, pairs = _batch([3], seed=2)
    with pytest.raises(TypeError, match="dtype"):
        radial.radial_contract(coord, pairs, torch.zeros(3, 16, dtype=torch.float32))


def test_fake_tensor_registration():
    coord, _, pairs = _batch([5], seed=4, box_A=3.0)
    afv = torch.randn(5, 16, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(radial._radial_op, (coord.to(DEVICE).requires_grad_(), pairs.to(DEVICE), afv),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_forward_and_backward():
    coord, _, pairs = _batch([6], seed=6, box_A=3.0)
    coord, pairs = coord.to(DEVICE), pairs.to(DEVICE)
    afv = torch.randn(6, 16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    results = []
    for fn in (torch.compile(radial.radial_contract, backend="aot_eager", fullgraph=True),
               aev.radial_contract):
        c = coord.clone().requires_grad_()
        e = fn(c, pairs, afv).square().sum()
        results.append((e.detach(), *torch.autograd.grad(e, (c, afv))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("need_coord,need_afv", [(True, False), (False, True)])
def test_only_the_gradients_asked_for(need_coord, need_afv):
    # training on energies needs no coordinate gradient: the kernel then skips that work
    coord, _, pairs = _batch([10, 4], seed=8, box_A=[3.5, 4.0])
    afv = torch.randn(coord.shape[0], 16, dtype=torch.float64)
    c = coord.to(DEVICE).requires_grad_(need_coord)
    a = afv.to(DEVICE).requires_grad_(need_afv)
    out = radial.radial_contract(c, pairs.to(DEVICE), a)
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, c if need_coord else a, grad_out)
    _, rc, ra = _reference(coord, pairs, afv, grad_out.cpu())
    want = rc if need_coord else ra
    assert (got.cpu() - want).abs().max().item() <= 1e-12 * max(want.abs().max().item(), 1.0)
    starts = common.csr_starts(pairs[0], coord.shape[0])
    gcoord, gafv = radial.radial_backward(grad_out, c.detach(), pairs[1].to(DEVICE),
                                          starts.to(DEVICE), a.detach(), need_coord=need_coord,
                                          need_afv=need_afv)
    assert (gcoord.numel() == 0) != need_coord and (gafv.numel() == 0) != need_afv


def test_double_backward_float32_against_float64_reference():
    coord, _, pairs = _batch([10, 4], seed=12, box_A=[3.5, 4.0])
    g = torch.Generator().manual_seed(6)
    w = torch.randn(coord.shape, dtype=torch.float64, generator=g)
    afv = torch.randn(coord.shape[0], 16, dtype=torch.float64, generator=g)
    c32, a32, w32 = (x.to(DEVICE).float() for x in (coord, afv, w))
    pairs = pairs.to(DEVICE)
    got = _force_training_grads(radial.radial_contract, c32, pairs, a32, w32)
    want = _force_training_grads(aev.radial_contract, c32.double(), pairs, a32.double(),
                                 w32.double())
    for x, y in zip(got, want):
        assert x.dtype == torch.float32
        assert ((x.double() - y).norm() / y.norm()).item() < 1e-5


def test_int32_pairs():
    coord, _, pairs = _batch([7], seed=13, box_A=3.0)
    c = coord.to(DEVICE).requires_grad_()
    afv = torch.randn(7, 16, dtype=torch.float64, device=DEVICE)
    out = radial.radial_contract(c, pairs.int().to(DEVICE), afv)
    ref = aev.radial_contract(c, pairs.to(DEVICE), afv)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), c)[0],
                               torch.autograd.grad(ref.sum(), c)[0], rtol=0, atol=1e-12)


def test_a_list_that_breaks_the_backward_preconditions_raises():
    """The backward gathers afv's gradient over j's own rows: with one direction of a pair missing
    that is wrong (shown on the launch functions, which do not check), so the public op refuses such
    a list, and an unsorted one, before computing anything."""
    coord, _, pairs = _batch([7], seed=21, box_A=3.0)
    coord, pairs = coord.to(DEVICE), pairs.to(DEVICE)
    afv = torch.randn(coord.shape[0], 5, dtype=torch.float64, device=DEVICE)
    one_way = pairs[:, pairs[0] < pairs[1]].contiguous()
    grad_out = torch.randn(coord.shape[0], 16, 5, dtype=torch.float64, device=DEVICE)
    _, gafv = radial.radial_backward(grad_out, coord, one_way[1].contiguous(),
                                     common.csr_starts(one_way[0], coord.shape[0]), afv)
    _, _, want = _reference(coord, one_way, afv, grad_out)
    assert (gafv - want).abs().max() > 1e-3  # what the check prevents
    with pytest.raises(ValueError, match="both directions"):
        radial.radial_contract(coord, one_way, afv)
    shuffled = pairs[:, torch.randperm(pairs.shape[1], generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match="sorted by centre"):
        radial.radial_contract(coord, shuffled.to(DEVICE), afv)
    with pytest.raises(ValueError, match="outside 0"):
        radial.radial_contract(coord[:3], pairs, afv[:3])
    # A checked list that is then changed in place is checked again.
    ok = pairs.clone()
    radial.radial_contract(coord, ok, afv)
    ok[1, 0] = ok[1, 1]
    with pytest.raises(ValueError, match="both directions"):
        radial.radial_contract(coord, ok, afv)
