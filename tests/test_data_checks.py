"""Read-time data checks (close atoms, label ranges, unknown keys), the energy unit check from the
fitted SAE, and the per-source summary: each bad input is a DataError naming file, group and
conformer, or a skip counted where the source says so."""
import json

import h5py
import numpy as np
import pytest

from aimnet_fast.constants import ELEMENTS, SAE_HA
from aimnet_fast.data import DataError, default_dataset_path, default_sources, load_dataset
from aimnet_fast.data import dataset as dataset_mod
from aimnet_fast.data.checks import atom_energy_estimate, check_sae_plausible
from aimnet_fast.units import HARTREE_TO_EV, HARTREE_TO_KCALMOL
from tests.test_data_errors import write

SAE = dict(zip(ELEMENTS, SAE_HA))
PROPS = {"energy": {"key": "wb97x_tz.energy"}, "forces": {"key": "wb97x_tz.forces"}}


def mol(z=(6, 1, 1, 1, 1), nc=4, seed=0, sae=SAE, **extra):
    """Conformers on a 1.2 Å grid with 0.05 Å noise (no two atoms closer than ~1 Å); energies are
    the sum of ``sae`` plus noise (Hartree), small forces."""
    rng = np.random.default_rng(seed)
    na = len(z)
    grid = 1.2 * np.stack(np.unravel_index(np.arange(na), (4, 4, 4)), axis=1).astype(np.float64)
    d = {"atomic_numbers": np.array(z, np.uint8),
         "coordinates": (grid[None] + rng.normal(0, 0.05, (nc, na, 3))).astype(np.float32),
         "wb97x_tz.energy": sum(sae.get(k, -289.0) for k in z) + rng.normal(0, 0.01, nc),
         "wb97x_tz.forces": rng.normal(0, 0.02, (nc, na, 3)).astype(np.float32)}
    d.update(extra)
    return d


def src(path, **kw):
    return [{"path": str(path), "layout": "ani1x", "properties": PROPS, **kw}]


#: Compositions with different H counts, so that the SAE of H is determined by the fit.
COMPOSITIONS = {"CH4": (6, 1, 1, 1, 1), "C2H6": (6, 6, 1, 1, 1, 1, 1, 1), "C2H4": (6, 6, 1, 1, 1, 1),
                "H2O": (8, 1, 1), "NH3": (7, 1, 1, 1), "CH2O": (6, 8, 1, 1), "HCN": (1, 6, 7),
                "CH3OH": (6, 8, 1, 1, 1, 1), "N2": (7, 7), "H2": (1, 1)}


def many(tmp_path, name, sae=SAE, scale=1.0, **kw):
    groups = {}
    for i, (g, z) in enumerate(COMPOSITIONS.items()):
        m = mol(z, nc=6, seed=i, sae=sae)
        m["wb97x_tz.energy"] = m["wb97x_tz.energy"] * scale
        groups[g] = m
    return write(tmp_path / name, groups)


# -- close atoms -------------------------------------------------------------------------------

def test_two_atoms_at_the_same_position(tmp_path):
    m = mol(nc=4)
    m["coordinates"][2, 3] = m["coordinates"][2, 1]          # conformer 2: atoms 1 and 3 coincide
    p = write(tmp_path / "a.h5", {"CH4": mol(seed=1), "CH4b": m})
    with pytest.raises(DataError, match=r"a\.h5:CH4b:2: atoms 1 \(H\) and 3 \(H\) are 0\.0000 Å "
                                        r"apart \(closer than 0\.1 Å") as ei:
        load_dataset(src(p))
    assert (ei.value.group, ei.value.conformer) == ("CH4b", 2)
    assert "skip_bad_conformers" in str(ei.value)
    ds = load_dataset(src(p, skip_bad_conformers=True))
    assert ds.n_conf == 7 and ds.summary_dict()["skipped_close_atoms"] == 1
    assert [ds.name(c).rsplit(":", 2)[1:] for c in range(4, 7)] == [["CH4b", "0"], ["CH4b", "1"],
                                                                   ["CH4b", "3"]]
    assert "1 close atoms" in ds.summary()


