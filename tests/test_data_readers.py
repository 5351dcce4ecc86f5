"""Readers on every file of the shared data: counts, units and signs against values computed here
from the raw HDF5 arrays, finite differences of the energy, charge sums and the released SAE."""
import h5py
import numpy as np
import pytest

from aimnet_fast.constants import ELEMENTS, SAE_HA
from aimnet_fast.units import BOHR_TO_A, HARTREE_TO_EV
from aimnet_fast.data import DataError, detect_layout, fit_sae, load_dataset

SAE = dict(zip(ELEMENTS, SAE_HA))


@pytest.fixture(scope="module")
def data(shared):
    return shared / "data"


def raw_groups(path):
    """(name, group) of every molecule group holding coordinates, in name order (independent walk)."""
    out = []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Group) and any(k in obj for k in
                                                   ("coordinates", "coord", "conformations")):
                out.append(name)
        f.visititems(visit)
    return sorted(out)


def conf(ds, c, arr):
    a, b = ds.conf_offsets[c], ds.conf_offsets[c + 1]
    return np.asarray(arr[a:b])


def per_atom_sae_error(ds):
    """|E − Σ released SAE| per atom, Hartree: ~0.01 for ωB97X-like data in Hartree; an energy in eV
    would be off by ~27×."""
    e = ds.labels["energy"]
    out = []
    for c in range(ds.n_conf):
        z = conf(ds, c, ds.numbers)
        out.append(abs(e[c] - sum(SAE[int(k)] for k in z)) / z.size)
    return np.array(out)


def fd_ratio(ds, dmin, dmax, max_pairs=3000):
    """Pairs of conformers of one molecule displaced by dmin..dmax Å: ΔE against the trapezoid
    −½(F_a + F_b)·Δx. Returns (median of predicted/actual, fraction with the same sign)."""
    pred, act = [], []
    for g in np.unique(ds.group):
        cs = np.flatnonzero(ds.group == g)
        if np.unique(ds.n_atoms[cs]).size != 1 or cs.size < 2:
            continue
        x = np.stack([conf(ds, c, ds.coord) for c in cs]).astype(np.float64)
        f = np.stack([conf(ds, c, ds.labels["forces"]) for c in cs]).astype(np.float64)
        e = np.asarray(ds.labels["energy"][cs])
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(axis=(2, 3)))
        for a, b in zip(*np.nonzero(np.triu((d > dmin) & (d < dmax), 1))):
            dx = x[b] - x[a]
            pred.append(-0.5 * ((f[a] + f[b]) * dx).sum())
            act.append(e[b] - e[a])
            if len(act) >= max_pairs:
                break
    pred, act = np.array(pred), np.array(act)
    ok = np.abs(act) > 1e-5
    assert ok.sum() >= 5, "too few conformer pairs for a finite-difference check"
    return np.median(pred[ok] / act[ok]), np.mean(np.sign(pred[ok]) == np.sign(act[ok]))


def test_layout_detection(data):
    assert detect_layout(data / "ani1x_sample.h5") == "ani1x"
    assert detect_layout(data / "ani1x_06r_gdb11_s01.h5") == "06r"
    assert detect_layout(data / "comp6_s66x8.h5") == "06r"
    assert detect_layout(data / "ani1_gdb_s01.h5") == "ani1"
    assert detect_layout(data / "ani1_gdb_hc_s02.h5") == "ani1"
    assert detect_layout(data / "alkane_c2h6_nms.h5") == "ani1"
    assert detect_layout(data / "ani2x_diatomics.h5") == "ani2x"
    assert detect_layout(data / "aimnet2_format_sample.h5") == "aimnet2"
    assert detect_layout(data / "spice_sample.h5") == "spice"


def test_ani1x_release(data):
    path = data / "ani1x_sample.h5"
    ds = load_dataset([{"path": path, "layout": "ani1x"}])
    assert ds.n_conf == 8 and len(ds.group_names) == 5
    i = 0
    with h5py.File(path, "r") as f:
        for name in sorted(f):
            g = f[name]
            for c in range(g["coordinates"].shape[0]):
                assert ds.name(i).endswith(f":{name}:{c}")
                np.testing.assert_array_equal(conf(ds, i, ds.numbers), g["atomic_numbers"][()])
                np.testing.assert_array_equal(conf(ds, i, ds.coord), g["coordinates"][c])
                assert ds.labels["energy"][i] == g["wb97x_tz.energy"][c]
                # ANI-1x stores true forces: no sign change
                np.testing.assert_array_equal(conf(ds, i, ds.labels["forces"]), g["wb97x_tz.forces"][c])
                np.testing.assert_array_equal(conf(ds, i, ds.labels["volumes"]),
                                              g["wb97x_tz.mbis_volumes"][c])
                i += 1
    # neutral molecules: MBIS charges sum to ~0 e
    for c in range(ds.n_conf):
        assert abs(conf(ds, c, ds.labels["charges"]).sum()) < 0.02
    assert per_atom_sae_error(ds).max() < 0.05
    assert (ds.labels["volumes"] > 0).all()


