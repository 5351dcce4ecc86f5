"""The ASE calculator: energies and forces of the original model converted to eV and eV/Å."""
import numpy as np
import pytest

ase = pytest.importorskip("ase")
from ase import Atoms  # noqa: E402
from ase.calculators.calculator import PropertyNotImplementedError  # noqa: E402

from aimnet_fast.ase_calculator import AIMNetCalculator  # noqa: E402
from aimnet_fast.batch import InputError  # noqa: E402
from aimnet_fast.checkpoint import convert_released, save_model  # noqa: E402
from aimnet_fast.units import HARTREE_TO_EV  # noqa: E402

MOLECULES = (0, 9, 19)  # a small ANI-1x conformer and two S66x8 dimers


@pytest.fixture(scope="module")
def cv_paths(shared, tmp_path_factory):
    d = shared / "aimnet_pretrained"
    out = tmp_path_factory.mktemp("ase")
    paths = []
    for k in (0, 1):
        p = out / f"cv{k}.pt"
        save_model(convert_released(d / f"aimnet_cv{k}.pt", d / f"aimnet_mt_cv{k}.pt"), p)
        paths.append(p)
    return paths


def atoms_of(m):
    return Atoms(numbers=m["numbers"], positions=m["coord_A"])


@pytest.mark.parametrize("k", MOLECULES)
def test_energy_forces_charges_in_ase_units(cv_paths, reference_molecules, k):
    m = reference_molecules[k]
    ref = m["models"][0]
    atoms = atoms_of(m)
    atoms.calc = AIMNetCalculator(str(cv_paths[0]))
    forces = atoms.get_forces()
    energy = atoms.get_potential_energy()
    # limits of tests/test_reference_outputs.py, in eV
    assert abs(energy - ref["energy_Ha"] * HARTREE_TO_EV) < 1e-6 * HARTREE_TO_EV
    np.testing.assert_allclose(forces, np.asarray(ref["forces_Ha_per_A"]) * HARTREE_TO_EV,
                               rtol=0, atol=2e-6 * HARTREE_TO_EV)
    np.testing.assert_allclose(atoms.get_charges(), np.asarray(ref["elmoments"])[0][:, 0],
                               rtol=0, atol=5e-6)


def test_recomputes_after_a_move_and_ensemble(cv_paths, reference_molecules):
    m = reference_molecules[0]
    atoms = atoms_of(m)
    atoms.calc = AIMNetCalculator(cv_paths)  # an ensemble of cv0 and cv1
    e0 = atoms.get_potential_energy()
    refs = [m["models"][cv]["energy_Ha"] * HARTREE_TO_EV for cv in (0, 1)]
    assert abs(e0 - np.mean(refs)) < 1e-6 * HARTREE_TO_EV
    assert abs(atoms.calc.results["energy_std"] - abs(refs[0] - refs[1]) / np.sqrt(2)) \
        < 1e-6 * HARTREE_TO_EV
    # A small step along the forces lowers the energy by about |F|² h (first order).
    f = atoms.get_forces()
    h = 1e-3
    atoms.positions = atoms.positions + h * f
    e1 = atoms.get_potential_energy()
    expected = -h * (f * f).sum()
    assert e1 < e0 and abs((e1 - e0) - expected) < 0.1 * abs(expected)


def test_model_object_smd_and_periodic(shared, reference_molecules):
    d = shared / "aimnet_pretrained"
    smd = convert_released(d / "aimnet_cv0.pt", d / "aimnet_smd_cv0.pt")
    atoms = atoms_of(reference_molecules[0])
    atoms.calc = AIMNetCalculator(smd)
    assert np.isfinite(atoms.get_potential_energy())
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_charges()
    atoms.pbc = True
    atoms.cell = [20, 20, 20]
    with pytest.raises(InputError, match="periodic"):
        atoms.get_potential_energy()


def test_bad_atoms_named(cv_paths):
    atoms = Atoms("HBr", positions=[[0, 0, 0], [0, 0, 1.41]])
    atoms.calc = AIMNetCalculator(str(cv_paths[0]))
    with pytest.raises(InputError, match="ASE Atoms HBr: element Br"):
        atoms.get_potential_energy()