def test_close_atoms_threshold_and_large_molecules(tmp_path):
    """0.09 Å is refused, 0.11 Å accepted; a 150-atom molecule (sliced pair matrices) too."""
    m = mol(nc=3)
    x = m["coordinates"]
    x[0, 4] = x[0, 0] + np.array([0.11, 0, 0], np.float32)
    x[1, 4] = x[1, 0] + np.array([0, 0.09, 0], np.float32)
    p = write(tmp_path / "a.h5", {"CH4": m})
    with pytest.raises(DataError, match=r"a\.h5:CH4:1: atoms 0 \(C\) and 4 \(H\) are 0\.0900 Å"):
        load_dataset(src(p))
    big_z = (6,) * 50 + (1,) * 100
    rng = np.random.default_rng(0)
    grid = 1.3 * np.stack(np.unravel_index(np.arange(150), (6, 6, 6)), axis=1)
    xb = (grid[None] + rng.normal(0, 0.02, (40, 150, 3))).astype(np.float32)
    xb[37, 149] = xb[37, 5] + np.float32(0.05)
    big = {"atomic_numbers": np.array(big_z, np.uint8), "coordinates": xb,
           "wb97x_tz.energy": np.full(40, 50 * SAE[6] + 100 * SAE[1]),
           "wb97x_tz.forces": np.zeros((40, 150, 3), np.float32) + np.float32(0.01)}
    p = write(tmp_path / "b.h5", {"C50H100": big})
    with pytest.raises(DataError, match=r"b\.h5:C50H100:37: atoms 5 \(C\) and 149 \(H\) are 0\.0866 Å"):
        load_dataset(src(p))
    assert load_dataset(src(p, skip_bad_conformers=True)).n_conf == 39


# -- label ranges ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1e24, -1e24])
def test_energy_of_1e24_hartree(tmp_path, value):
    m = mol(nc=5)
    m["wb97x_tz.energy"][3] = value
    p = write(tmp_path / "a.h5", {"CH4": m})
    with pytest.raises(DataError) as ei:
        load_dataset(src(p))
    msg = str(ei.value)
    assert msg.startswith(f"{p}:CH4:3: property 'energy' (key 'wb97x_tz.energy', unit 'hartree'): "
                          f"energy {value:.8g} Ha of CH4 (5 atoms) is ")
    assert ("above the physical bound" if value > 0 else "below the physical bound") in msg
    ds = load_dataset(src(p, skip_bad_conformers=True))
    d = ds.summary_dict()
    assert ds.n_conf == 4 and d["skipped_bad_label"] == 1 and d["labels"]["energy"]["skipped"] == 1


def test_energies_in_kcal_per_mol_declared_as_hartree_at_read_time(tmp_path):
    p = many(tmp_path, "kcal.h5", scale=HARTREE_TO_KCALMOL)
    with pytest.raises(DataError, match=r"kcal\.h5:\w+:0: property 'energy'.*below the physical bound"
                                        r".*look like kcal/mol declared as 'hartree'"):
        load_dataset(src(p))
    p = many(tmp_path, "ev.h5", scale=HARTREE_TO_EV)
    with pytest.raises(DataError, match=r"look like ev declared as 'hartree'"):
        load_dataset(src(p))
    # declared right, they load and pass the SAE check
    ds = load_dataset([{"path": str(p), "layout": "ani1x",
                        "properties": {**PROPS, "energy": {"key": "wb97x_tz.energy", "unit": "ev"}}}])
    assert "'ev' fits" in check_sae_plausible(ds)[0]


def test_infinite_forces_error_or_counted_skip(tmp_path):
    m = mol(nc=4)
    m["wb97x_tz.forces"][1, 2, 0] = np.inf
    p = write(tmp_path / "a.h5", {"CH4": m})
    with pytest.raises(DataError, match=r"a\.h5:CH4:1: property 'forces' \(key 'wb97x_tz.forces', "
                                        r"unit 'hartree/angstrom'\): value inf \(atom 2\) is infinite"):
        load_dataset(src(p))
    ds = load_dataset(src(p, skip_bad_conformers=True))
    assert ds.n_conf == 3 and ds.summary_dict()["labels"]["forces"]["skipped"] == 1
    assert "skipped 1 (infinite or out of range)" in ds.summary()


