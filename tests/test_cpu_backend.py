"""The fast CPU backend (``aimnet_fast.cpu_aev``, backend "cpu") against the float64 reference
(``aimnet_fast.aev``): values, gradients and the double backward of force training, on fresh random
inputs with centres of 0 to 2·width+1 terms (every row boundary), on lists in any order, and on the
real molecules of shared/reference with the released model, in float64 (1e-10) and in float32
(no further from the float64 reference than the reference's own float32 run); and the analytic
backwards of its autograd Functions (CentreSum, AngularTerms, RadialTerms) and their derivatives
against finite differences (gradcheck, gradgradcheck, float64)."""
import math

import numpy as np
import pytest
import torch

from aimnet_fast import aev, cpu_aev, ops
from aimnet_fast.batch import Batch
from aimnet_fast.constants import N_FEATURE
from aimnet_fast.neighbors import build_neighbors


def _cluster(n_mol, seed, dtype=torch.float64):
    """Molecules of 1–30 atoms at about liquid density, so that centres have from 0 to ~60
    triplets and ~25 pairs."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 31, (n_mol,), generator=g)
    sizes[0] = 1  # an atom alone: a centre without terms
    coords = [torch.rand(int(s), 3, generator=g, dtype=torch.float64) * (1.0 + float(s) ** (1 / 3) * 1.4)
              for s in sizes]
    mol_idx = torch.repeat_interleave(torch.arange(n_mol), sizes)
    return torch.cat(coords).to(dtype), mol_idx


def _inputs(seed, dtype=torch.float64):
    coord, mol_idx = _cluster(12, seed, dtype)
    nb = build_neighbors(coord, mol_idx)
    g = torch.Generator().manual_seed(seed + 1)
    afv = torch.randn(coord.shape[0], N_FEATURE, generator=g, dtype=torch.float64).to(dtype)
    pair_feat = torch.randn(nb.pairs.shape[1], N_FEATURE, generator=g, dtype=torch.float64).to(dtype)
    return coord, nb, afv, pair_feat


def _both(fn_name, coord, nb, afv, pair_feat):
    """(value, first gradients, double-backward gradients) of one contraction, for the reference
    and for the CPU backend, under the same random upstream gradients."""
    g = torch.Generator().manual_seed(7)
    results = []
    for impl in (aev, cpu_aev):
        c = coord.clone().requires_grad_(True)
        if fn_name == "radial":
            feat = afv.clone().requires_grad_(True)
            out = impl.radial_contract(c, nb.radial, feat)
        else:
            feat = pair_feat.clone().requires_grad_(True)
            out = impl.angular_contract(c, nb.triplets, feat, nb.triplet_pair)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
        gc, gf = torch.autograd.grad((out * w).sum(), (c, feat), create_graph=True)
        # force training: a loss on the coordinate gradient, differentiated again
        v = torch.randn(gc.shape, generator=g.manual_seed(5), dtype=gc.dtype)
        ggc, ggf = torch.autograd.grad((gc * v).sum() + gf.square().sum(), (c, feat))
        results.append((out.detach(), gc.detach(), gf.detach(), ggc, ggf))
    return results


@pytest.mark.parametrize("which", ["radial", "angular"])
@pytest.mark.parametrize("seed,width", [(0, None), (1, 3), (2, 5)])
def test_float64_values_gradients_and_double_backward_equal_the_reference(which, seed, width,
                                                                          monkeypatch):
    """Default row widths, and narrow ones under which the triangular triplet counts
    n(n−1)/2 also fill rows exactly."""
    name = "RADIAL_ROW_WIDTH" if which == "radial" else "ANGULAR_ROW_WIDTH"
    if width is not None:
        monkeypatch.setattr(cpu_aev, name, width)
    width = getattr(cpu_aev, name)
    coord, nb, afv, pair_feat = _inputs(seed)
    counts = torch.bincount((nb.radial if which == "radial" else nb.triplets)[0],
                            minlength=coord.shape[0])
    # the inputs do cover empty centres, partial rows and several rows (and full rows where the
    # counts allow: triplet counts are triangular numbers, and none of them is a multiple of 16
    # below 496)
    assert (counts == 0).any() and (counts > 2 * width).any() and ((counts % width) != 0).any()
    if which == "radial" or width != 16:
        assert (counts % width == 0).logical_and(counts > 0).any()
    ref, got = _both(which, coord, nb, afv, pair_feat)
    for name, r, x in zip(("value", "d/dcoord", "d/dfeat", "dd/dcoord", "dd/dfeat"), ref, got):
        scale = r.abs().max().clamp(min=1.0)
        err = (x - r).abs().max() / scale
        assert err < 1e-10, f"{which} {name}: relative error {err:.3g}"


def test_any_order_of_the_lists_gives_the_same_sums():
    coord, nb, afv, pair_feat = _inputs(4)
    perm_p = torch.randperm(nb.radial.shape[1], generator=torch.Generator().manual_seed(0))
    perm_t = torch.randperm(nb.triplets.shape[1], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cpu_aev.radial_contract(coord, nb.radial[:, perm_p], afv),
                               aev.radial_contract(coord, nb.radial, afv), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        cpu_aev.angular_contract(coord, nb.triplets[:, perm_t], pair_feat, nb.triplet_pair[perm_t]),
        aev.angular_contract(coord, nb.triplets, pair_feat, nb.triplet_pair), rtol=0, atol=1e-12)


def test_no_terms_at_all_gives_zeros_and_a_connected_graph():
    coord = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]], dtype=torch.float64,
                         requires_grad=True)
    nb = build_neighbors(coord, torch.tensor([0, 1]))
    afv = torch.randn(2, N_FEATURE, dtype=torch.float64)
    x_r = cpu_aev.radial_contract(coord, nb.radial, afv)
    x_a = cpu_aev.angular_contract(coord, nb.triplets, torch.zeros(0, N_FEATURE, dtype=torch.float64),
                                   nb.triplet_pair)
    assert x_r.shape == (2, 16, N_FEATURE) and x_a.shape == (2, 32, N_FEATURE)
    assert not x_r.any() and not x_a.any()
    (g,) = torch.autograd.grad((x_r.sum() + x_a.sum()), coord)
    assert not g.any()


def test_angular_terms_without_arccos_equal_the_reference_at_the_clamp():
    """θ near 0 and π, where cos θ is clamped: value and gradient as the reference's arccos form."""
    r_ij = torch.tensor([[1.2, 0.0, 0.0]] * 4, dtype=torch.float64)
    r_ik = torch.tensor([[1.3, 1e-7, 0.0], [-1.1, 1e-7, 0.0], [0.0, 1.0, 0.0], [0.7, 0.7, 0.1]],
                        dtype=torch.float64)
    for x in (r_ij, r_ik):
        x.requires_grad_(True)
    ref = aev.angular_terms(r_ij, r_ik)
    got = cpu_aev.angular_terms(r_ij, r_ik)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g_ref = torch.autograd.grad((ref * w).sum(), (r_ij, r_ik))
    g_got = torch.autograd.grad((got * w).sum(), (r_ij, r_ik))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# -- the analytic backwards of the Functions, against finite differences ---------------------------
