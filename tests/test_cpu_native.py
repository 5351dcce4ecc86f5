"""The cpu backend's native kernels (``aimnet_fast.cpu_native``, C compiled on first use) against
the float64 reference: the centre sums of both contractions with their gradients (float64 to
1e-10, float32 to float32 precision, outputs filled with NaN before the kernels write them), the
ELU against float64 expm1 over every range of its argument, and what happens without them: no
compiler, a failing one, lists not sorted by centre, features the kernels do not take, a double
backward."""
import math
import warnings

import numpy as np
import pytest
import torch

from aimnet_fast import aev, cpu_aev, cpu_native
from aimnet_fast.ops import first_order

from test_cpu_backend import _inputs

needs_compiler = pytest.mark.skipif(cpu_native._compiler() is None,
                                    reason="no C compiler ($CC or cc) on this machine")


@pytest.fixture
def poisoned(monkeypatch):
    """The kernels' outputs filled with NaN (integers: −7) before they are written."""
    def empty(*shape, dtype=None):
        poison = float("nan") if dtype is None or dtype.is_floating_point else -7  # int: no NaN
        return torch.full(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape,
                          poison, dtype=dtype)
    monkeypatch.setattr(cpu_native, "_empty", empty)


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the native centre sums (forward, backward) actually run."""
    calls = {"forward": 0, "backward": 0}
    for name, key in (("centre_sum", "forward"), ("centre_sum_backward", "backward")):
        real = getattr(cpu_native, name)

        def counted(*a, _real=real, _key=key, **k):
            calls[_key] += 1
            return _real(*a, **k)
        monkeypatch.setattr(cpu_native, name, counted)
    return calls


@needs_compiler
def test_the_kernels_build_where_there_is_a_compiler():
    assert cpu_native.library() is not None


def _contract(impl, which, coord, nb, feat):
    if which == "radial":
        return impl.radial_contract(coord, nb.radial, feat)
    return impl.angular_contract(coord, nb.triplets, feat, nb.triplet_pair)


def _values_and_gradients(impl, which, coord, nb, afv, pair_feat, dtype, inside_first_order):
    c = coord.to(dtype).clone().requires_grad_(True)
    feat = (afv if which == "radial" else pair_feat).to(dtype).clone().requires_grad_(True)
    with first_order() if inside_first_order else torch.enable_grad():
        out = _contract(impl, which, c, nb, feat)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        grads = torch.autograd.grad((out * w.to(dtype)).sum(), (c, feat))
    return out.detach().double(), *(g.double() for g in grads)


@needs_compiler
@pytest.mark.parametrize("which", ["radial", "angular"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_centre_sums_equal_the_reference_in_float64(which, seed, poisoned, native_calls):
    """Values, d/dcoord and d/dfeature inside first_order(), on molecules of 1–30 atoms (centres
    with 0 to ~60 terms), against the reference's float64 contraction."""
    coord, nb, afv, pair_feat = _inputs(seed)
    want = _values_and_gradients(aev, which, coord, nb, afv, pair_feat, torch.float64, False)
    got = _values_and_gradients(cpu_aev, which, coord, nb, afv, pair_feat, torch.float64, True)
    assert native_calls == {"forward": 1, "backward": 1}
    for name, x, r in zip(("value", "d/dcoord", "d/dfeat"), got, want):
        err = float((x - r).abs().max() / r.abs().max().clamp(min=1.0))
        assert err < 1e-10, f"{which} {name}: relative error {err:.3g}"


