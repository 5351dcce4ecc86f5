"""The one table of units and element symbols, and the edges that use it."""
import h5py
import numpy as np
import pytest

from aimnet_fast import units
from aimnet_fast.errors import DataError, InputError
from aimnet_fast.io import read_xyz


def test_factors_agree_with_codata_ratios():
    # 1 eV = 23.060548 kcal/mol and 1 Å = 1.8897261246 bohr (CODATA 2018), from other constants
    assert units.HARTREE_TO_KCALMOL / units.HARTREE_TO_EV == pytest.approx(23.060548, rel=2e-8)
    assert 1.0 / units.BOHR_TO_A == pytest.approx(1.8897261246, rel=1e-10)
    assert units.factor("kcal/mol", "energy") * units.HARTREE_TO_KCALMOL == pytest.approx(1.0)
    assert units.factor("angstrom3", "volume") == pytest.approx(1.8897261246 ** 3, rel=1e-9)
    assert units.factor("Hartree/Bohr", "force") == pytest.approx(1.8897261246, rel=1e-10)


def test_factor_errors_name_the_unit():
    with pytest.raises(KeyError, match="furlong"):
        units.factor("furlong")
    with pytest.raises(ValueError, match="'ev' is a energy unit, not a force unit"):
        units.factor("ev", "force")


@pytest.mark.parametrize("symbol, z", [("H", 1), ("cl", 17), (" CL ", 17), (b"O", 8), ("17", 17),
                                       ("X", None), ("0", None), ("Xx", None), ("119", None)])
def test_element_number_one_rule(symbol, z):
    assert units.element_number(symbol) == z


def test_dummy_atom_rejected_alike_by_xyz_and_hdf5(tmp_path):
    xyz = tmp_path / "x.xyz"
    xyz.write_text("2\nwith a dummy\nX 0 0 0\nH 0 0 0.74\n")
    with pytest.raises(InputError, match="X"):
        read_xyz(xyz)
    from aimnet_fast.data import load_dataset
    h5 = tmp_path / "x.h5"
    with h5py.File(h5, "w") as f:
        g = f.create_group("XH")
        g["species"] = np.array([b"X", b"H"])
        g["coordinates"] = np.array([[[0, 0, 0], [0, 0, 0.74]]], np.float32)
        g["energies"] = np.array([-0.5])
    with pytest.raises(DataError, match=r"x\.h5:XH:.*unknown element symbol 'X'"):
        load_dataset([{"path": str(h5), "layout": "ani1"}])
