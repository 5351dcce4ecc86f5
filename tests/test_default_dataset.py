"""The embedded default data set (aimnet_fast/data/default.h5, GFN2-xTB labels).

Checks layout, units and physics against independent references: shapes and dtypes, element
coverage, neutrality of the charges, a least-squares fit of energies on element counts done here,
and (when tblite is importable) the stored energies and forces against fresh tblite single points
and a central finite difference of the tblite energy (true-force sign, Ha/Å).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from aimnet_fast.units import BOHR_TO_A

h5py = pytest.importorskip("h5py")

# The variable lets a check run these tests on a deliberately corrupted copy.
_DEFAULT = Path(__file__).resolve().parents[1] / "aimnet_fast" / "data" / "default.h5"
PATH = Path(os.environ.get("AIMNET_FAST_DEFAULT_H5", _DEFAULT))
ELEMENTS = (1, 6, 7, 8, 9, 16, 17)
pytestmark = pytest.mark.skipif(not PATH.is_file(), reason=f"{PATH} not generated")


@pytest.fixture(scope="module")
def data():
    """name -> dict of the group's arrays and attributes, read once."""
    out = {}
    with h5py.File(PATH, "r") as f:
        for name, g in f.items():
            d = {k: g[k][()] for k in g.keys()}
            d.update({f"attr:{k}": g.attrs[k] for k in g.attrs.keys()})
            out[name] = d
        out["__file__"] = dict(f.attrs)
    return out


def groups(data):
    return {k: v for k, v in data.items() if k != "__file__"}


def test_size_and_count(data):
    size_mb = PATH.stat().st_size / 2**20
    assert 0.3 < size_mb < 8.0, size_mb
    n = sum(len(g["gfn2.energy"]) for g in groups(data).values())
    assert 2000 <= n <= 5000, n
    assert data["__file__"]["n_conformers"] == n


def test_layout_shapes_dtypes(data):
    from aimnet_fast.data.make_default import hill_formula

    for name, g in groups(data).items():
        assert set(k for k in g if not k.startswith("attr:")) == {
            "atomic_numbers", "coordinates", "gfn2.energy", "gfn2.forces", "gfn2.charges"}, name
        z = g["atomic_numbers"]
        na, nc = len(z), len(g["gfn2.energy"])
        assert z.dtype == np.uint8 and z.ndim == 1
        assert g["coordinates"].shape == (nc, na, 3) and g["coordinates"].dtype == np.float32
        assert g["gfn2.energy"].shape == (nc,) and g["gfn2.energy"].dtype == np.float64
        assert g["gfn2.forces"].shape == (nc, na, 3) and g["gfn2.forces"].dtype == np.float32
        assert g["gfn2.charges"].shape == (nc, na) and g["gfn2.charges"].dtype == np.float32
        assert name.split("_")[0] == hill_formula(z), name
        assert len(g["attr:smiles_index"]) == nc and len(g["attr:sampling"]) == nc
        assert g["attr:smiles_index"].max() < len(g["attr:smiles"])


def test_hill_formula():
    from aimnet_fast.data.make_default import hill_formula

    assert hill_formula([8, 6, 1, 1, 6, 1, 1, 1, 1]) == "C2H6O"
    assert hill_formula([1, 8, 1]) == "H2O"
    assert hill_formula([17, 1]) == "ClH"
    assert hill_formula([6, 17, 17, 17, 1]) == "CHCl3"


def test_file_attributes(data):
    a = data["__file__"]
    for key in ("level_of_theory", "units", "generator_version", "seed", "rdkit_version",
                "tblite_version", "n_dropped_close_atoms", "n_dropped_scf"):
        assert key in a, key
    assert "GFN2-xTB" in a["level_of_theory"]
    assert "hartree/angstrom" in a["units"] and "-dE/dR" in a["units"]


def test_elements_cover_many_molecules(data):
    n_mol = {z: 0 for z in ELEMENTS}
    for g in groups(data).values():
        zs = set(g["atomic_numbers"].tolist())
        assert zs <= set(ELEMENTS)
        for z in zs:
            n_mol[z] += len(g["attr:smiles"])
    assert all(n >= 15 for n in n_mol.values()), n_mol