def test_out_of_range_forces_charges_volumes(tmp_path):
    m = mol(nc=3)
    m["wb97x_tz.forces"][2, 1, 1] = 150.0                    # Ha/Å: e.g. kcal/mol/Å read as Ha/Å
    p = write(tmp_path / "f.h5", {"CH4": m})
    with pytest.raises(DataError, match=r"f\.h5:CH4:2: property 'forces'.*value 150 hartree/angstrom "
                                        r"\(atom 1\) is outside the physical range .*wrong unit"):
        load_dataset(src(p))
    q = np.zeros((3, 5), np.float32) + np.float32(0.1)
    q[0, 4] = -12.0
    p = write(tmp_path / "q.h5", {"CH4": mol(nc=3, **{"wb97x_tz.mbis_charges": q})})
    with pytest.raises(DataError, match=r"q\.h5:CH4:0: property 'charges'.*value -12 e \(atom 4\)"):
        load_dataset([{"path": str(p), "layout": "ani1x",
                       "properties": {**PROPS, "charges": {"key": "wb97x_tz.mbis_charges"}}}])
    v = np.full((3, 5), 20.0, np.float32)
    v[1, 0] = 3e4
    p = write(tmp_path / "v.h5", {"CH4": mol(nc=3, **{"wb97x_tz.mbis_volumes": v})})
    with pytest.raises(DataError, match=r"v\.h5:CH4:1: property 'volumes'.*value 30000 bohr3"):
        load_dataset([{"path": str(p), "layout": "ani1x",
                       "properties": {**PROPS, "volumes": {"key": "wb97x_tz.mbis_volumes"}}}])


def test_nan_stays_missing_and_extra_labels_are_only_checked_for_inf(tmp_path):
    m = mol(nc=4, **{"wb97x_tz.dipole": np.array([[1e6, 0, 0], [np.nan, 0, 0], [np.inf, 0, 0],
                                                  [1e300, 0, 0]])})
    m["wb97x_tz.energy"][0] = np.nan
    p = write(tmp_path / "a.h5", {"CH4": m})
    props = {**PROPS, "dipole": {"key": "wb97x_tz.dipole", "per": "conformer"}}
    with pytest.raises(DataError, match=r"a\.h5:CH4:2: property 'dipole'.*infinite"):
        load_dataset([{"path": str(p), "layout": "ani1x", "properties": props}])
    ds = load_dataset([{"path": str(p), "layout": "ani1x", "properties": props,
                        "skip_bad_conformers": True}])
    d = ds.summary_dict()["labels"]
    assert ds.n_conf == 2 and d["energy"]["nan"] == 1 and d["dipole"]["nan"] == 1
    assert d["dipole"]["skipped"] == 2 and ds.labels["dipole"][0, 0] == 1e6
    m["wb97x_tz.dipole"][2, 0] = 0.0
    p = write(tmp_path / "b.h5", {"CH4": m})
    with pytest.raises(DataError, match=r"b\.h5:CH4:3: property 'dipole'.*1e\+300 does not fit a float32"):
        load_dataset([{"path": str(p), "layout": "ani1x", "properties": props}])


def test_atom_energy_estimate():
    """Thomas–Fermi with Scott and Schwinger corrections: within 1 % of the Hartree–Fock limit for
    C…Cl, 8 % for H."""
    hf = {1: -0.5, 6: -37.689, 7: -54.401, 8: -74.809, 9: -99.409, 16: -397.505, 17: -459.482}
    est = atom_energy_estimate(list(hf))
    assert np.allclose(est[1:], list(hf.values())[1:], rtol=0.01)
    assert est[0] == pytest.approx(-0.5, rel=0.08)