@needs_compiler
@pytest.mark.parametrize("which", ["radial", "angular"])
def test_native_centre_sums_in_float32_are_as_close_as_the_rows(which, poisoned, native_calls):
    """In float32 the native sums (another order of summation) are no further from float64 than
    the cpu backend's rows path (the torch code it replaces) is, within 2× and 1e-6."""
    coord, nb, afv, pair_feat = _inputs(4)
    want = _values_and_gradients(aev, which, coord, nb, afv, pair_feat, torch.float64, False)
    native = _values_and_gradients(cpu_aev, which, coord, nb, afv, pair_feat, torch.float32, True)
    assert native_calls == {"forward": 1, "backward": 1}
    rows = _values_and_gradients(cpu_aev, which, coord, nb, afv, pair_feat, torch.float32, False)
    assert native_calls == {"forward": 1, "backward": 1}   # outside first_order: the rows
    for name, x, y, r in zip(("value", "d/dcoord", "d/dfeat"), native, rows, want):
        scale = float(r.abs().max())
        err, err_rows = float((x - r).abs().max()), float((y - r).abs().max())
        assert err <= 2 * err_rows + 1e-6 * scale, f"{which} {name}: {err:.3g} vs rows {err_rows:.3g}"


@needs_compiler
def test_no_grad_forward_uses_the_native_sums(native_calls):
    coord, nb, afv, pair_feat = _inputs(5)
    want = aev.angular_contract(coord, nb.triplets, pair_feat, nb.triplet_pair)
    with torch.no_grad():
        got = cpu_aev.angular_contract(coord, nb.triplets, pair_feat, nb.triplet_pair)
    assert native_calls["forward"] == 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_compiler
def test_gradient_of_a_column_slice_and_of_terms_by_channel():
    """The backward reads d out from a column slice of a wider gradient (atoms apart, no copy)
    and writes d terms as a (C, T) tensor's transposed view; both as from contiguous tensors."""
    g = torch.Generator().manual_seed(2)
    centre = torch.tensor([0, 0, 0, 2, 2, 3])
    ptr = torch.tensor([0, 3, 3, 5, 6])
    feat_index = torch.tensor([1, 0, 1, 2, 0, 2])
    terms = torch.randn(6, 32, generator=g, dtype=torch.float64)
    feat = torch.randn(3, 16, generator=g, dtype=torch.float64)
    wide = torch.randn(4, 40 * 16, generator=g, dtype=torch.float64)
    d_out = wide[:, 8 * 16:].view(4, 32, 16)                       # atoms 640 apart
    assert not d_out.is_contiguous()
    want = torch.einsum("tc,tf->tcf", terms, feat[feat_index])
    want_d_terms = torch.einsum("tcf,tf->tc", d_out[centre], feat[feat_index])
    want_d_feat = torch.zeros(3, 16, dtype=torch.float64).index_add_(
        0, feat_index, torch.einsum("tc,tcf->tf", terms, d_out[centre]))
    out = cpu_native.centre_sum(terms, feat, ptr, feat_index)
    torch.testing.assert_close(out, torch.zeros(4, 32, 16, dtype=torch.float64)
                               .index_add_(0, centre, want), rtol=1e-14, atol=1e-14)
    for by_channel in (False, True):
        d_terms, d_feat = cpu_native.centre_sum_backward(terms, feat, ptr, feat_index, d_out,
                                                         True, True, by_channel)
        assert d_terms.t().is_contiguous() == by_channel
        torch.testing.assert_close(d_terms, want_d_terms, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(d_feat, want_d_feat, rtol=1e-14, atol=1e-14)
    assert cpu_native.centre_sum_backward(terms, feat, ptr, feat_index, d_out, False, False) \
        == (None, None)


def _radial_inside_first_order_equals_the_reference(coord, pairs, afv, reference_pairs=None):
    """``cpu_aev.radial_contract`` on ``pairs`` inside first_order(), value and d/dcoord, against
    the reference's on ``reference_pairs`` (the same list in the reference's order; default
    ``pairs``)."""
    with first_order():
        c = coord.clone().requires_grad_(True)
        got = cpu_aev.radial_contract(c, pairs, afv)
        (d,) = torch.autograd.grad(got.sum(), c)
    c = coord.clone().requires_grad_(True)
    want = aev.radial_contract(c, pairs if reference_pairs is None else reference_pairs, afv)
    (d_want,) = torch.autograd.grad(want.sum(), c)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d, d_want, rtol=1e-10, atol=1e-10)


