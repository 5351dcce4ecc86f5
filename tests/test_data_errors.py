"""Bad input: each case a DataError naming file, group and conformer, or a counted skip."""
import h5py
import numpy as np
import pytest

from aimnet_fast.data import DataError, load_dataset


def write(path, groups):
    """groups: name -> dict of arrays (ANI-1x layout)."""
    with h5py.File(path, "w") as f:
        for name, arrays in groups.items():
            g = f.create_group(name)
            for k, v in arrays.items():
                g[k] = v
    return path


def mol(nc=3, z=(6, 1, 1, 1, 1), seed=0, **extra):
    rng = np.random.default_rng(seed)
    na = len(z)
    d = {"atomic_numbers": np.array(z, np.uint8),
         "coordinates": rng.normal(0, 1, (nc, na, 3)).astype(np.float32),
         "wb97x_tz.energy": -40.0 + rng.normal(0, 0.01, nc),
         "wb97x_tz.forces": rng.normal(0, 0.01, (nc, na, 3)).astype(np.float32)}
    d.update(extra)
    return d


PROPS = {"energy": {"key": "wb97x_tz.energy"}, "forces": {"key": "wb97x_tz.forces"}}


def src(path, **kw):
    return [{"path": path, "layout": "ani1x", "properties": PROPS, **kw}]


def test_truncated_file(tmp_path, shared):
    good = (shared / "data" / "ani1x_sample.h5").read_bytes()
    p = tmp_path / "trunc.h5"
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="trunc.h5:-:-: cannot read HDF5"):
        load_dataset(src(p))


def test_corrupt_data_inside_a_readable_file(tmp_path):
    """The header is fine but a compressed chunk of one group is garbage: the error names the group
    and the conformers being read."""
    p = tmp_path / "a.h5"
    with h5py.File(p, "w") as f:
        for name, m in (("CH4", mol()), ("CH4b", mol(seed=1))):
            g = f.create_group(name)
            for k, v in m.items():
                g.create_dataset(k, data=v, **({"compression": "gzip"} if k == "wb97x_tz.forces" else {}))
        info = f["CH4b/wb97x_tz.forces"].id.get_chunk_info(0)
    raw = bytearray(p.read_bytes())
    raw[info.byte_offset: info.byte_offset + info.size] = b"\xff" * info.size
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"a\.h5:CH4b:0: cannot read 'wb97x_tz.forces' conformers 0\.\.3"):
        load_dataset(src(p))


def test_corrupt_and_missing_file(tmp_path):
    p = tmp_path / "junk.h5"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match="junk.h5"):
        load_dataset(src(p))
    with pytest.raises(DataError, match="file not found"):
        load_dataset(src(tmp_path / "nope.h5"))


def test_missing_property_everywhere_is_an_error(tmp_path):
    p = write(tmp_path / "a.h5", {"CH4": mol()})
    with pytest.raises(DataError, match=r"a\.h5:-:-: property 'charges': key 'wb97x_tz.mbis_charges'"):
        load_dataset([{"path": p, "layout": "ani1x",
                       "properties": {**PROPS, "charges": {"key": "wb97x_tz.mbis_charges"}}}])
    ds = load_dataset([{"path": p, "layout": "ani1x",
                        "properties": {**PROPS, "charges": {"key": "wb97x_tz.mbis_charges",
                                                            "required": False}}}])
    assert np.isnan(ds.labels["charges"]).all()


def test_property_absent_in_some_groups_is_masked_and_counted(tmp_path):
    q = np.full((3, 5), 0.1, np.float32)
    p = write(tmp_path / "a.h5", {"CH4": mol(), "CH4b": mol(seed=1, **{"wb97x_tz.mbis_charges": q})})
    ds = load_dataset([{"path": p, "layout": "ani1x",
                        "properties": {**PROPS, "charges": {"key": "wb97x_tz.mbis_charges"}}}])
    c = ds.summary_dict()["labels"]["charges"]
    assert (c["used"], c["absent"], c["atoms_used"]) == (3, 3, 15)
    assert np.isnan(ds.labels["charges"][:15]).all() and (ds.labels["charges"][15:] == np.float32(0.1)).all()


