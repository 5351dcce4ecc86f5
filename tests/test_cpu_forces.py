"""The cpu backend's energies and forces without autograd (``aimnet_fast.cpu_forces``) against the
reference backend differentiated by autograd: float64 to 1e-10 on the released weights and on
random ones with 1–3 passes, molecules of 1–30 atoms (an atom alone, molecules without triplets),
float32 no further from float64 than the autograd path, the native kernels' outputs filled with
NaN first; and every input it was not written for handed back (None) to the autograd path."""
import copy
import dataclasses

import pytest
import torch

from aimnet_fast import cpu_forces, cpu_native, ops
from aimnet_fast.batch import Batch
from aimnet_fast.model import AIMNet

from test_cpu_backend import _cluster
from test_cpu_native import needs_compiler, poisoned  # noqa: F401  (a fixture)

pytestmark = needs_compiler
KEYS = ("energy", "forces", "charges", "elmoments", "volumes", "atomic_energies")


def _frozen(model, backend, dtype=torch.float64):
    m = copy.deepcopy(model).to(dtype).requires_grad_(False)
    m.backend = backend
    return m


def _by_autograd(model, numbers, coord, mol_idx, n_mol):
    """The reference's outputs and −d energy.sum()/d coord by autograd (the model's own backend)."""
    c = coord.clone().requires_grad_(True)
    out = model(numbers, c, mol_idx, n_mol, all_passes=False)
    out["forces"] = -torch.autograd.grad(out["energy"].sum(), c)[0]
    return {k: out[k].detach() for k in KEYS}


def _by_hand(model, numbers, coord, mol_idx, n_mol):
    nb = ops.build_neighbors(coord, mol_idx, "cpu")
    out = ops.energy_forces(model, numbers, coord, mol_idx, n_mol, nb)
    assert out is not None, "the path without autograd did not run"
    return out


def _assert_close(got, want, tol, scale_floor=1.0):
    for k in KEYS:
        err = float((got[k].double() - want[k].double()).abs().max()
                    / want[k].double().abs().max().clamp(min=scale_floor))
        assert err < tol, f"{k}: relative error {err:.3g}"


def _random_batch(seed, dtype=torch.float64):
    """12 molecules of 1–30 atoms of H, C, N, O (the first an atom alone)."""
    coord, mol_idx = _cluster(12, seed, dtype)
    g = torch.Generator().manual_seed(seed + 5)
    numbers = torch.tensor([1, 6, 7, 8])[torch.randint(0, 4, (coord.shape[0],), generator=g)]
    return numbers, coord, mol_idx, int(mol_idx[-1]) + 1


def test_released_model_equals_the_reference_in_float64(released_models, reference_molecules,
                                                        poisoned):  # noqa: F811
    """The 20 reference molecules in one batch: every output, 1e-10 relative to its largest."""
    b = Batch.from_molecules([(m["numbers"], m["coord_A"]) for m in reference_molecules],
                             dtype=torch.float64)
    args = (b.numbers, b.coord, b.mol_idx, b.n_mol)
    got = _by_hand(_frozen(released_models[1], "cpu"), *args)
    want = _by_autograd(_frozen(released_models[1], "torch"), *args)
    _assert_close(got, want, 1e-10)