@needs_compiler
def test_lists_not_sorted_by_centre_take_the_rows(native_calls):
    coord, nb, afv, pair_feat = _inputs(6)
    order = torch.randperm(nb.radial.shape[1], generator=torch.Generator().manual_seed(0))
    shuffled = nb.radial[:, order].contiguous()
    _radial_inside_first_order_equals_the_reference(coord, shuffled, afv, nb.radial)
    assert native_calls == {"forward": 0, "backward": 0}


@needs_compiler
def test_plans_of_sorted_lists_and_indices_out_of_range():
    centre = torch.tensor([0, 1, 1, 4, 4, 4])             # atoms 2, 3 and 5: no terms
    plan = cpu_aev.csr_plan(centre, torch.tensor([0, 1, 4, 2, 3, 0]), 5, 6,
                            atoms=torch.tensor([[1, 2, 3, 4, 5, 0]]))
    assert plan.ptr.tolist() == [0, 1, 3, 3, 3, 6, 6]
    assert cpu_aev.csr_plan(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long),
                            5, 3).ptr.tolist() == [0, 0, 0, 0]
    for centre, feat_index, atoms in (([0, 1, 1], [0, 1, 5], None), ([0, 1, 2], [0, 1, 1], None),
                                      ([-1, 0, 1], [0, 1, 1], None), ([0, 1, 1], [0, -1, 1], None),
                                      ([0, 1, 1], [0, 1, 1], [[0, 2, 1]]),
                                      ([0, 1, 1], [0, 1, 1], [[0, 1, -3]])):
        with pytest.raises(ValueError, match="out of range"):
            cpu_aev.csr_plan(torch.tensor(centre), torch.tensor(feat_index), 5, 2,
                             atoms=None if atoms is None else torch.tensor(atoms))
    assert cpu_aev.csr_plan(torch.tensor([1, 0]), torch.tensor([0, 0]), 1, 2) is None  # unsorted


@needs_compiler
def test_features_the_kernels_do_not_take_are_summed_by_torch(native_calls):
    """Three features a row instead of 16: the terms' plan is the native one, the sum torch's."""
    coord, nb, _, _ = _inputs(7)
    afv = torch.randn(coord.shape[0], 3, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)
    _radial_inside_first_order_equals_the_reference(coord, nb.radial, afv)
    assert native_calls == {"forward": 0, "backward": 0}


@needs_compiler
def test_a_double_backward_inside_first_order_is_refused():
    coord, nb, afv, _ = _inputs(8)
    with first_order():
        c = coord.clone().requires_grad_(True)
        out = cpu_aev.radial_contract(c, nb.radial, afv)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(out.sum(), c, create_graph=True)


# -- the AEV terms -------------------------------------------------------------------------------
def _as_molecules(r_ij, r_ik):
    """Each pair of bond vectors as one triplet (i, j, k) of its own three atoms, centre at 0."""
    n = r_ij.shape[0]
    coord = torch.stack([torch.zeros_like(r_ij), r_ij, r_ik], 1).reshape(3 * n, 3)
    base = 3 * torch.arange(n)
    return coord, torch.stack([base, base + 1, base + 2])


@needs_compiler
def test_native_angular_terms_at_the_clamp_and_the_cutoff_against_finite_differences():
    """θ near 0 and π on both sides of the clamp, distances near and beyond the angular cutoff:
    the native terms equal the reference's arccos form, their coordinate gradient finite
    differences (gradcheck, float64)."""
    from test_cpu_backend import _triplet_inputs
    coord, triplets = _as_molecules(*_triplet_inputs())
    r_i = coord[triplets[0]]
    want = aev.angular_terms(coord[triplets[1]] - r_i, coord[triplets[2]] - r_i)
    got = cpu_aev.NativeAngularTerms.apply(coord, triplets)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    c = coord.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: cpu_aev.NativeAngularTerms.apply(x, triplets), (c,))