def _bond_vectors(lengths, angles, seed):
    """Pairs of bond vectors (T, 3) Å with the given lengths (T, 2) and angles θ (T,) between them,
    in random orientations."""
    g = torch.Generator().manual_seed(seed)
    n = len(angles)
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    u, v = q[:, :, 0], q[:, :, 1]
    theta = torch.tensor(angles, dtype=torch.float64)[:, None]
    d = torch.tensor(lengths, dtype=torch.float64)
    return d[:, :1] * u, d[:, 1:] * (theta.cos() * u + theta.sin() * v)


def _triplet_inputs():
    """Angles near 0 and π on both sides of the clamp (θ = 0.001 and π − 0.001 are clamped, 0.01
    and π − 0.01 are not), distances near and beyond the angular cutoff (3.1 Å), and random ones."""
    g = torch.Generator().manual_seed(11)
    angles = [0.001, 0.01, 0.3, math.pi / 2, 2.0, math.pi - 0.01, math.pi - 0.001, 1.0, 1.0, 2.5]
    lengths = [[1.0, 1.1], [1.4, 0.9], [3.099, 1.2], [2.0, 3.0999], [3.05, 3.09], [1.0, 1.5],
               [1.2, 2.2], [1.1, 3.2], [3.3, 1.0], [0.7, 0.8]]
    angles += (torch.rand(6, generator=g, dtype=torch.float64) * math.pi).tolist()
    lengths += (0.6 + 2.4 * torch.rand(6, 2, generator=g, dtype=torch.float64)).tolist()
    return _bond_vectors(lengths, angles, seed=12)