@pytest.mark.parametrize("n_pass", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("recompute", [False, True])
def test_random_weights_and_molecules_equal_the_reference_in_float64(n_pass, seed, recompute,
                                                                      poisoned,  # noqa: F811
                                                                      monkeypatch):
    """Random weights (so that no released value hides an error), 1–3 passes, random molecules;
    the pair MLP's first layer kept, and made again in the backward (as for large molecules)."""
    if recompute:
        monkeypatch.setattr(cpu_forces, "RECOMPUTE_MIN_PAIRS", 0)
    torch.manual_seed(seed)
    model = AIMNet(n_pass=n_pass)
    for p in model.parameters():  # larger than the initialisation's, so every path matters
        p.data.mul_(1.5)
    args = _random_batch(seed)
    got = _by_hand(_frozen(model, "cpu"), *args)
    want = _by_autograd(_frozen(model, "torch"), *args)
    _assert_close(got, want, 1e-10)


def test_molecules_without_triplets_or_pairs():
    """Atoms alone and diatomics only: no triplets at all, then no pairs at all."""
    model = _frozen(AIMNet(), "cpu")
    ref = _frozen(model, "torch")
    numbers = torch.tensor([1, 1, 8, 6, 6])
    coord = torch.tensor([[0.0, 0, 0], [0.74, 0, 0], [10, 0, 0], [20, 0, 0], [21.2, 0, 0]],
                         dtype=torch.float64)
    mol_idx = torch.tensor([0, 0, 1, 2, 2])
    for keep in (slice(None), slice(2, 3)):
        args = (numbers[keep], coord[keep], mol_idx[keep] - mol_idx[keep][0],
                int(mol_idx[keep][-1] - mol_idx[keep][0]) + 1)
        _assert_close(_by_hand(model, *args), _by_autograd(ref, *args), 1e-10)


def test_float32_is_as_close_to_float64_as_the_autograd_path(released_models, reference_molecules):
    """In float32, no further from the float64 reference than the autograd path on the same
    backend (×2, plus one float32 rounding), output by output."""
    b = Batch.from_molecules([(m["numbers"], m["coord_A"]) for m in reference_molecules],
                             dtype=torch.float64)
    want = _by_autograd(_frozen(released_models[0], "torch"), b.numbers, b.coord, b.mol_idx,
                        b.n_mol)
    args32 = (b.numbers, b.coord.float(), b.mol_idx, b.n_mol)
    m32 = _frozen(released_models[0], "cpu", torch.float32)
    got = _by_hand(m32, *args32)
    with ops.first_order():
        autograd = _by_autograd(m32, *args32)
    ulp = {"energy": 0.0, "forces": 1e-7, "charges": 1e-7, "elmoments": 1e-7, "volumes": 4e-6,
           "atomic_energies": 0.0}
    for k in KEYS:
        e_got = float((got[k].double() - want[k]).abs().max())
        e_auto = float((autograd[k].double() - want[k]).abs().max())
        assert e_got <= 2 * e_auto + ulp[k], (k, e_got, e_auto)
    assert float((got["forces"].double() - want["forces"]).abs().max()) < 2e-6


def test_inputs_it_was_not_written_for_go_to_autograd(monkeypatch):
    """None (the caller then differentiates by autograd) for weights that need gradients, another
    dtype than the weights', the reference backend, lists not sorted by centre, and no native
    kernels."""
    model = _frozen(AIMNet(), "cpu")
    numbers, coord, mol_idx, n_mol = _random_batch(3)
    nb = ops.build_neighbors(coord, mol_idx, "cpu")
    assert ops.energy_forces(model, numbers, coord, mol_idx, n_mol, nb) is not None

    trained = copy.deepcopy(model).requires_grad_(True)
    assert ops.energy_forces(trained, numbers, coord, mol_idx, n_mol, nb) is None
    assert ops.energy_forces(model, numbers, coord.float(), mol_idx, n_mol, nb) is None
    reference = _frozen(model, "torch")
    assert ops.energy_forces(reference, numbers, coord, mol_idx, n_mol, nb) is None
    order = torch.randperm(nb.radial.shape[1], generator=torch.Generator().manual_seed(0))
    shuffled = dataclasses.replace(nb, radial=nb.radial[:, order])
    assert cpu_forces.energy_forces(model, numbers, coord, mol_idx, n_mol, shuffled) is None
    monkeypatch.setattr(cpu_native, "library", lambda: None)
    assert cpu_forces.energy_forces(model, numbers, coord, mol_idx, n_mol, nb) is None


def test_the_predict_command_takes_this_path(released_models, reference_molecules, monkeypatch):
    """``predict_arrays`` with forces on the cpu backend computes them here, and gives what the
    autograd path gives (float64, 1e-10)."""
    from aimnet_fast.predict import predict_arrays
    b = Batch.from_molecules([(m["numbers"], m["coord_A"]) for m in reference_molecules[:5]],
                             dtype=torch.float64)
    model = _frozen(released_models[2], "cpu")
    calls = []
    real = cpu_forces.energy_forces
    monkeypatch.setitem(ops.IMPLEMENTATIONS, "cpu", ops.IMPLEMENTATIONS["cpu"]._replace(
        energy_forces=lambda *a: calls.append(1) or real(*a)))
    got = predict_arrays([model], b, forces=True)
    assert calls == [1]
    monkeypatch.setitem(ops.IMPLEMENTATIONS, "cpu",
                        ops.IMPLEMENTATIONS["cpu"]._replace(energy_forces=None))
    want = predict_arrays([model], b, forces=True)
    for k in want:
        assert abs(got[k] - want[k]).max() < 1e-10, k


def test_the_kept_pair_table_follows_weights_changed_in_place():
    """The first pass's pair features are kept per model; weights changed in place (an optimizer
    step, a loaded state dict) make them anew: the outputs then equal the changed model's."""
    model = _frozen(AIMNet(), "cpu")
    args = _random_batch(4)
    first = _by_hand(model, *args)
    with torch.no_grad():
        model.combine_mlp[0].weight.mul_(1.3)
        model.afv_table.add_(0.1)
    changed = _by_hand(model, *args)
    assert (changed["energy"] - first["energy"]).abs().max() > 1e-5
    _assert_close(changed, _by_autograd(_frozen(model, "torch"), *args), 1e-10)
