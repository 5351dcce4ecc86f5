"""The predict command's batching and outputs: batches sized from a memory budget (same results as
one batch), one neighbor search per batch shared by the input checks and every ensemble member,
JSON / extended XYZ (read back by ASE, in eV) / npz outputs holding the same numbers, no output left
behind by a failed run, and denormals flushed."""
import json

import numpy as np
import pytest
import torch

from aimnet_fast import ops
from aimnet_fast import predict as P
from aimnet_fast.checkpoint import save_model
from aimnet_fast.errors import PredictError
from aimnet_fast.io import read_xyz, write_xyz
from aimnet_fast.units import HARTREE_TO_EV


@pytest.fixture(scope="module")
def files(released_models, reference_molecules, tmp_path_factory):
    d = tmp_path_factory.mktemp("predict_out")
    save_model(released_models[0], d / "cv0.pt")
    save_model(released_models[1], d / "cv1.pt")
    write_xyz(d / "ref.xyz", [(m["numbers"], m["coord_A"]) for m in reference_molecules],
              [m["name"] for m in reference_molecules])
    return d


@pytest.fixture(scope="module")
def as_json(files):
    out = files / "ref.json"
    assert P.main([str(files / "cv0.pt"), str(files / "ref.xyz"), "--forces", "-o", str(out)]) == 0
    return json.loads(out.read_text())


def test_parse_bytes():
    assert P.parse_bytes("1GB") == 1 << 30 and P.parse_bytes("512MB") == 512 << 20
    assert P.parse_bytes("2g") == 2 << 30 and P.parse_bytes("1e9") == 10 ** 9
    assert P.parse_bytes("64KiB") == 64 << 10 and P.parse_bytes(4096) == 4096
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(PredictError):
            P.parse_bytes(bad)


def test_a_small_budget_gives_small_batches_and_the_same_results(files):
    models = P.load_models([files / "cv0.pt"])
    frames = read_xyz(files / "ref.xyz")
    plans = list(P.plan_batches(models, frames))
    assert len(plans) == 1  # 20 small molecules: far under 1 GB
    budget = 3_000_000
    small = list(P.plan_batches(models, frames, memory_budget=budget))
    assert len(small) > 3
    assert [f.index for g, _, _ in small for f in g] == list(range(len(frames)))
    for group, batch, nb in small:
        assert len(group) == 1 or P.batch_bytes(batch.n_atoms, nb) <= budget
    together = P.predict_frames(models, frames, forces=True)
    apart = P.predict_frames(models, frames, forces=True, memory_budget=budget)
    for t, a in zip(together, apart):
        assert t["index"] == a["index"] and abs(t["energy_Ha"] - a["energy_Ha"]) < 1e-6
        np.testing.assert_allclose(t["forces_Ha_per_A"], a["forces_Ha_per_A"], rtol=0, atol=1e-6)


def test_one_neighbor_search_per_batch_for_checks_and_every_model(files, monkeypatch):
    calls = []
    real = ops.build_neighbors

    def counting(coord, mol_idx, backend="auto"):
        calls.append(coord.shape[0])
        return real(coord, mol_idx, backend)
    monkeypatch.setattr(ops, "build_neighbors", counting)
    models = P.load_models([files / "cv0.pt", files / "cv1.pt"])
    frames = read_xyz(files / "ref.xyz")
    batches = list(P.predict_stream(models, frames, forces=True, batch_atoms=150))
    assert len(batches) >= 2 and len(calls) == len(batches)
    assert calls == [b.n_atoms for _, b, _ in batches]


def test_extxyz_is_read_by_ase_in_ev(files, as_json):
    ase_io = pytest.importorskip("ase.io")
    out = files / "ref.extxyz"
    assert P.main([str(files / "cv0.pt"), str(files / "ref.xyz"), "--forces", "-o", str(out)]) == 0
    frames = ase_io.read(out, ":")
    inputs = read_xyz(files / "ref.xyz")
    assert len(frames) == len(as_json["molecules"]) == 20
    for atoms, mol, src in zip(frames, as_json["molecules"], inputs):
        assert list(atoms.numbers) == mol["numbers"]
        np.testing.assert_allclose(atoms.positions, np.asarray(src.coord), rtol=0, atol=1e-8)
        e = atoms.get_potential_energy()
        assert abs(e - mol["energy_Ha"] * HARTREE_TO_EV) < 1e-9 * abs(e)
        # The JSON holds the float32 network's numbers to nine digits, which identify each
        # float32 exactly; the extxyz's are in eV (not float32 numbers), to eleven digits.
        np.testing.assert_allclose(atoms.get_forces(),
                                   np.asarray(mol["forces_Ha_per_A"]) * HARTREE_TO_EV,
                                   rtol=1e-8, atol=1e-9)
        np.testing.assert_array_equal(atoms.get_charges().astype(np.float32),
                                      np.float32(mol["charges_e"]))
        assert atoms.info["energy_Ha"] == pytest.approx(mol["energy_Ha"], rel=1e-15)
        assert atoms.info["name"] == mol["name"]