def test_angular_terms_gradcheck_and_gradgradcheck():
    """The analytic backward (from the forward's saved factors) and its autograd-differentiated
    form under create_graph (from factors recomputed) against finite differences; the values
    against the reference's arccos form."""
    r_ij, r_ik = _triplet_inputs()
    torch.testing.assert_close(cpu_aev.angular_terms(r_ij, r_ik), aev.angular_terms(r_ij, r_ik),
                               rtol=1e-12, atol=1e-14)
    r_ij.requires_grad_(True)
    r_ik.requires_grad_(True)
    assert torch.autograd.gradcheck(cpu_aev.angular_terms, (r_ij, r_ik))
    assert torch.autograd.gradgradcheck(cpu_aev.angular_terms, (r_ij, r_ik))


def test_radial_terms_gradcheck_and_gradgradcheck():
    """Distances from 0.6 Å to beyond the radial cutoff (4.6 Å); in float32 the Gaussians that
    underflow (exp down to exp(−269)) still give the reference's values."""
    g = torch.Generator().manual_seed(13)
    d = torch.cat([torch.tensor([0.6, 1.0, 4.5, 4.599, 4.7], dtype=torch.float64),
                   0.6 + 4.0 * torch.rand(10, generator=g, dtype=torch.float64)])
    u = torch.nn.functional.normalize(torch.randn(d.numel(), 3, generator=g, dtype=torch.float64))
    r = (d[:, None] * u).requires_grad_(True)
    torch.testing.assert_close(cpu_aev.RadialTerms.apply(r), aev.radial_terms(d),
                               rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(cpu_aev.RadialTerms.apply, (r,))
    assert torch.autograd.gradgradcheck(cpu_aev.RadialTerms.apply, (r,))
    r32 = r.detach().float()
    want = aev.radial_terms(d)
    got32 = cpu_aev.RadialTerms.apply(r32).double()
    err_ref32 = (aev.radial_terms(r32.norm(dim=1)).double() - want).abs().max()
    assert (got32 - want).abs().max() <= 2 * err_ref32 + 1e-7
    underflow = want < 1e-38
    assert underflow.sum() > 10 and (got32[underflow] < 1e-37).all()


@pytest.mark.parametrize("grad_by_channel", [False, True])
def test_centre_sum_gradcheck_and_gradgradcheck(grad_by_channel):
    """Centres in any order with 0 to 8 terms (rows of 3 slots: empty, partial, full and several
    rows), feature rows read by several terms or none."""
    g = torch.Generator().manual_seed(14)
    centre = torch.tensor([4, 0, 2, 4, 4, 2, 0, 4, 4, 2, 4, 4, 6, 2, 4, 0, 6, 6])  # atoms 1, 3, 5: none
    n_atoms, C, K, F = 7, 4, 6, 3
    feat_index = torch.randint(0, K - 1, (centre.numel(),), generator=g)      # row K − 1: unread
    plan = cpu_aev.gather_plan(centre, feat_index, K, n_atoms, width=3)
    terms = torch.randn(centre.numel(), C, generator=g, dtype=torch.float64, requires_grad=True)
    feat = torch.randn(K, F, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(t, f):
        return cpu_aev.centre_sum(t, f, plan, n_atoms, grad_by_channel=grad_by_channel)

    want = torch.zeros(n_atoms, C, F, dtype=torch.float64).index_add_(
        0, centre, terms[:, :, None] * feat[feat_index][:, None, :])
    torch.testing.assert_close(fn(terms, feat), want, rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(fn, (terms, feat))
    assert torch.autograd.gradgradcheck(fn, (terms, feat))
    (d_terms,) = torch.autograd.grad(fn(terms, feat).sum(), terms)
    assert d_terms.t().is_contiguous() == grad_by_channel   # the layout the docstring promises


@pytest.mark.parametrize("which", ["radial", "angular"])
def test_plain_backward_equals_the_reference(which):
    """Gradients without create_graph, from the forward's saved intermediates (the double-backward
    test above takes the recomputing path), in float64."""
    coord, nb, afv, pair_feat = _inputs(8)
    w = None
    grads = []
    for impl in (aev, cpu_aev):
        c = coord.clone().requires_grad_(True)
        feat = (afv if which == "radial" else pair_feat).clone().requires_grad_(True)
        out = impl.radial_contract(c, nb.radial, feat) if which == "radial" else \
            impl.angular_contract(c, nb.triplets, feat, nb.triplet_pair)
        if w is None:
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
        grads.append(torch.autograd.grad((out * w).sum(), (c, feat)))
    for name, r, x in zip(("d/dcoord", "d/dfeat"), *grads):
        err = (x - r).abs().max() / r.abs().max().clamp(min=1.0)
        assert err < 1e-10, f"{which} {name}: relative error {err:.3g}"


# -- the whole model on real molecules ------------------------------------------------------------
def _outputs(model, batch, create_graph=False):
    coord = batch.coord.clone().requires_grad_(True)
    out = model(batch.numbers, coord, batch.mol_idx, batch.n_mol)
    (grad,) = torch.autograd.grad(out["energy"].sum(), coord, create_graph=create_graph)
    return out, -grad


@pytest.fixture(scope="module")
def reference_batch(reference_molecules):
    return Batch.from_molecules([(m["numbers"], m["coord_A"]) for m in reference_molecules],
                                dtype=torch.float64)


def test_model_float64_equals_the_reference_with_force_training_gradients(released_models,
                                                                          reference_batch):
    """Energies, forces, charges, volumes of the 20 reference molecules, and the parameter
    gradients of an energy + force loss (double backward), backend "cpu" vs "torch", float64."""
    results = []
    for backend in ("torch", "cpu"):
        import copy
        m = copy.deepcopy(released_models[0]).double()
        m.backend = backend
        out, forces = _outputs(m, reference_batch, create_graph=True)
        loss = out["energy"].sum() * 1e-3 + forces.square().sum()
        # the charge and volume heads do not enter this loss: their gradients are zero
        grads = torch.autograd.grad(loss, list(m.parameters()), materialize_grads=True)
        results.append((out["energy"].detach(), forces.detach(), out["charges"].detach(),
                        out["volumes"].detach(), grads))
    (e0, f0, q0, v0, g0), (e1, f1, q1, v1, g1) = results
    assert (e1 - e0).abs().max() < 1e-10
    assert (f1 - f0).abs().max() < 1e-10
    assert (q1 - q0).abs().max() < 1e-10
    assert (v1 - v0).abs().max() < 1e-9   # volumes are ~10–40 bohr³
    for a, b in zip(g1, g0):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max().clamp(min=1.0)


def test_model_float32_is_as_close_to_float64_as_the_reference_is(released_models,
                                                                  reference_batch):
    """In float32, the CPU backend's error against the float64 reference is no more than twice the
    reference's own float32 error (plus one float32 rounding of the value), output by output."""
    import copy
    m64 = copy.deepcopy(released_models[0]).double()
    m64.backend = "torch"
    out64, f64 = _outputs(m64, reference_batch)
    want = {"energy": out64["energy"], "forces": f64, "charges": out64["charges"],
            "volumes": out64["volumes"]}
    errs = {}
    for backend in ("torch", "cpu"):
        m = copy.deepcopy(released_models[0]).float()
        m.backend = backend
        b32 = reference_batch.to(dtype=torch.float32)
        out, f = _outputs(m, b32)
        got = {"energy": out["energy"], "forces": f, "charges": out["charges"],
               "volumes": out["volumes"]}
        errs[backend] = {k: float((got[k].double() - want[k]).abs().max()) for k in want}
    ulp = {"energy": 0.0, "forces": 1e-7, "charges": 1e-7, "volumes": 4e-6}
    for k in want:
        assert errs["cpu"][k] <= 2 * errs["torch"][k] + ulp[k], (k, errs)
    # measured: 1e-7 Ha and 3e-7 Ha/Å for both backends (the original-vs-ours gap is 3e-7 Ha)
    assert errs["cpu"]["energy"] < 1e-6 and errs["cpu"]["forces"] < 2e-6, errs


def test_auto_is_the_cpu_backend_on_cpu_tensors():
    assert ops._impl("auto", torch.zeros(1)) is ops.IMPLEMENTATIONS["cpu"]
    assert ops.IMPLEMENTATIONS["cpu"].radial_contract is cpu_aev.radial_contract


def test_the_row_plan_is_built_once_per_list_and_never_stale(monkeypatch):
    """The model's passes reuse one plan per neighbor list (built twice per forward, not six
    times); a list changed in place, or the same triplets with another triplet_pair tensor, gets a
    new plan, and the sums stay the reference's."""
    built = []
    real = cpu_aev.gather_plan
    monkeypatch.setattr(cpu_aev, "gather_plan", lambda *a: built.append(a[-1]) or real(*a))
    coord, nb, afv, pair_feat = _inputs(6)
    for _ in range(3):
        x_r = cpu_aev.radial_contract(coord, nb.radial, afv)
        x_a = cpu_aev.angular_contract(coord, nb.triplets, pair_feat, nb.triplet_pair)
    assert built == [cpu_aev.RADIAL_ROW_WIDTH, cpu_aev.ANGULAR_ROW_WIDTH]
    torch.testing.assert_close(x_r, aev.radial_contract(coord, nb.radial, afv), rtol=0, atol=1e-12)

    radial = nb.radial.clone()
    cpu_aev.radial_contract(coord, radial, afv)
    radial[1, :5] = radial[1, 5:10].clone()         # other partners, same length: a stale plan
    assert len(built) == 3                          # would read the old ones
    torch.testing.assert_close(cpu_aev.radial_contract(coord, radial, afv),
                               aev.radial_contract(coord, radial, afv), rtol=0, atol=1e-12)
    assert len(built) == 4

    # The same triplets with the pair features stored in another order: a new triplet_pair.
    perm = torch.randperm(pair_feat.shape[0], generator=torch.Generator().manual_seed(2))
    moved_to = torch.empty_like(perm)
    moved_to[perm] = torch.arange(perm.numel())
    x_a2 = cpu_aev.angular_contract(coord, nb.triplets, pair_feat[perm], moved_to[nb.triplet_pair])
    assert len(built) == 5
    torch.testing.assert_close(x_a2, x_a, rtol=0, atol=1e-12)


def test_model_builds_two_plans_per_forward(released_models, reference_batch, monkeypatch):
    built = []
    real = cpu_aev.gather_plan
    monkeypatch.setattr(cpu_aev, "gather_plan", lambda *a: built.append(1) or real(*a))
    import copy
    model = copy.deepcopy(released_models[0]).double()
    model.backend = "cpu"
    b = reference_batch
    out = model(b.numbers, b.coord, b.mol_idx, b.n_mol)
    assert len(out["passes"]["energy"]) == 3 and len(built) == 2  # T = 3 passes, one plan each


def test_the_passes_share_one_computation_of_the_terms(released_models, reference_batch,
                                                       monkeypatch):
    """The T passes contract the same AEV terms: computed once per forward (and differentiated
    once backward), with the reference's forces."""
    calls = {"radial": 0, "angular": 0}
    for name, which in (("RadialTerms", "radial"), ("AngularTerms", "angular")):
        fn = getattr(cpu_aev, name)
        real = fn.forward
        monkeypatch.setattr(fn, "forward", staticmethod(
            lambda ctx, *a, real=real, which=which: calls.__setitem__(which, calls[which] + 1)
            or real(ctx, *a)))
    import copy
    model = copy.deepcopy(released_models[0]).double()
    b = reference_batch
    forces = {}
    for backend in ("cpu", "torch"):
        model.backend = backend
        c = b.coord.double().requires_grad_(True)
        e = model(b.numbers, c, b.mol_idx, b.n_mol)["energy"]
        forces[backend] = -torch.autograd.grad(e.sum(), c)[0]
    assert calls == {"radial": 1, "angular": 1}
    torch.testing.assert_close(forces["cpu"], forces["torch"], rtol=0, atol=1e-10)


def test_terms_of_another_list_are_refused():
    coord, nb, afv, pair_feat = _inputs(6)
    terms = cpu_aev.aev_terms(coord, nb)
    torch.testing.assert_close(cpu_aev.radial_contract(coord, nb.radial, afv, terms=terms),
                               aev.radial_contract(coord, nb.radial, afv), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        cpu_aev.angular_contract(coord, nb.triplets, pair_feat, nb.triplet_pair, terms=terms),
        aev.angular_contract(coord, nb.triplets, pair_feat, nb.triplet_pair), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="another neighbor list"):
        cpu_aev.radial_contract(coord, nb.radial.clone(), afv, terms=terms)
    with pytest.raises(ValueError, match="another neighbor list"):
        cpu_aev.angular_contract(coord, nb.triplets.clone(), pair_feat, nb.triplet_pair,
                                 terms=terms)


@pytest.mark.parametrize("last_activation", [True, False])
def test_cpu_mlp_equals_the_sequential_with_gradients_and_double_backward(last_activation):
    """``cpu_mlp`` (ELU in place) against the reference ``nn.Sequential`` in float64: values,
    input and parameter gradients, and the parameter gradients of a loss on the input gradient
    (force training's double backward); gradcheck and gradgradcheck by finite differences."""
    from aimnet_fast import cpu_mlp
    from aimnet_fast.model import build_elu_mlp
    torch.manual_seed(0)
    net = build_elu_mlp([7, 9, 5, 3], last_activation=last_activation).double()
    x1 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)

    def both(run):
        net.zero_grad(set_to_none=True)
        y = run(x1, x2)
        g1, g2 = torch.autograd.grad((y * y).sum(), (x1, x2), create_graph=True)
        (g1.square().sum() + g2.square().sum() + y.sum()).backward()
        return [y.detach(), g1.detach(), g2.detach()] + [p.grad.clone() for p in net.parameters()]

    ref = both(lambda a, b: net(torch.cat([a, b], 1)))
    fast = both(lambda a, b: cpu_mlp.elu_mlp_cat(a, b, net))
    for r, f in zip(ref, fast):
        torch.testing.assert_close(f, r, rtol=1e-12, atol=1e-12)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(cpu_mlp.elu_mlp(x, net), net(x), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: cpu_mlp.elu_mlp(v, net), (x,))
    assert torch.autograd.gradgradcheck(lambda v: cpu_mlp.elu_mlp(v, net), (x,))
    assert ops.implementation("cpu").elu_mlp is cpu_mlp.elu_mlp


@pytest.mark.parametrize("last_activation", [True, False])
def test_first_order_mlp_equals_the_sequential_and_refuses_a_double_backward(last_activation):
    """Inside ``first_order()`` with frozen weights, the MLP is ``FirstOrderMLP``: values and the
    input's gradient equal ``nn.Sequential``'s in float64 (gradcheck by finite differences too),
    its input is not kept, and a double backward is an error, not a wrong answer. Weights that need
    a gradient keep the autograd path."""
    from aimnet_fast import cpu_mlp
    from aimnet_fast.model import build_elu_mlp
    torch.manual_seed(1)
    net = build_elu_mlp([7, 9, 5, 3], last_activation=last_activation).double()
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(6, 3, dtype=torch.float64)
    ref_y = net(x)
    (ref_g,) = torch.autograd.grad(ref_y, x, gy)

    net.requires_grad_(False)
    with ops.first_order():
        y = cpu_mlp.elu_mlp(x, net)
        assert type(y.grad_fn).__name__ == "FirstOrderMLPBackward"
        (g,) = torch.autograd.grad(y, x, gy)
        torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-14)
        torch.testing.assert_close(g, ref_g, rtol=0, atol=1e-14)
        assert torch.autograd.gradcheck(lambda v: cpu_mlp.elu_mlp(v, net), (x,))
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(cpu_mlp.elu_mlp(x, net).sum(), x, create_graph=True)
    assert type(cpu_mlp.elu_mlp(x, net).grad_fn).__name__ != "FirstOrderMLPBackward"  # block left

    net.requires_grad_(True)
    with ops.first_order():
        y = cpu_mlp.elu_mlp(x, net)
        assert type(y.grad_fn).__name__ != "FirstOrderMLPBackward"
        grads = torch.autograd.grad(y, [x, *net.parameters()], gy)
    torch.testing.assert_close(grads[0], ref_g, rtol=0, atol=1e-14)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's flags() says so
def test_first_order_mlp_in_blocks_equals_float64(monkeypatch):
    """A float32 input of several ``BLOCK_ROWS`` blocks, one of each ``SMALL_BLOCKS`` and a
    remainder (the large layers of the blocks through oneDNN where torch has it, as on every x86
    build), inside ``first_order()``, without gradients, with a torch without oneDNN and with
    oneDNN switched off: values and the input's gradient equal the float64 ``nn.Sequential`` to
    float32 precision, row by row, as closely as the single ``addmm`` path does; a block in the
    wrong place would be off by O(1)."""
    from aimnet_fast import cpu_mlp
    from aimnet_fast.model import build_elu_mlp
    if torch.backends.mkldnn.is_available():
        assert cpu_mlp._onednn_linear() is not None
    torch.manual_seed(3)
    net = build_elu_mlp([32, 256, 128, 16], last_activation=True).requires_grad_(False)
    n = 2 * cpu_mlp.BLOCK_ROWS + sum(cpu_mlp.SMALL_BLOCKS) + 37
    x = torch.randn(n, 32)
    gy = torch.randn(n, 16)
    x64 = x.double().requires_grad_(True)
    ref_y = net.double()(x64)
    (ref_g,) = torch.autograd.grad(ref_y, x64, gy.double())
    net.float()

    def first_order(x):
        x = x.clone().requires_grad_(True)
        with ops.first_order():
            y = cpu_mlp.elu_mlp(x, net)
            (g,) = torch.autograd.grad(y, x, gy)
        return y.detach(), g

    y, g = first_order(x)
    with torch.no_grad():  # energies alone take the blocks too
        y0 = cpu_mlp.elu_mlp(x, net)
    with monkeypatch.context() as m:  # a torch without oneDNN: addmm throughout
        m.setattr(cpu_mlp, "_onednn_linear", lambda: None)
        y2, g2 = first_order(x)
    with torch.backends.mkldnn.flags(enabled=False):  # oneDNN switched off by the user
        y3, g3 = first_order(x)
    monkeypatch.setattr(cpu_mlp, "BLOCK_ROWS", 10 ** 9)  # one addmm per layer
    y1, g1 = first_order(x)
    for got, one, want in ((y, y1, ref_y), (y0, y1, ref_y), (y2, y1, ref_y), (y3, y1, ref_y),
                           (g, g1, ref_g), (g2, g1, ref_g), (g3, g1, ref_g)):
        err = (got.double() - want).abs().max()
        assert err <= 3 * max((one.double() - want).abs().max(), 1e-7)
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)