def test_ani1x_zero_rows_are_missing(data):
    """4 of 8 Hirshfeld rows are all zero (not computed): masked and counted as such."""
    ds = load_dataset([{"path": data / "ani1x_sample.h5", "layout": "ani1x",
                        "properties": {"energy": {"key": "wb97x_dz.energy"},
                                       "charges": {"key": "wb97x_dz.hirshfeld_charges"}}}])
    q = ds.labels["charges"]
    rows_missing = [not np.isfinite(conf(ds, c, q)).all() for c in range(ds.n_conf)]
    assert sum(rows_missing) == 4
    s = ds.summary_dict()["labels"]["charges"]
    assert (s["used"], s["zero"], s["nan"], s["absent"]) == (4, 4, 0, 0)
    assert "4 all-zero" in ds.summary()


def test_ani1x_nan_rows_of_an_extra_label(data):
    """Labels outside the standard four are read too: here a per-conformer vector with NaN rows."""
    path = data / "ani1x_sample.h5"
    ds = load_dataset([{"path": path, "layout": "ani1x",
                        "properties": {"energy": {"key": "wb97x_tz.energy"},
                                       "dipole": {"key": "wb97x_dz.dipole", "per": "conformer"}}}])
    with h5py.File(path, "r") as f:
        raw = np.concatenate([f[g]["wb97x_dz.dipole"][()] for g in sorted(f)])
    n_nan = int(np.isnan(raw).any(axis=1).sum())
    assert n_nan > 0 and ds.labels["dipole"].shape == (8, 3)
    s = ds.summary_dict()["labels"]["dipole"]
    assert (s["used"], s["nan"]) == (8 - n_nan, n_nan)
    np.testing.assert_array_equal(ds.labels["dipole"], raw)


def test_06r_forces_negated_and_extra_column(data):
    path = data / "ani1x_06r_gdb11_s01.h5"
    ds = load_dataset([{"path": path, "layout": "06r",
                        "properties": {"energy": {"key": "energies"},
                                       "forces": {"key": "forces", "convention": "gradient"},
                                       "charges": {"key": "hirshfeld", "drop_last_column": True}}}])
    assert ds.n_conf == 4366 and len(ds.group_names) == 3
    with h5py.File(path, "r") as f:
        g = f["gdb11_s01/mol0000001"]
        names = [ds.name(i) for i in range(ds.n_conf)]
        c = int(np.flatnonzero(np.asarray([n.endswith("mol0000001:0") for n in names]))[0])
        np.testing.assert_array_equal(conf(ds, c, ds.labels["forces"]), -g["forces"][0])
        np.testing.assert_array_equal(conf(ds, c, ds.labels["charges"]), g["hirshfeld"][0][:-1])
    # neutral: the Hirshfeld charges (without the residual column) sum to ~0
    sums = np.add.reduceat(ds.labels["charges"].astype(np.float64), ds.conf_offsets[:-1])
    assert np.abs(sums).max() < 1e-3
    ratio, sign = fd_ratio(ds, 0.003, 0.05)
    assert 0.95 < ratio < 1.05 and sign > 0.97
    # the default of the 06r layout negates too
    assert np.array_equal(load_dataset(path).labels["forces"], ds.labels["forces"])
    # and the raw sign would fail the finite-difference check
    raw = load_dataset([{"path": path, "layout": "06r",
                         "properties": {"energy": {"key": "energies"}, "forces": {"key": "forces"}}}])
    assert fd_ratio(raw, 0.003, 0.05)[0] < -0.9
    with pytest.raises(DataError, match="hirshfeld"):
        load_dataset([{"path": path, "layout": "06r",
                       "properties": {"energy": {"key": "energies"}, "charges": {"key": "hirshfeld"}}}])


def test_comp6_s66x8(data):
    path = data / "comp6_s66x8.h5"
    ds = load_dataset(path)
    assert ds.n_conf == 528 and len(ds.group_names) == 66
    assert (np.bincount(ds.group) == 8).all()
    assert sorted(set(map(lambda c: ds.name(c).rsplit(":", 2)[1], range(ds.n_conf)))) == raw_groups(path)
    ratio, sign = fd_ratio(ds, 0.01, 0.3)
    assert 0.9 < ratio < 1.1 and sign > 0.95
    assert per_atom_sae_error(ds).max() < 0.05


