"""GPU benchmark of the fused AEV contractions (kernels/radial.py, kernels/angular.py) against the
reference path (aimnet_fast.aev) on the same GPU, forward and forward + backward. Skipped without
CUDA.

Batch: all 528 COMP6 S66x8 conformers (6–34 atoms), about one training batch's worth of atoms,
F = 16 features. Run: ``pytest bench/test_bench_aev_gpu.py -s`` on a machine with a GPU; the
figures go to extra_info and are printed at the end. No figure here has been measured yet: the
session that wrote this had no GPU.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N_FEAT = 16
FIGURES: list[str] = []




@pytest.fixture(scope="module")
def aev_batch(s66x8_molecules):
    from aimnet_fast.neighbors import build_neighbors
    mols = [torch.as_tensor(c, dtype=torch.float32) for _, c in s66x8_molecules]
    coord = torch.cat(mols).cuda()
    mol_idx = torch.repeat_interleave(torch.arange(len(mols)),
                                      torch.tensor([m.shape[0] for m in mols])).cuda()
    nb = build_neighbors(coord, mol_idx)
    g = torch.Generator(device="cuda").manual_seed(0)
    afv = torch.randn(coord.shape[0], N_FEAT, device="cuda", generator=g)
    pair_feat = torch.randn(nb.pairs.shape[1], N_FEAT, device="cuda", generator=g)
    return len(mols), coord, nb, afv, pair_feat


def _op(name, impl, coord, nb, afv, pair_feat):
    from aimnet_fast import aev
    if name == "radial":
        f = aev.radial_contract
        if impl == "triton":
            from aimnet_fast.kernels.radial import radial_contract as f
        return lambda c, x: f(c, nb.radial, x), afv
    f = aev.angular_contract
    if impl == "triton":
        from aimnet_fast.kernels.angular import angular_contract as f
    return lambda c, x: f(c, nb.triplets, x, nb.triplet_pair), pair_feat


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd", "energy_training", "force_training"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("name", ["radial", "angular"])
def test_aev_contraction(benchmark, guard, aev_batch, name, impl, mode):
    """fwd: forward only; fwd_bwd: both gradients; energy_training: the feature gradient only
    (coordinates need none); force_training: forces with create_graph, then the gradient of a
    loss on them (the double backward)."""
    n_mol, coord, nb, afv, pair_feat = aev_batch
    op, feat = _op(name, impl, coord, nb, afv, pair_feat)
    c = coord.detach().requires_grad_(mode in ("fwd_bwd", "force_training"))
    x = feat.detach().requires_grad_(mode != "fwd")

    def fn():
        out = op(c, x)
        if mode == "fwd_bwd":
            torch.autograd.grad(out, (c, x), out)
        elif mode == "energy_training":
            torch.autograd.grad(out, x, out)
        elif mode == "force_training":
            forces = -torch.autograd.grad(0.5 * out.square().sum(), c, create_graph=True)[0]
            torch.autograd.grad(forces.square().sum(), (c, x))
        return out

    t = guard.measure_cuda(benchmark, fn)
    if t:
        benchmark.extra_info.update(molecules_per_s=n_mol / t)
        FIGURES.append(f"{name} {impl} {mode}: {t * 1e6:.0f} µs for "
                       f"{n_mol} molecules ({coord.shape[0]} atoms, {nb.radial.shape[1]} pairs, "
                       f"{nb.triplets.shape[1]} triplets), {n_mol / t:,.0f} molecules/s")


@pytest.mark.parametrize("name", ["radial", "angular"])
def test_aev_accuracy_on_gpu(aev_batch, name):
    """Not a timing: float32 Triton against the float64 reference on this GPU, loosely bounded."""
    _, coord, nb, afv, pair_feat = aev_batch
    op, feat = _op(name, "triton", coord, nb, afv, pair_feat)
    ref_op, _ = _op(name, "torch", coord, nb, afv, pair_feat)
    c, x = coord.double().requires_grad_(), feat.double().requires_grad_()
    ref = ref_op(c, x)
    go = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (c, x), go)
    c32, x32 = coord.detach().requires_grad_(), feat.detach().requires_grad_()
    out = op(c32, x32)
    grads = torch.autograd.grad(out, (c32, x32), go.float())
    for what, got, want in (("out", out, ref), ("grad coord", grads[0], ref_grads[0]),
                            ("grad feat", grads[1], ref_grads[1])):
        rel = ((got.double() - want).norm() / want.norm()).item()
        FIGURES.append(f"{name} float32 accuracy, {what}: rel Frobenius err {rel:.2e}")
        assert rel < 1e-5


def test_aev_backward_is_deterministic(aev_batch):
    """No atomics in the backward or the double backward: two runs give bitwise equal results."""
    from aimnet_fast.kernels.angular import angular_contract
    from aimnet_fast.kernels.radial import radial_contract
    _, coord, nb, afv, pair_feat = aev_batch
    runs = []
    for _ in range(2):
        c = coord.detach().requires_grad_()
        a, p = afv.detach().requires_grad_(), pair_feat.detach().requires_grad_()
        e = 0.5 * radial_contract(c, nb.radial, a).square().sum() \
            + 0.5 * angular_contract(c, nb.triplets, p, nb.triplet_pair).square().sum()
        grads = torch.autograd.grad(e, (c, a, p), create_graph=True)
        runs.append((*grads, *torch.autograd.grad(grads[0].square().sum(), (c, a, p))))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def teardown_module(module):
    if FIGURES:
        print("\n" + "\n".join(FIGURES))