def test_finite_and_geometry(data):
    for name, g in groups(data).items():
        for k in ("coordinates", "gfn2.energy", "gfn2.forces", "gfn2.charges"):
            assert np.isfinite(g[k]).all(), (name, k)
        x = g["coordinates"].astype(np.float64)
        d = np.linalg.norm(x[:, :, None] - x[:, None, :], axis=-1)
        d[:, np.arange(x.shape[1]), np.arange(x.shape[1])] = np.inf
        assert d.min() >= 0.7, name
        # Sampled around minima: no conformer sits far up a molecule's energy surface.
        e = g["gfn2.energy"]
        si = g["attr:smiles_index"]
        for j in range(len(g["attr:smiles"])):
            ej = e[si == j]
            assert ej.max() - ej.min() < 0.5, (name, j)


def test_charges_neutral(data):
    for name, g in groups(data).items():
        total = g["gfn2.charges"].astype(np.float64).sum(axis=1)
        assert np.abs(total).max() < 1e-3, name


def test_energy_fits_element_counts(data):
    """Total energies are nearly additive in the element counts: fit E ≈ Σ_Z n_Z e_Z here."""
    counts, energy, lowest = [], [], []
    for g in groups(data).values():
        c = [int((g["atomic_numbers"] == z).sum()) for z in ELEMENTS]
        e = g["gfn2.energy"]
        si = g["attr:smiles_index"]
        counts += [c] * len(e)
        energy.append(e)
        for j in range(len(g["attr:smiles"])):
            lowest.append((c, e[si == j].min()))
    x, y = np.asarray(counts, float), np.concatenate(energy)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    r = y - x @ coef
    # H is about -0.4 to -0.6 Ha in GFN2-xTB; catches eV or kcal/mol slipping in.
    assert -0.7 < coef[0] < -0.3, coef
    assert np.sqrt(np.mean(r**2)) < 0.06 and np.abs(r).max() < 0.3, (np.sqrt(np.mean(r**2)),
                                                                        np.abs(r).max())
    # The lowest conformer of each molecule: chemistry alone, tighter.
    x = np.asarray([c for c, _ in lowest], float)
    y = np.asarray([e for _, e in lowest])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    r = y - x @ coef
    # The largest residuals are the alkynes (buta-1,3-diyne 0.135 Ha, cyanoacetylene 0.110 Ha): a
    # triple bond costs more than element counts can say.
    assert np.sqrt(np.mean(r**2)) < 0.04 and np.abs(r).max() < 0.16


def _picked(data):
    """For S, F and Cl: the smallest group holding the element, its first displaced conformer."""
    out = []
    for z in (16, 9, 17):
        cand = sorted((len(g["atomic_numbers"]), name) for name, g in groups(data).items()
                      if z in g["atomic_numbers"] and (g["attr:sampling"] == 2).any())
        name = cand[0][1]
        i = int(np.flatnonzero(data[name]["attr:sampling"] == 2)[0])
        out.append((name, i))
    return out


@pytest.fixture
def one_omp_thread():
    """tblite shares torch's libgomp (same soname) once torch is imported: one thread, restored."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_labels_match_tblite_and_finite_difference(data, one_omp_thread):
    pytest.importorskip("tblite")
    from aimnet_fast.data.make_default import gfn2_singlepoint

    from tblite.interface import Calculator

    def energy(z, x_A):
        calc = Calculator("GFN2-xTB", z, x_A / BOHR_TO_A)
        calc.set("verbosity", 0)
        return calc.singlepoint().get("energy")

    h = 1e-3  # Å
    for name, i in _picked(data):
        g = data[name]
        z = g["atomic_numbers"].astype(np.int32)
        x = g["coordinates"][i].astype(np.float64)
        assert abs(energy(z, x) - g["gfn2.energy"][i]) < 1e-6, name
        e, _, q = gfn2_singlepoint(z, x)
        np.testing.assert_allclose(q, g["gfn2.charges"][i], atol=1e-5)
        fd = np.zeros_like(x)
        for a in range(len(z)):
            for d in range(3):
                xp, xm = x.copy(), x.copy()
                xp[a, d] += h
                xm[a, d] -= h
                fd[a, d] = -(energy(z, xp) - energy(z, xm)) / (2 * h)  # true force, Ha/Å
        stored = g["gfn2.forces"][i].astype(np.float64)
        assert np.abs(stored).max() > 0.01  # a displaced geometry: the sign check means something
        np.testing.assert_allclose(stored, fd, atol=2e-5, rtol=1e-4, err_msg=name)