def test_ani1_energies_and_sae(data):
    path = data / "ani1_gdb_s01.h5"
    ds = load_dataset(path)
    assert ds.n_conf == 10800 and set(ds.labels) == {"energy"}
    with h5py.File(path, "r") as f:
        e_raw = np.concatenate([f["gdb11_s01"][k]["energies"][()] for k in sorted(f["gdb11_s01"])])
    np.testing.assert_array_equal(ds.labels["energy"], e_raw)
    sae = fit_sae(ds)
    # 3 compositions only: the fit reproduces each one's typical energy (its median, computed here)
    for g in np.unique(ds.group):
        cs = np.flatnonzero(ds.group == g)
        z = conf(ds, cs[0], ds.numbers)
        pred = sum(sae[ELEMENTS.index(int(k))] for k in z)
        assert abs(pred - np.median(ds.labels["energy"][cs])) < 2e-3
    assert per_atom_sae_error(ds).max() < 0.05


def test_ani1_hc_extra_keys(data):
    path = data / "ani1_gdb_hc_s02.h5"
    ds = load_dataset(path)
    assert ds.n_conf == 17109
    with h5py.File(path, "r") as f:
        n = sum(f["gdb11_s02"][k]["coordinates"].shape[0] for k in f["gdb11_s02"])
    assert n == 17109
    # includes C–C bond-breaking geometries: a looser bound, still far below an eV/Ha mix-up
    assert per_atom_sae_error(ds).max() < 0.1


def test_alkane_nms_forces_in_hartree_per_bohr(data):
    path = data / "alkane_c2h6_nms.h5"
    props = {"energy": {"key": "energies", "unit": "hartree"},
             "forces": {"key": "forces", "unit": "hartree/bohr"}}
    ds = load_dataset([{"path": path, "layout": "ani1", "properties": props}])
    assert ds.n_conf == 10080
    with h5py.File(path, "r") as f:
        g = f["gdb11_s02/gdb11_s02-10"]
        np.testing.assert_allclose(conf(ds, 0, ds.labels["forces"]), g["forces"][0] / BOHR_TO_A, rtol=1e-6)
    ratio, sign = fd_ratio(ds, 0.03, 0.1)
    assert 0.97 < ratio < 1.03 and sign > 0.98
    # the same forces read as Ha/Å are off by the bohr factor: the check tells the units apart
    wrong = load_dataset([{"path": path, "layout": "ani1",
                           "properties": {**props, "forces": {"key": "forces", "unit": "hartree/angstrom"}}}])
    assert abs(fd_ratio(wrong, 0.03, 0.1)[0] - BOHR_TO_A) < 0.03


def test_ani2x_by_size(data):
    path = data / "ani2x_diatomics.h5"
    ds = load_dataset(path)
    assert ds.n_conf == 5706
    with h5py.File(path, "r") as f:
        sp = f["002/species"][()]
        e = f["002/energies"][()]
        fr = f["002/forces"][()]
    np.testing.assert_array_equal(ds.numbers, sp.reshape(-1))
    np.testing.assert_array_equal(ds.labels["energy"], e)
    # groups by formula: as many as distinct unordered element pairs
    assert len(ds.group_names) == np.unique(np.sort(sp, axis=1), axis=0).shape[0]
    np.testing.assert_allclose(ds.labels["forces"], fr.reshape(-1, 3).astype(np.float32))
    # a diatomic: the force on atom 2 along the bond is −dE/dr; central differences over r
    x = ds.coord.reshape(-1, 2, 3).astype(np.float64)
    r = np.linalg.norm(x[:, 1] - x[:, 0], axis=1)
    u = (x[:, 1] - x[:, 0]) / r[:, None]
    f2 = (ds.labels["forces"].reshape(-1, 2, 3)[:, 1] * u).sum(1)
    checked = 0
    for g in np.unique(ds.group):
        cs = np.flatnonzero(ds.group == g)
        o = cs[np.argsort(r[cs])]
        for a, b in zip(o[:-1], o[1:]):
            dr = r[b] - r[a]
            if 1e-3 < dr < 2e-2:
                de = ds.labels["energy"][b] - ds.labels["energy"][a]
                assert abs(-de / dr - 0.5 * (f2[a] + f2[b])) < 0.02 * max(abs(de / dr), 0.05)
                checked += 1
    assert checked > 100