def test_npz_holds_the_same_arrays(files, as_json):
    out = files / "ref.npz"
    assert P.main([str(files / "cv0.pt"), str(files / "ref.xyz"), "--forces", "-o", str(out)]) == 0
    z = np.load(out)
    mols = as_json["molecules"]
    off = z["offsets"]
    assert off.shape == (21,) and list(z["index"]) == list(range(20))
    assert json.loads(str(z["units"]))["energy_Ha"] == "hartree"
    np.testing.assert_array_equal(z["energy_Ha"], [m["energy_Ha"] for m in mols])
    for k, m in enumerate(mols):
        a, b = off[k], off[k + 1]
        assert z["numbers"][a:b].tolist() == m["numbers"] and z["name"][k] == m["name"]
        for key in ("forces_Ha_per_A", "charges_e", "elmoments", "volumes_bohr3"):
            # float32 numbers in both: the npz exactly, the JSON to the nine digits that
            # identify a float32
            np.testing.assert_array_equal(z[key][a:b].astype(np.float32), z[key][a:b])
            np.testing.assert_array_equal(z[key][a:b].astype(np.float32), np.float32(m[key]))


def test_json_on_standard_output_is_one_document(files, as_json, capsys):
    assert P.main([str(files / "cv0.pt"), str(files / "ref.xyz"), "--forces"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["molecules"] == as_json["molecules"]
    assert {k: v for k, v in doc.items() if k not in ("molecules",)} == \
        {k: v for k, v in as_json.items() if k not in ("molecules",)}


def test_a_failed_run_leaves_no_output(files, tmp_path, capsys):
    bad = tmp_path / "bad.xyz"
    text = (files / "ref.xyz").read_text()
    bad.write_text(text + "2\nclash\nO 0 0 0\nH 0 0 0.01\n")
    for name in ("o.json", "o.extxyz", "o.npz"):
        out = tmp_path / name
        assert P.main([str(files / "cv0.pt"), str(bad), "-o", str(out), "--batch-atoms", "40"]) == 1
        assert "frame 20 (clash): atoms 0 and 1" in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == [bad]


def test_unknown_output_suffix_is_a_usage_error(files, tmp_path, capsys):
    assert P.main([str(files / "cv0.pt"), str(files / "ref.xyz"), "-o", str(tmp_path / "o.csv")]) == 2
    assert "unknown output format" in capsys.readouterr().err


def test_main_flushes_denormals_on_the_cpu(files, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(P, "flush_denormals", lambda: seen.append(True))
    assert P.main([str(files / "cv0.pt"), str(files / "ref.xyz"), "-o", str(tmp_path / "o.json")]) == 0
    assert seen == [True]
    # and flushing does flush: the smallest float32 denormal reads as zero afterwards
    from aimnet_fast.cpu import flush_denormals
    if flush_denormals():
        assert torch.tensor(1e-45, dtype=torch.float32).item() * 1.0 == 0.0


def _json_molecules(tmp_path, name, frames, numbers, offsets, arrays, fast=True):
    from aimnet_fast.predict_output import JsonWriter
    w = JsonWriter(tmp_path / name, {"units": {}})
    (w.write if fast else w._write_records)(frames, numbers, offsets, arrays)
    w.close()
    return (tmp_path / name).read_text()


def test_json_numbers_identify_the_arrays_and_match_json_dumps(tmp_path):
    from aimnet_fast.io import Frame
    rng = np.random.default_rng(7)
    sizes = [3, 1, 5]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    numbers = rng.integers(1, 9, n)
    frames = [Frame([], [], f'mol "{k}"', k, "in.xyz") for k in range(len(sizes))]
    wide = {"energy_Ha": rng.normal(-300, 50, 3), "forces_Ha_per_A": rng.normal(0, 0.03, (n, 3)),
            "charges_e": rng.normal(0, 0.5, n), "elmoments": rng.normal(0, 1e-6, (n, 4)),
            "volumes_bohr3": rng.uniform(5, 60, n)}
    # float64 numbers: written exactly as json.dumps of the records writes them (the reference)
    fast = _json_molecules(tmp_path, "a.json", frames, numbers, offsets, wide)
    assert fast == _json_molecules(tmp_path, "b.json", frames, numbers, offsets, wide, fast=False)
    # float32 numbers (a float32 network's): nine digits, each read back as the same float32
    narrow = {k: (v if k == "energy_Ha" else v.astype(np.float32).astype(np.float64))
              for k, v in wide.items()}
    text = _json_molecules(tmp_path, "c.json", frames, numbers, offsets, narrow)
    doc = json.loads(text)["molecules"]
    ref = json.loads(_json_molecules(tmp_path, "d.json", frames, numbers, offsets, narrow,
                                     fast=False))["molecules"]
    assert len(text) < 0.8 * len((tmp_path / "d.json").read_text())
    for got, want in zip(doc, ref):
        assert list(got) == list(want)
        assert {k: got[k] for k in ("index", "name", "source", "numbers", "energy_Ha")} == \
            {k: want[k] for k in ("index", "name", "source", "numbers", "energy_Ha")}
        for k in ("forces_Ha_per_A", "charges_e", "elmoments", "volumes_bohr3"):
            np.testing.assert_array_equal(np.float32(got[k]), np.float32(want[k]))
            assert got[k] != want[k]  # shorter numbers, not the same text
    # not JSON numbers: as json.dumps writes them
    bad = dict(narrow, charges_e=np.where(np.arange(n) == 2, np.nan, narrow["charges_e"]))
    assert _json_molecules(tmp_path, "e.json", frames, numbers, offsets, bad) == \
        _json_molecules(tmp_path, "f.json", frames, numbers, offsets, bad, fast=False)