# -- unknown keys ------------------------------------------------------------------------------

def test_unknown_keys_in_source_and_property(tmp_path):
    p = write(tmp_path / "x.h5", {"CH4": mol()})
    with pytest.raises(DataError, match=r"x\.h5:-:-: unknown key 'units' in property 'energy' of "
                                        r".*x\.h5 \(did you mean 'unit'\?\); known: convention, "
                                        r"drop_last_column, key, per, required, unit, zero_is_missing"):
        load_dataset([{"path": str(p), "layout": "ani1x",
                       "properties": {"energy": {"key": "wb97x_tz.energy", "units": "hartree"}}}])
    with pytest.raises(DataError, match=r"unknown key 'skip_bad_conformer' in the source of .*x\.h5 "
                                        r"\(did you mean 'skip_bad_conformers'\?\); known: coord_unit, "
                                        r"elements, layout, path, properties"):
        load_dataset([{"path": str(p), "layout": "ani1x", "skip_bad_conformer": True}])
    with pytest.raises(DataError, match=r"property 'energy': an entry must be a key or a mapping"):
        load_dataset([{"path": str(p), "layout": "ani1x", "properties": {"energy": 3}}])
    with pytest.raises(DataError, match=r"'per' must be 'atom' or 'conformer'"):
        load_dataset([{"path": str(p), "layout": "ani1x",
                       "properties": {"x": {"key": "wb97x_tz.energy", "per": "molecule"}}}])


# -- energy unit from the fitted SAE -----------------------------------------------------------

@pytest.fixture(scope="module")
def default_ds():
    if not default_dataset_path().exists():
        pytest.skip("the embedded default data set is not built yet")
    return load_dataset(default_sources())


@pytest.mark.parametrize("factor,unit", [(HARTREE_TO_KCALMOL, "kcal/mol"), (HARTREE_TO_EV, "ev"),
                                         (HARTREE_TO_KCALMOL * 4.184, "kj/mol"), (2.0, "rydberg")])
def test_sae_check_names_the_unit_of_the_default_data_scaled(default_ds, factor, unit):
    """The default data set (GFN2-xTB, valence-only: SAE of H −0.51 Ha) with its energies scaled as
    if they were in another unit but declared as hartree."""
    assert "'hartree' fits" in check_sae_plausible(default_ds)[0]
    e = default_ds.labels["energy"]
    try:
        default_ds.labels["energy"] = np.asarray(e) * factor
        with pytest.raises(DataError) as ei:
            check_sae_plausible(default_ds)
    finally:
        default_ds.labels["energy"] = e
    msg = str(ei.value)
    assert msg.startswith(f"{default_dataset_path()}:-:-: fitted self-atomic energy of H is ")
    assert f"look like {unit} declared as 'hartree'" in msg
    h = float(msg.split("fitted self-atomic energy of H is ")[1].split(" ")[0])
    assert h == pytest.approx(-0.5093 * factor, rel=0.01)


def test_sae_check_hartree_declared_as_ev_and_rydberg_from_a_file(tmp_path):
    # all-electron total energies in Hartree declared as eV: within the read-time bounds, but
    # the SAE ratios C/H, N/H, O/H are those of total energies while H is 27× too small
    p = many(tmp_path, "ha.h5")
    ds = load_dataset([{"path": str(p), "layout": "ani1x",
                        "properties": {**PROPS, "energy": {"key": "wb97x_tz.energy", "unit": "ev"}}}])
    with pytest.raises(DataError, match=r"ha\.h5:-:-: fitted self-atomic energy of H is -0\.02\d+ Ha "
                                        r"while the SAE ratios .* look like hartree declared as 'ev'"):
        check_sae_plausible(ds)
    # a valence-only method (xTB-like SAE) in Rydberg: within the read-time bounds too
    gfn = {1: -0.51, 6: -2.13, 7: -2.9, 8: -4.06, 16: -3.2, 9: -4.7, 17: -4.5}
    p = many(tmp_path, "ry.h5", sae=gfn, scale=2.0)
    ds = load_dataset(src(p))
    with pytest.raises(DataError, match=r"ry\.h5:-:-: .*H is -1\.0\d* Ha.*look like rydberg"):
        check_sae_plausible(ds)