def test_aimnet2_units_elements_and_charges(data):
    path = data / "aimnet2_format_sample.h5"
    with pytest.raises(DataError) as ei:
        load_dataset(path)
    assert "aimnet2_format_sample.h5:007:" in str(ei.value) and "skip_unknown_elements" in str(ei.value)
    ds = load_dataset([{"path": path, "skip_unknown_elements": True}])
    with h5py.File(path, "r") as f:
        keep, e_ev, q_tot = [], [], []
        for k in sorted(f):
            z = f[k]["numbers"][()]
            ok = np.isin(z, ELEMENTS).all(axis=1)
            keep += list(ok)
            e_ev += list(f[k]["energy"][()][ok])
            q_tot += list(f[k]["charge"][()][ok])
    assert ds.n_conf == sum(keep) and ds.summary_dict()["skipped_unknown_element"] == len(keep) - sum(keep)
    np.testing.assert_allclose(ds.labels["energy"], np.array(e_ev) / HARTREE_TO_EV, rtol=1e-12)
    # another functional, ions and radicals: looser, but eV left as Ha would be off by ~10² Ha/atom
    err = per_atom_sae_error(ds)
    assert np.median(err) < 0.05 and err.max() < 0.3
    sums = np.add.reduceat(ds.labels["charges"].astype(np.float64), ds.conf_offsets[:-1])
    np.testing.assert_allclose(sums, q_tot, atol=2e-3)
    # forces eV/Å -> Ha/Å
    with h5py.File(path, "r") as f:
        c = 0
        name = ds.name(c).rsplit(":", 2)
        np.testing.assert_allclose(conf(ds, c, ds.labels["forces"]),
                                   f[name[1]]["forces"][int(name[2])] / HARTREE_TO_EV, rtol=1e-6)
    neutral = load_dataset([{"path": path, "skip_unknown_elements": True, "skip_charged": True}])
    with h5py.File(path, "r") as f:
        n_ns = sum(int((np.isin(f[k]["numbers"][()], ELEMENTS).all(axis=1) & (f[k]["charge"][()] == 0)
                        & (f[k]["mult"][()] == 1)).sum()) for k in f)
    assert neutral.n_conf == n_ns
    assert neutral.summary_dict()["skipped_charged"] == ds.n_conf - n_ns
    assert (np.round(np.add.reduceat(neutral.labels["charges"], neutral.conf_offsets[:-1])) == 0).all()


def test_spice_bohr_gradient_and_sodium(data):
    path = data / "spice_sample.h5"
    with pytest.raises(DataError, match=r"C#C\.\[Na\+\]:0: element Na"):
        load_dataset(path)
    ds = load_dataset([{"path": path, "skip_unknown_elements": True}])
    assert ds.n_conf == 50 and ds.summary_dict()["skipped_unknown_element"] == 5
    with h5py.File(path, "r") as f:
        g = f["103147721"]
        np.testing.assert_allclose(ds.coord, g["conformations"][()].reshape(-1, 3) * BOHR_TO_A, rtol=1e-6)
        np.testing.assert_allclose(ds.labels["forces"],
                                   -g["dft_total_gradient"][()].reshape(-1, 3) / BOHR_TO_A, rtol=1e-6)
        np.testing.assert_array_equal(ds.labels["energy"], g["dft_total_energy"][()])
    # Å: the shortest bond of an organic cation is an X–H bond of ~1.0–1.1 Å
    x = conf(ds, 0, ds.coord).astype(np.float64)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    d[np.diag_indices_from(d)] = np.inf
    assert 0.95 < d.min() < 1.15
    # an ammonium ion: the MBIS charges sum to +1 e
    sums = np.add.reduceat(ds.labels["charges"].astype(np.float64), ds.conf_offsets[:-1])
    np.testing.assert_allclose(sums, 1.0, atol=2e-3)
    assert per_atom_sae_error(ds).max() < 0.1


def test_several_files_in_one_run(data):
    srcs = [{"path": data / "ani1x_sample.h5", "layout": "ani1x"},
            {"path": data / "ani1x_06r_gdb11_s01.h5", "layout": "auto"},
            {"path": data / "spice_sample.h5", "layout": "spice", "skip_unknown_elements": True}]
    ds = load_dataset(srcs)
    assert ds.n_conf == 8 + 4366 + 50
    assert np.bincount(ds.source).tolist() == [8, 4366, 50]
    assert len(ds.group_names) == 5 + 3 + 1
    assert ds.conf_offsets[-1] == ds.numbers.size == ds.coord.shape[0]
    # volumes only in the first file: NaN (masked) elsewhere, counted absent
    v = ds.labels["volumes"]
    assert np.isfinite(v[: ds.conf_offsets[8]]).all() and np.isnan(v[ds.conf_offsets[8]:]).all()
    assert ds.summary_dict()["labels"]["volumes"]["absent"] == 4366 + 50
    assert ds.name(8 + 4366).startswith(str(data / "spice_sample.h5") + ":103147721:")
    assert ds.labels["energy"].dtype == np.float64 and ds.labels["forces"].dtype == np.float32