def test_predict_forces_equal_the_reference_inside_first_order(released_models, reference_batch):
    """The predict path (``predict_arrays``, which runs inside ``first_order``) on the cpu backend
    against the reference backend in float64: energies and forces."""
    import copy
    from aimnet_fast.predict import predict_arrays
    model = copy.deepcopy(released_models[0]).double().requires_grad_(False)
    b = reference_batch
    out = {}
    for backend in ("cpu", "torch"):
        model.backend = backend
        out[backend] = predict_arrays([model], b, forces=True)
    for key in ("energy_Ha", "forces_Ha_per_A", "charges_e"):
        np.testing.assert_allclose(out["cpu"][key], out["torch"][key], rtol=0, atol=1e-10)


def test_mlp_steps_follow_changes_of_the_sequential():
    """The steps remembered per Sequential are worked out again when a layer or a parameter is
    replaced; layers other than Linear and ELU run as the Sequential itself."""
    from torch import nn
    from aimnet_fast import cpu_mlp
    from aimnet_fast.model import build_elu_mlp
    torch.manual_seed(5)
    net = build_elu_mlp([4, 8, 3], last_activation=True).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    for change in (None, "weight", "layer", "other"):
        if change == "weight":
            net[0].weight = nn.Parameter(torch.randn(8, 4, dtype=torch.float64))
        elif change == "layer":
            net[2] = nn.Linear(8, 3).double()
        elif change == "other":
            net[1] = nn.Tanh()
            assert cpu_mlp.mlp_steps(net) is None
        with torch.no_grad():
            torch.testing.assert_close(cpu_mlp.elu_mlp(x, net), net(x), rtol=1e-14, atol=1e-14)