def test_sae_check_per_source_and_undetermined(tmp_path):
    """Each source is fitted alone (the file at fault is named); a source whose compositions do not
    determine the SAE of H (CH4 and NH3 only) is not checked."""
    good = many(tmp_path, "good.h5")
    bad = many(tmp_path, "bad.h5")
    ds = load_dataset([src(good)[0], {**src(bad)[0], "properties": {
        **PROPS, "energy": {"key": "wb97x_tz.energy", "unit": "kcal/mol"}}}])
    with pytest.raises(DataError, match=r"bad\.h5:-:-: .* look like hartree declared as 'kcal/mol'"):
        check_sae_plausible(ds)
    lines = check_sae_plausible(ds, indices=np.flatnonzero(np.asarray(ds.source) == 0))
    assert len(lines) == 1 and "good.h5" in lines[0]
    two = write(tmp_path / "two.h5", {"CH4": mol(nc=3), "NH3": mol((7, 1, 1, 1), nc=3, seed=2)})
    ds = load_dataset(src(two))
    ds.labels["energy"] = np.asarray(ds.labels["energy"]) * HARTREE_TO_KCALMOL
    assert "not checked" in check_sae_plausible(ds)[0]


# -- real files, summary, cache ------------------------------------------------------------------

REAL = [("ani1x_sample.h5", {"layout": "ani1x"}),
        ("ani1x_06r_gdb11_s01.h5", {"layout": "06r"}),
        ("comp6_s66x8.h5", {"layout": "auto"}),
        ("ani1_gdb_s01.h5", {"layout": "ani1"}),
        ("ani1_gdb_hc_s02.h5", {"layout": "ani1"}),
        ("alkane_c2h6_nms.h5", {"layout": "ani1", "properties": {
            "energy": {"key": "energies", "unit": "hartree"},
            "forces": {"key": "forces", "unit": "hartree/bohr"}}}),
        ("aimnet2_format_sample.h5", {"layout": "aimnet2", "skip_unknown_elements": True}),
        ("ani2x_diatomics.h5", {"layout": "ani2x"}),
        ("spice_sample.h5", {"layout": "spice", "skip_unknown_elements": True})]


@pytest.mark.parametrize("name,opts", REAL, ids=[r[0] for r in REAL])
def test_every_real_file_passes_the_checks(shared, name, opts):
    path = shared / "data" / name
    if not path.exists():
        pytest.skip(f"{path} not found")
    ds = load_dataset([{"path": str(path), **opts}])
    d = ds.summary_dict()
    assert d["skipped_close_atoms"] == d["skipped_bad_label"] == d["skipped_bad_coord"] == 0
    assert ds.n_conf > 0
    lines = check_sae_plausible(ds)
    assert len(lines) == 1 and ("fits" in lines[0] or "not checked" in lines[0])


def test_default_dataset_passes_the_checks(default_ds):
    d = default_ds.summary_dict()
    with h5py.File(default_dataset_path()) as f:
        n = int(f.attrs["n_conformers"])      # what the generator wrote
    assert d["skipped_close_atoms"] == d["skipped_bad_label"] == 0 and default_ds.n_conf == n