def test_mismatched_shapes(tmp_path):
    p = write(tmp_path / "a.h5", {"CH4": mol(**{"wb97x_tz.energy": np.zeros(2)})})
    with pytest.raises(DataError, match=r"a\.h5:CH4:-: property 'energy'.*shape \(2,\).*3 conformers"):
        load_dataset(src(p))
    m = mol()
    m["wb97x_tz.forces"] = m["wb97x_tz.forces"][:, :4]
    p = write(tmp_path / "b.h5", {"CH4": m})
    with pytest.raises(DataError, match=r"b\.h5:CH4:0: property 'forces'"):
        load_dataset(src(p))
    m = mol()
    m["atomic_numbers"] = m["atomic_numbers"][:4]
    p = write(tmp_path / "c.h5", {"CH4": m})
    with pytest.raises(DataError, match=r"c\.h5:CH4:-: species of shape \(4,\)"):
        load_dataset(src(p))


def test_unknown_element_error_or_counted_skip(tmp_path):
    p = write(tmp_path / "a.h5", {"CH4": mol(), "SiH4": mol(z=(14, 1, 1, 1, 1))})
    with pytest.raises(DataError, match=r"a\.h5:SiH4:0: element Si \(Z=14\)"):
        load_dataset(src(p))
    ds = load_dataset(src(p, skip_unknown_elements=True))
    assert ds.n_conf == 3 and ds.summary_dict()["skipped_unknown_element"] == 3


def test_nan_coordinates_error_or_counted_skip(tmp_path):
    m = mol(nc=4)
    m["coordinates"][2, 1, 0] = np.nan
    p = write(tmp_path / "a.h5", {"CH4": m})
    with pytest.raises(DataError, match=r"a\.h5:CH4:2: coordinates are NaN"):
        load_dataset(src(p))
    ds = load_dataset(src(p, skip_bad_conformers=True))
    assert ds.n_conf == 3 and ds.summary_dict()["skipped_bad_coord"] == 1
    assert [ds.name(c).rsplit(":", 1)[1] for c in range(3)] == ["0", "1", "3"]


def test_nan_and_zero_labels_masked_per_target_and_atom(tmp_path):
    m = mol(nc=4)
    m["wb97x_tz.energy"][1] = np.nan
    m["wb97x_tz.forces"][2] = 0.0          # all-zero row: not computed
    m["wb97x_tz.forces"][3, 4] = np.nan    # one atom without a force
    p = write(tmp_path / "a.h5", {"CH4": m})
    ds = load_dataset(src(p))
    s = ds.summary_dict()["labels"]
    assert (s["energy"]["used"], s["energy"]["nan"]) == (3, 1)
    assert (s["forces"]["used"], s["forces"]["zero"], s["forces"]["nan"]) == (2, 1, 1)
    assert s["forces"]["atoms_used"] == 4 * 5 - 5 - 1


def test_zero_forces_of_a_lone_atom_are_real(tmp_path):
    m = mol(nc=2, z=(8,))
    m["wb97x_tz.forces"][:] = 0.0
    p = write(tmp_path / "a.h5", {"O": m})
    ds = load_dataset(src(p))
    assert (ds.labels["forces"] == 0).all() and ds.summary_dict()["labels"]["forces"]["used"] == 2


def test_byte_symbols_unknown_or_outside_the_model(tmp_path):
    """ANI-1 layout (<set>/<mol>/species as byte symbols)."""
    p = tmp_path / "a.h5"
    with h5py.File(p, "w") as f:
        for name, sp in (("m0", [b"C", b"H"]), ("m1", [b"Si", b"H"]), ("m2", [b"Qq", b"H"])):
            g = f.create_group(f"gdb11_s01/{name}")
            g["species"] = np.array(sp, dtype="S2")
            g["coordinates"] = np.zeros((2, 2, 3), np.float32) + np.arange(2)[None, :, None]
            g["energies"] = np.array([-38.0, -38.1])
    with pytest.raises(DataError, match=r"a\.h5:gdb11_s01/m1:0: element Si"):
        load_dataset([{"path": p, "layout": "ani1"}])
    with pytest.raises(DataError, match=r"a\.h5:gdb11_s01/m2:-: unknown element symbol 'Qq'"):
        load_dataset([{"path": p, "layout": "ani1", "skip_unknown_elements": True}])


def test_bad_config(tmp_path):
    p = write(tmp_path / "a.h5", {"CH4": mol()})
    with pytest.raises(DataError, match="unknown unit"):
        load_dataset([{"path": p, "properties": {"energy": {"key": "wb97x_tz.energy", "unit": "joule"}}}])
    with pytest.raises(DataError, match="not a energy unit"):
        load_dataset([{"path": p, "properties": {"energy": {"key": "wb97x_tz.energy",
                                                             "unit": "ev/angstrom"}}}])
    with pytest.raises(DataError, match="unknown layout"):
        load_dataset([{"path": p, "layout": "xyz"}])