@needs_compiler
def test_native_radial_terms_beyond_the_cutoff_and_in_float32():
    """Distances from 0.6 Å to beyond the radial cutoff (4.6 Å); in float32 the Gaussians that
    underflow still as the torch code's (floored at e·tiny); gradients against finite differences."""
    g = torch.Generator().manual_seed(13)
    d = torch.cat([torch.tensor([0.6, 1.0, 4.5, 4.599, 4.7], dtype=torch.float64),
                   0.6 + 4.0 * torch.rand(10, generator=g, dtype=torch.float64)])
    u = torch.nn.functional.normalize(torch.randn(d.numel(), 3, generator=g, dtype=torch.float64))
    coord = torch.cat([torch.zeros(1, 3, dtype=torch.float64), d[:, None] * u])
    pairs = torch.stack([torch.zeros(d.numel(), dtype=torch.long), torch.arange(1, d.numel() + 1)])
    got = cpu_aev.NativeRadialTerms.apply(coord, pairs)
    torch.testing.assert_close(got, aev.radial_terms(d), rtol=1e-12, atol=1e-14)
    c = coord.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: cpu_aev.NativeRadialTerms.apply(x, pairs), (c,))
    want = aev.radial_terms(d)
    got32 = cpu_aev.NativeRadialTerms.apply(coord.float(), pairs).double()
    torch_code32 = cpu_aev.RadialTerms.apply((coord[1:] - coord[0]).float()).double()
    err, err_torch_code = (got32 - want).abs().max(), (torch_code32 - want).abs().max()
    assert err <= 2 * err_torch_code + 1e-7, (err, err_torch_code)
    underflow = want < 1e-38
    assert underflow.sum() > 10 and (got32[underflow] < 1e-37).all()


# -- the ELU ------------------------------------------------------------------------------------
def _elu_arguments():
    dense = torch.linspace(-30.0, 0.0, 1_000_001, dtype=torch.float32)
    tiny = -torch.logspace(-40, 1.5, 200_001, dtype=torch.float32)  # subnormal to -31.6
    rnd = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 4
    # every float32 near the points where x / ln 2 rounds to the next integer
    edges = torch.cat([torch.nextafter(torch.full((64,), k * math.log(2) / 2, dtype=torch.float32),
                                       torch.tensor(0.0)) for k in range(-50, 1)])
    special = torch.tensor([0.0, -0.0, 1.0, 3.5, 1e30, -1e30, float("inf"), -float("inf")])
    return torch.cat([dense, tiny, rnd, edges, special])


@needs_compiler
def test_native_elu_within_nine_tenths_of_an_ulp():
    """Measured: 0.87 ulp at most (torch's own float32 ELU: 1.0 ulp, at −16.6)."""
    x = _elu_arguments()
    got = cpu_native.elu_(x.clone(), 1.0)
    finite = x.isfinite()
    exact = torch.where(x.double() > 0, x.double(), torch.expm1(x.double()))[finite]
    # the float32 spacing at the exact value: 2^(e − 24) for |exact| in [2^(e−1), 2^e)
    ulp = torch.ldexp(torch.ones_like(exact), (torch.frexp(exact).exponent - 24).clamp(min=-149))
    err = ((got[finite].double() - exact).abs() / ulp).max()
    assert err <= 0.9, f"{err:.3f} ulp"
    # positive arguments, zeros of either sign, infinities exactly as torch's
    exact_cases = (x >= 0) | x.isinf()
    assert torch.equal(got[exact_cases], torch.nn.functional.elu(x)[exact_cases])
    assert torch.equal(torch.signbit(got[x == 0]), torch.signbit(x[x == 0]))


@needs_compiler
def test_native_elu_nan_alpha_and_what_it_does_not_take():
    x = torch.tensor([float("nan"), -1.0, -0.5, 2.0] * 5)
    got = cpu_native.elu_(x.clone(), 0.7)
    assert got[0::4].isnan().all()
    torch.testing.assert_close(got, torch.nn.functional.elu(x, 0.7), rtol=1e-7, atol=0,
                               equal_nan=True)
    for other in (x.double(), torch.randn(8, 6)[:, ::2]):   # float64, not contiguous: torch's ELU
        out = cpu_native.elu_(other, 1.0)
        assert torch.equal(out, torch.nn.functional.elu(other, 1.0)) or out is other


