"""Forces against finite differences (float64), and invariances: permutation, rotation,
translation, batch composition."""
import copy
import math

import pytest
import torch

from aimnet_fast.batch import Batch


@pytest.fixture(scope="module")
def model64(released_models):
    return copy.deepcopy(released_models[0]).double()


def energy_forces(model, b, coord=None):
    coord = (b.coord if coord is None else coord).clone().requires_grad_(True)
    out = model(b.numbers, coord, b.mol_idx, b.n_mol)
    f = -torch.autograd.grad(out["energy"].sum(), coord)[0]
    return out, f


def test_forces_match_central_differences(model64, reference_molecules):
    mol = reference_molecules[0]
    b = Batch.from_molecules([(mol["numbers"], mol["coord_A"])], dtype=torch.float64)
    _, f = energy_forces(model64, b)
    h = 1e-4  # Å; the truncation error h²·E‴ is far below the tolerance
    fd = torch.zeros_like(b.coord)
    with torch.no_grad():
        for a in range(b.n_atoms):
            for x in range(3):
                c = b.coord.clone()
                c[a, x] += h
                ep = model64(b.numbers, c, b.mol_idx, 1)["energy"][0]
                c[a, x] -= 2 * h
                em = model64(b.numbers, c, b.mol_idx, 1)["energy"][0]
                fd[a, x] = -(ep - em) / (2 * h)
    torch.testing.assert_close(f, fd, atol=1e-7, rtol=1e-5)
    assert f.abs().max() > 1e-3  # a real, non-trivial force field


def _rotation(seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.linalg.det(q))


def test_rotation_translation_permutation(model64, reference_molecules):
    mol = reference_molecules[9]
    b = Batch.from_molecules([(mol["numbers"], mol["coord_A"])], dtype=torch.float64)
    out, f = energy_forces(model64, b)
    R = _rotation(1)
    moved = b.coord @ R.T + torch.tensor([3.0, -7.5, 100.0], dtype=torch.float64)
    out2, f2 = energy_forces(model64, b, moved)
    torch.testing.assert_close(out2["energy"], out["energy"], atol=1e-9, rtol=0)
    torch.testing.assert_close(f2, f @ R.T, atol=1e-9, rtol=0)
    torch.testing.assert_close(out2["charges"], out["charges"], atol=1e-9, rtol=0)

    perm = torch.randperm(b.n_atoms, generator=torch.Generator().manual_seed(2))
    bp = Batch.from_molecules([(b.numbers[perm], b.coord[perm])], dtype=torch.float64)
    out3, f3 = energy_forces(model64, bp)
    torch.testing.assert_close(out3["energy"], out["energy"], atol=1e-9, rtol=0)
    torch.testing.assert_close(f3, f[perm], atol=1e-9, rtol=0)
    torch.testing.assert_close(out3["elmoments"], out["elmoments"][perm], atol=1e-9, rtol=0)
    torch.testing.assert_close(out3["volumes"], out["volumes"][perm], atol=1e-9, rtol=0)


def test_batch_composition(model64, reference_molecules):
    """A molecule's outputs do not depend on which molecules share its batch, or their order,
    even when the molecules overlap in space."""
    mols = [(m["numbers"], m["coord_A"]) for m in reference_molecules[:6]]
    singles = [energy_forces(model64, Batch.from_molecules([m], dtype=torch.float64))
               for m in mols]
    order = [3, 0, 5, 1, 4, 2]
    b = Batch.from_molecules([mols[k] for k in order], dtype=torch.float64)
    out, f = energy_forces(model64, b)
    for pos, k in enumerate(order):
        a, e = int(b.offsets[pos]), int(b.offsets[pos + 1])
        torch.testing.assert_close(out["energy"][pos], singles[k][0]["energy"][0], atol=1e-9, rtol=0)
        torch.testing.assert_close(f[a:e], singles[k][1], atol=1e-9, rtol=0)
        torch.testing.assert_close(out["volumes"][a:e], singles[k][0]["volumes"], atol=1e-9, rtol=0)


def test_all_passes_returned(model64, reference_molecules):
    mol = reference_molecules[2]
    b = Batch.from_molecules([(mol["numbers"], mol["coord_A"])], dtype=torch.float64)
    out = model64(b.numbers, b.coord, b.mol_idx, 1)
    assert out["passes"]["energy"].shape == (3, 1)
    assert out["passes"]["charges"].shape == (3, b.n_atoms)
    torch.testing.assert_close(out["passes"]["energy"][-1], out["energy"])
    last_only = model64(b.numbers, b.coord, b.mol_idx, 1, all_passes=False)
    torch.testing.assert_close(last_only["energy"], out["energy"], atol=1e-12, rtol=0)
    # Passes refine the prediction: they are not copies of one another.
    assert (out["passes"]["energy"][0] - out["passes"]["energy"][2]).abs() > 1e-5
    one_pass = model64(b.numbers, b.coord, b.mol_idx, 1, n_pass=1)
    torch.testing.assert_close(one_pass["energy"], out["passes"]["energy"][0], atol=1e-12, rtol=0)


def test_dimer_energy_goes_to_sum_of_monomers(model64):
    """Beyond the 4.6 Å cutoff two molecules do not interact: E(AB) = E(A) + E(B) exactly."""
    water = ([8, 1, 1], [[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0],
                         [0.9572 * math.cos(1.824), 0.9572 * math.sin(1.824), 0.0]])
    w = torch.tensor(water[1], dtype=torch.float64)
    apart = torch.cat([w, w + torch.tensor([6.0, 0.0, 0.0], dtype=torch.float64)])
    dimer = Batch.from_molecules([([8, 1, 1, 8, 1, 1], apart)], dtype=torch.float64)
    mono = Batch.from_molecules([water], dtype=torch.float64)
    e2 = model64(dimer.numbers, dimer.coord, dimer.mol_idx, 1)["energy"][0]
    e1 = model64(mono.numbers, mono.coord, mono.mol_idx, 1)["energy"][0]
    torch.testing.assert_close(e2, 2 * e1, atol=1e-10, rtol=0)