def test_summary_lists_the_planted_counts(tmp_path):
    a = mol(nc=6, seed=0)
    a["coordinates"][1, 2] = a["coordinates"][1, 0]        # close atoms
    a["wb97x_tz.energy"][2] = 1e24                         # energy out of range
    a["wb97x_tz.forces"][3, 0, 0] = -np.inf                # infinite force
    a["wb97x_tz.energy"][4] = np.nan                       # missing energy (masked)
    a["wb97x_tz.forces"][5] = 0.0                          # all-zero forces (masked)
    a["coordinates"][0, 1, 1] = np.nan                     # bad coordinates
    q = np.full((3, 5), 0.05, np.float32)
    groups = {"CH4": a, "CH4b": mol(nc=3, seed=1, **{"wb97x_tz.mbis_charges": q}),
              "SiH4": mol((14, 1, 1, 1, 1), nc=2, seed=2)}
    p = write(tmp_path / "plant.h5", groups)
    props = {**PROPS, "charges": {"key": "wb97x_tz.mbis_charges"}}
    ds = load_dataset([{"path": str(p), "layout": "ani1x", "properties": props,
                        "skip_bad_conformers": True, "skip_unknown_elements": True}])
    d = ds.summary_dict()
    assert (d["conformers_read"], ds.n_conf) == (11, 5)
    assert (d["skipped_unknown_element"], d["skipped_bad_coord"], d["skipped_close_atoms"],
            d["skipped_bad_label"]) == (2, 1, 1, 2)
    L = d["labels"]
    assert (L["energy"]["used"], L["energy"]["nan"], L["energy"]["skipped"]) == (4, 1, 1)
    assert (L["forces"]["used"], L["forces"]["zero"], L["forces"]["skipped"]) == (4, 1, 1)
    assert (L["charges"]["used"], L["charges"]["absent"]) == (3, 2)
    s = ds.summary()
    for text in ("read 11 conformers in 3 groups, used 5, skipped 6 (2 unknown element, "
                 "1 bad coordinates, 1 close atoms, 2 bad label)",
                 "energy ('wb97x_tz.energy', hartree): used 4 conformers; masked: 1 NaN, 0 all-zero, "
                 "0 absent; skipped 1 (infinite or out of range)",
                 "forces ('wb97x_tz.forces', hartree/angstrom): used 4 conformers (20 atoms); masked: "
                 "0 NaN, 1 all-zero, 0 absent; skipped 1",
                 "charges ('wb97x_tz.mbis_charges', e): used 3 conformers (15 atoms); masked: 0 NaN, "
                 "0 all-zero, 2 absent"):
        assert text in s, s
    assert str(p) in s


def test_summary_per_source(tmp_path):
    p1 = write(tmp_path / "one.h5", {"CH4": mol(nc=3)})
    m = mol(nc=2, seed=3)
    m["wb97x_tz.energy"][0] = np.nan
    p2 = write(tmp_path / "two.h5", {"CH4": m})
    ds = load_dataset(src(p1) + src(p2))
    per = ds.summary_dict()["per_source"]
    assert [c["path"] for c in per] == [str(p1), str(p2)]
    assert per[1]["labels"]["energy"]["nan"] == 1 and per[0]["labels"]["energy"]["nan"] == 0
    lines = ds.summary().splitlines()
    assert lines[1].startswith(f"source 0: {p1} [ani1x]: read 3") and any(
        ln.startswith(f"source 1: {p2} [ani1x]: read 2") for ln in lines)
    assert "all sources:" in ds.summary()


def test_cache_version_and_counts(tmp_path, monkeypatch):
    m = mol(nc=4)
    m["coordinates"][1, 1] = m["coordinates"][1, 0]
    p = write(tmp_path / "a.h5", {"CH4": m})
    s = src(p, skip_bad_conformers=True)
    direct = load_dataset(s)
    cached = load_dataset(s, cache_dir=tmp_path / "cache")
    again = load_dataset(s, cache_dir=tmp_path / "cache")
    assert direct.summary() == cached.summary() == again.summary()
    assert cached.summary_dict()["skipped_close_atoms"] == 1
    folders = [f for f in (tmp_path / "cache").iterdir() if not f.name.startswith(".")]
    assert len(folders) == 1
    assert json.loads((folders[0] / "meta.json").read_text())["version"] == dataset_mod.CACHE_VERSION >= 2
    # a cache of another version lives in another folder: never read as this one
    monkeypatch.setattr(dataset_mod, "CACHE_VERSION", 1)
    load_dataset(s, cache_dir=tmp_path / "cache")
    assert len([f for f in (tmp_path / "cache").iterdir() if not f.name.startswith(".")]) == 2