# -- without the kernels -------------------------------------------------------------------------
@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """library() built afresh into an empty cache, and forgotten again after the test."""
    monkeypatch.setenv("AIMNET_FAST_CACHE", str(tmp_path))
    cpu_native.library.cache_clear()
    cpu_native._function.cache_clear()
    yield tmp_path
    cpu_native.library.cache_clear()
    cpu_native._function.cache_clear()


def test_switched_off_or_without_a_compiler_the_backend_is_the_torch_code(fresh_library,
                                                                          monkeypatch,
                                                                          native_calls):
    coord, nb, afv, _ = _inputs(9)
    for env, value in (("AIMNET_FAST_NATIVE", "0"), ("CC", "no-such-compiler-here")):
        monkeypatch.setenv(env, value)
        cpu_native.library.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")                 # nothing to warn about: a choice
            assert cpu_native.library() is None
        _radial_inside_first_order_equals_the_reference(coord, nb.radial, afv)
        monkeypatch.delenv(env)
    assert native_calls == {"forward": 0, "backward": 0}
    assert cpu_native.elu_(torch.tensor([-1.0]), 1.0) == torch.tensor([math.expm1(-1.0)])


def test_a_failing_compiler_warns_once_and_leaves_no_file(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", "false")                      # exits 1 without output
    with pytest.warns(RuntimeWarning, match="native kernels are not available"):
        assert cpu_native.library() is None
    assert cpu_native.library() is None                    # decided once
    assert list(fresh_library.iterdir()) == []


@needs_compiler
def test_built_once_into_the_cache(fresh_library):
    assert cpu_native.library() is not None
    built = list(fresh_library.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    path = cpu_native._build(cpu_native._compiler())    # a second process: found, not rebuilt
    assert path == built[0] and path.stat().st_mtime_ns == stamp
    assert list(fresh_library.iterdir()) == built


@needs_compiler
def test_predict_path_with_and_without_the_kernels(released_models, reference_molecules,
                                                   monkeypatch, native_calls):
    """The predict path (first_order, the cpu backend) on the 20 reference molecules in float64,
    with the native kernels and with the torch code: the same energies, forces, charges."""
    import copy
    from aimnet_fast.batch import Batch
    from aimnet_fast.predict import predict_arrays
    model = copy.deepcopy(released_models[0]).double().requires_grad_(False)
    model.backend = "cpu"
    b = Batch.from_molecules([(m["numbers"], m["coord_A"]) for m in reference_molecules],
                             dtype=torch.float64)
    native = predict_arrays([model], b, forces=True)
    assert native_calls["forward"] == 6 and native_calls["backward"] == 6   # 3 passes × 2
    monkeypatch.setattr(cpu_native, "library", lambda: None)
    plain = predict_arrays([model], b, forces=True)
    for key in ("energy_Ha", "forces_Ha_per_A", "charges_e", "volumes_bohr3"):
        np.testing.assert_allclose(native[key], plain[key], rtol=0, atol=1e-10, err_msg=key)


@needs_compiler
@pytest.mark.parametrize("seed", [0, 1])
def test_native_triplets_and_unique_pairs_equal_the_reference(seed, poisoned):
    """On the angular pairs of molecules of 1–30 atoms, outputs filled with −7 first."""
    from aimnet_fast import neighbors as reference
    coord, nb, _, _ = _inputs(seed)
    n = coord.shape[0]
    triplets, pairs, triplet_pair = cpu_native.triplets_and_pairs(nb.angular, n)
    want_triplets, _ = reference.triplets_from_pairs(nb.angular, n)
    want_pairs, want_triplet_pair = reference.unique_pairs(want_triplets, n)
    assert triplets.shape[1] > 100
    for got, want in ((triplets, want_triplets), (pairs, want_pairs),
                      (triplet_pair, want_triplet_pair)):
        assert torch.equal(got, want)
    empty = cpu_native.triplets_and_pairs(torch.zeros(2, 0, dtype=torch.long), 4)
    assert [t.shape for t in empty] == [(3, 0), (2, 0), (0,)]


@needs_compiler
@pytest.mark.parametrize("which", ["radial", "angular"])
def test_native_sums_on_several_threads_equal_the_reference(which, poisoned, native_calls):
    """A batch large enough for the kernels' threads (OpenMP, with rows of their own for the sums
    into shared rows): one and two threads against the float64 reference, 1e-10."""
    from test_cpu_backend import _cluster
    from aimnet_fast.constants import N_FEATURE
    from aimnet_fast.neighbors import build_neighbors
    coord, mol_idx = _cluster(150, 21)
    nb = build_neighbors(coord, mol_idx)
    g = torch.Generator().manual_seed(22)
    afv = torch.randn(coord.shape[0], N_FEATURE, generator=g, dtype=torch.float64)
    pair_feat = torch.randn(nb.pairs.shape[1], N_FEATURE, generator=g, dtype=torch.float64)
    assert min(nb.radial.shape[1], nb.triplets.shape[1]) > 4 * 2048   # PARALLEL_MIN_TERMS
    want = _values_and_gradients(aev, which, coord, nb, afv, pair_feat, torch.float64, False)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = _values_and_gradients(cpu_aev, which, coord, nb, afv, pair_feat, torch.float64,
                                        True)
            for name, x, r in zip(("value", "d/dcoord", "d/dfeat"), got, want):
                err = float((x - r).abs().max() / r.abs().max().clamp(min=1.0))
                assert err < 1e-10, f"{n} threads, {which} {name}: relative error {err:.3g}"
    finally:
        torch.set_num_threads(threads)
    assert native_calls == {"forward": 2, "backward": 2}


# -- the matrix products of the MLPs at few rows ---------------------------------------------------
def _matmul_bound(x, b, bias):
    """|error| of a float32 sum of K products in blocks of 128 (then of the block sums): at most
    (min(K, 128) + K / 128 + 2) float32 roundings of Σ_k |x_mk b_kn| + |bias_n| (Higham's bound)."""
    K = x.shape[1]
    scale = x.double().abs() @ b.double().abs()
    if bias is not None:
        scale = scale + bias.double().abs()
    return (min(K, 128) + K / 128 + 2) * 2.0 ** -24 * scale + 1e-30


@needs_compiler
@pytest.mark.parametrize("M", [0, 1, 6, 7, 8, 21, 57, 130])
@pytest.mark.parametrize("K, N", [(0, 32), (1, 16), (17, 5), (128, 48), (129, 272), (300, 32),
                                  (768, 512)])
def test_matmul_equals_float64(M, K, N, poisoned):
    """x @ B + bias, then the ELU, against float64 within the float32 rounding bound of the sums,
    for every remainder of the tiles (rows by 7 or 3, columns by 32, k by 128), x with rows
    apart (a column slice), B packed from a transposed view (Wᵀ, the forward's) and from W (the
    backward's), outputs filled with NaN first."""
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    x = torch.randn(M, K + 3, generator=g)[:, 1:K + 1]   # rows K + 3 apart
    w = torch.randn(N, K, generator=g)
    bias = torch.randn(N, generator=g)
    for b, packed in ((w.t(), cpu_native.pack_panels(w.t())), (w.t().contiguous(), None)):
        packed = cpu_native.pack_panels(b) if packed is None else packed
        assert packed.shape == (-(-N // 32), K, 32)
        want = x.double() @ b.double()
        for with_bias in (None, bias):
            bound = _matmul_bound(x, b, with_bias)
            ref = want + (0 if with_bias is None else with_bias.double())
            got = cpu_native.matmul(x, packed, N, with_bias)
            assert got.shape == (M, N) and not got.isnan().any()
            assert ((got.double() - ref).abs() <= bound).all()
            elu = cpu_native.matmul(x, packed, N, with_bias, elu_alpha=1.0)
            ref_elu = torch.nn.functional.elu(ref)   # 1-Lipschitz: the same bound, plus an ulp
            assert ((elu.double() - ref_elu).abs() <= bound + 2.0 ** -23 * ref_elu.abs()).all()


@needs_compiler
def test_matmul_is_the_same_on_one_and_two_threads():
    """Above the parallel threshold every output is still one tile's sum in k order: the same
    bits on one thread and on two."""
    g = torch.Generator().manual_seed(5)
    x, w, bias = torch.randn(300, 768, generator=g), torch.randn(512, 768, generator=g), \
        torch.randn(512, generator=g)
    packed = cpu_native.pack_panels(w.t())
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(cpu_native.matmul(x, packed, 512, bias, elu_alpha=1.0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@needs_compiler
def test_matmul_refuses_what_does_not_fit():
    packed = cpu_native.pack_panels(torch.randn(8, 40))
    with pytest.raises(ValueError):
        cpu_native.matmul(torch.randn(3, 9), packed, 40)          # K 9 against 8
    with pytest.raises(ValueError):
        cpu_native.matmul(torch.randn(3, 8), packed, 65)          # 65 columns from 2 panels
    with pytest.raises(ValueError):
        cpu_native.matmul(torch.randn(3, 8), packed, 40, torch.randn(41))


@needs_compiler
def test_mlp_products_at_few_rows_are_native_and_equal_float64(released_models, monkeypatch):
    """The embedding MLP of the released model on 21 rows inside first_order(): its large
    layers' products by ``cpu_native.matmul`` (ELU in the epilogue), values and input gradient
    as close to the float64 ``nn.Sequential`` as torch's float32 products are (×2)."""
    import copy
    from aimnet_fast import cpu_mlp
    net = copy.deepcopy(released_models[0].embedding_mlp).requires_grad_(False)
    calls = []
    real = cpu_native.matmul
    monkeypatch.setattr(cpu_native, "matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(4)
    x, gy = torch.randn(21, 768, generator=g), torch.randn(21, 256, generator=g)
    x64 = x.double().requires_grad_(True)
    net64 = copy.deepcopy(net).double()
    ref_y = net64(x64)
    (ref_g,) = torch.autograd.grad(ref_y, x64, gy.double())

    def run():
        xx = x.clone().requires_grad_(True)
        with first_order():
            y = cpu_mlp.elu_mlp(xx, net)
            return y.detach(), torch.autograd.grad(y, xx, gy)[0]

    y, gx = run()
    assert len(calls) == 6   # three layers forward, three backward
    monkeypatch.setattr(cpu_mlp, "_native_product", lambda *a: False)
    y_mkl, g_mkl = run()
    for got, other, want in ((y, y_mkl, ref_y.detach()), (gx, g_mkl, ref_g)):
        err = float((got.double() - want).abs().max())
        assert err <= 2 * float((other.double() - want).abs().max()) + 1e-7, err


@needs_compiler
def test_products_never_read_a_stale_copy_of_the_weights():
    """Weights trained by torch's fused Adam (which counts no version) and frozen weights changed
    in place: the next no-grad forward equals the ``nn.Sequential`` as it is now."""
    from aimnet_fast import cpu_mlp
    from aimnet_fast.model import build_elu_mlp
    torch.manual_seed(6)
    net = build_elu_mlp([768, 512, 256, 256], last_activation=True)
    x = torch.randn(21, 768)
    with torch.no_grad():
        cpu_mlp.elu_mlp(x, net)
    net(x).square().sum().backward()
    torch.optim.Adam(net.parameters(), lr=0.05, fused=True).step()
    with torch.no_grad():
        torch.testing.assert_close(cpu_mlp.elu_mlp(x, net), net(x), rtol=1e-5, atol=1e-5)
    net.requires_grad_(False)
    calls = []
    real = cpu_native.matmul
    try:
        cpu_native.matmul = lambda *a, **k: calls.append(1) or real(*a, **k)
        with torch.no_grad():
            cpu_mlp.elu_mlp(x, net)                       # frozen: packed, kept
            net[0].weight.mul_(0.5)                        # an in-place change counts a version
            torch.testing.assert_close(cpu_mlp.elu_mlp(x, net), net(x), rtol=1e-5, atol=1e-5)
    finally:
        cpu_native.matmul = real
    assert calls