def test_first_order_gradient_follows_weights_changed_in_place():
    """The transposed weights of the oneDNN blocks' backward are remade when a weight changes in
    place (as load_state_dict and optimizers change them)."""
    from aimnet_fast import cpu_mlp
    from aimnet_fast.model import build_elu_mlp
    torch.manual_seed(4)
    net = build_elu_mlp([32, 256, 128, 16], last_activation=True).requires_grad_(False)
    x = torch.randn(cpu_mlp.BLOCK_ROWS, 32)
    for _ in range(2):
        xx = x.clone().requires_grad_(True)
        with ops.first_order():
            (g,) = torch.autograd.grad(cpu_mlp.elu_mlp(xx, net).sum(), xx)
        x64 = x.double().requires_grad_(True)
        (want,) = torch.autograd.grad(copy_double(net)(x64).sum(), x64)
        torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            net[2].weight.mul_(-1.5)


def copy_double(net):
    import copy
    return copy.deepcopy(net).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_input_grad_with_the_first_layer_made_again_is_the_same(dtype, monkeypatch):
    """``forward_kept(recompute_first=True)`` keeps x instead of the first layer's ELU outputs;
    ``input_grad`` makes them again on the same blocks: the same input gradient, bit for bit, on
    whole oneDNN blocks, a small block and the rows left over."""
    from aimnet_fast import cpu_mlp
    from aimnet_fast.model import build_elu_mlp
    torch.manual_seed(8)
    net = build_elu_mlp([32, 256, 128, 16], last_activation=True).requires_grad_(False).to(dtype)
    steps = cpu_mlp.mlp_steps(net)
    n = cpu_mlp.BLOCK_ROWS + sum(cpu_mlp.SMALL_BLOCKS) + 37
    x, gy = torch.randn(n, 32, dtype=dtype), torch.randn(n, 16, dtype=dtype)
    with torch.no_grad():
        y, tape = cpu_mlp.forward_kept(x, steps)
        y2, tape2 = cpu_mlp.forward_kept(x, steps, recompute_first=True)
        assert tape2.x is x and sum(t is None for t in tape2.elu_outputs) == len(tape2.blocks)
        assert torch.equal(y, y2)
        assert torch.equal(cpu_mlp.input_grad(tape, gy), cpu_mlp.input_grad(tape2, gy))
