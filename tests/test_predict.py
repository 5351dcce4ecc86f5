"""The convert and predict commands against the original model's outputs
(shared/reference/aimnet_original_outputs.json, read in place), ensembles, batching, the console
script, and the CLI's error reporting."""
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from aimnet_fast import cli, convert, predict as P
from aimnet_fast.checkpoint import load_model
from aimnet_fast.units import HARTREE_TO_KCALMOL
from aimnet_fast.io import EXAMPLE_XYZ, read_xyz, write_xyz

# as tests/test_reference_outputs.py: a few times the measured float32 gap to the original
TOL = {"energy_Ha": 1e-6, "forces_Ha_per_A": 2e-6, "charges_e": 5e-6, "elmoments": 5e-6,
       "volumes_bohr3": 2e-4}


@pytest.fixture(scope="session")
def checkpoints(shared, tmp_path_factory):
    """Converted checkpoints of the released files: mt cv0, mt cv1, smd cv0 (through the CLI)."""
    d = shared / "aimnet_pretrained"
    out = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name, bb, hd in (("cv0", "aimnet_cv0.pt", "aimnet_mt_cv0.pt"),
                         ("cv1", "aimnet_cv1.pt", "aimnet_mt_cv1.pt"),
                         ("smd0", "aimnet_cv0.pt", "aimnet_smd_cv0.pt")):
        paths[name] = out / f"{name}.pt"
        assert convert.main([str(d / bb), str(d / hd), str(paths[name])]) == 0
    return paths


@pytest.fixture(scope="session")
def reference_xyz(reference_molecules, tmp_path_factory):
    p = tmp_path_factory.mktemp("xyz") / "reference.xyz"
    write_xyz(p, [(m["numbers"], m["coord_A"]) for m in reference_molecules],
              [m["name"] for m in reference_molecules])
    return p


@pytest.fixture(scope="session")
def cv0_forces(checkpoints, reference_xyz, tmp_path_factory):
    """`predict cv0 reference.xyz --forces`, run in-process through main(argv)."""
    out = tmp_path_factory.mktemp("out") / "cv0.json"
    assert P.main([str(checkpoints["cv0"]), str(reference_xyz), "--out", str(out),
                   "--forces", "--backend", "torch"]) == 0
    return json.loads(out.read_text())


def reference_values(ref_model: dict) -> dict:
    # The original implementation kept a batch axis of 1 on per-atom outputs.
    el = np.asarray(ref_model["elmoments"])[0]
    return {"energy_Ha": ref_model["energy_Ha"],
            "forces_Ha_per_A": np.asarray(ref_model["forces_Ha_per_A"]),
            "charges_e": el[:, 0], "elmoments": el,
            "volumes_bohr3": np.asarray(ref_model["volumes_bohr3"])[0]}


def assert_matches(got: dict, ref: dict, keys):
    for k in keys:
        err = np.abs(np.asarray(got[k]) - np.asarray(ref[k])).max()
        assert err < TOL[k], f"{k}: max error {err:.3g} > {TOL[k]}"


def test_convert_prints_what_it_wrote(shared, tmp_path, capsys):
    d = shared / "aimnet_pretrained"
    out = tmp_path / "smd.pt"
    assert convert.main([str(d / "aimnet_cv0.pt"), str(d / "aimnet_smd_cv0.pt"), str(out)]) == 0
    text = capsys.readouterr().out
    assert str(out) in text and "heads energy;" in text and "H C N O S F Cl" in text
    assert list(load_model(out).heads) == ["energy"]


def test_convert_errors_name_the_file(shared, tmp_path, capsys):
    d = shared / "aimnet_pretrained"
    assert convert.main([str(d / "aimnet_cv0.pt"), str(tmp_path / "no.pt"),
                         str(tmp_path / "o.pt")]) == 1
    assert "no.pt: no such file" in capsys.readouterr().err
    # heads file given as the backbone
    assert convert.main([str(d / "aimnet_mt_cv0.pt"), str(d / "aimnet_mt_cv0.pt"),
                         str(tmp_path / "o.pt")]) == 1
    assert "aimnet_mt_cv0.pt" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_predict_cli_matches_original_outputs(cv0_forces, reference_molecules, reference_xyz):
    doc = cv0_forces
    assert doc["units"]["energy_Ha"] == "hartree" and doc["n_models"] == 1
    assert len(doc["molecules"]) == len(reference_molecules) == 20
    for k, (got, m) in enumerate(zip(doc["molecules"], reference_molecules)):
        assert got["index"] == k and got["name"] == m["name"]
        assert got["source"] == str(reference_xyz) and got["numbers"] == m["numbers"]
        assert "energy_std_Ha" not in got
        assert_matches(got, reference_values(m["models"][0]), TOL)


def test_subprocess_console_form(checkpoints, reference_xyz, reference_molecules, tmp_path):
    """`python -m aimnet_fast predict ...` (the aimnet-fast dispatcher) in a fresh process."""
    out = tmp_path / "sub.json"
    r = subprocess.run([sys.executable, "-m", "aimnet_fast", "predict", str(checkpoints["cv0"]),
                        str(reference_xyz), "-o", str(out), "--batch-atoms", "100"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stderr and "20 molecules" in r.stderr
    doc = json.loads(out.read_text())
    for got, m in zip(doc["molecules"], reference_molecules):
        assert "forces_Ha_per_A" not in got
        assert_matches(got, reference_values(m["models"][0]),
                       ["energy_Ha", "charges_e", "elmoments", "volumes_bohr3"])


def test_ensemble_is_the_mean_of_single_models(checkpoints, reference_xyz, reference_molecules,
                                              cv0_forces, tmp_path):
    single = {}
    for name in ("cv0", "cv1"):
        out = tmp_path / f"{name}.json"
        if name == "cv0":
            single[name] = cv0_forces["molecules"]
            continue
        assert P.main([str(checkpoints[name]), str(reference_xyz), "--out", str(out),
                       "--forces", "--backend", "torch"]) == 0
        single[name] = json.loads(out.read_text())["molecules"]
    out = tmp_path / "ens.json"
    assert P.main([str(checkpoints["cv0"]), str(reference_xyz), "--forces", "--out", str(out),
                   "--ensemble", str(checkpoints["cv1"]), "--backend", "torch"]) == 0
    doc = json.loads(out.read_text())
    assert doc["n_models"] == 2
    for k, got in enumerate(doc["molecules"]):
        a, b = single["cv0"][k], single["cv1"][k]
        for key in ("energy_Ha", "forces_Ha_per_A", "charges_e", "elmoments", "volumes_bohr3"):
            # float32 networks: runs may differ in the last bit (threaded reductions)
            np.testing.assert_allclose(got[key], (np.asarray(a[key]) + np.asarray(b[key])) / 2,
                                       rtol=1e-6, atol=1e-7)
        # sample standard deviation of two values: |a - b| / sqrt(2)
        np.testing.assert_allclose(got["energy_std_Ha"], abs(a["energy_Ha"] - b["energy_Ha"])
                                   / np.sqrt(2), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(got["forces_std_Ha_per_A"], np.abs(
            np.asarray(a["forces_Ha_per_A"]) - b["forces_Ha_per_A"]) / np.sqrt(2),
            rtol=1e-5, atol=1e-7)
        # and against the original implementation's cv0 and cv1 outputs
        refs = [reference_values(reference_molecules[k]["models"][cv]) for cv in (0, 1)]
        assert abs(got["energy_Ha"] - (refs[0]["energy_Ha"] + refs[1]["energy_Ha"]) / 2) < 1e-6
        assert abs(got["energy_std_Ha"] - abs(refs[0]["energy_Ha"] - refs[1]["energy_Ha"])
                   / np.sqrt(2)) < 1e-6


def test_molecule_alone_equals_molecule_in_batch(checkpoints, reference_xyz):
    models = P.load_models([checkpoints["cv0"]])
    frames = read_xyz(reference_xyz)
    together = P.predict_frames(models, frames, forces=True)
    alone = P.predict_frames(models, frames, forces=True, batch_atoms=1)
    for t, a in zip(together, alone):
        assert t["index"] == a["index"]
        assert abs(t["energy_Ha"] - a["energy_Ha"]) < 1e-6
        for key, tol in (("forces_Ha_per_A", 1e-5), ("elmoments", 1e-5), ("volumes_bohr3", 1e-4)):
            np.testing.assert_allclose(t[key], a[key], rtol=0, atol=tol)


def test_smd_model_reports_energy_only(checkpoints, reference_xyz, cv0_forces, tmp_path):
    out = tmp_path / "smd.json"
    assert P.main([str(checkpoints["smd0"]), str(reference_xyz), "--out", str(out),
                   "--forces"]) == 0
    doc = json.loads(out.read_text())
    assert doc["heads"] == ["energy"]
    for got, gas in zip(doc["molecules"], cv0_forces["molecules"]):
        assert set(got) == {"index", "name", "source", "numbers", "energy_Ha", "forces_Ha_per_A"}
        # Water stabilizes these neutral polar molecules by a few kcal/mol.
        dg = (got["energy_Ha"] - gas["energy_Ha"]) * HARTREE_TO_KCALMOL
        assert -40 < dg < 0


def test_mixed_ensemble_is_refused(checkpoints, reference_xyz, capsys):
    code = P.main([str(checkpoints["cv0"]), str(reference_xyz),
                   "--ensemble", str(checkpoints["smd0"])])
    assert code == 1
    err = capsys.readouterr().err
    assert "same properties" in err and "Traceback" not in err


def test_api_on_a_batch_and_the_bundled_example(checkpoints):
    """predict() on a Batch; the bundled example geometries were relaxed with cv0, so its forces
    on them are small."""
    model = load_model(checkpoints["cv0"], backend="torch")
    from aimnet_fast.io import frames_to_batch
    frames = read_xyz(EXAMPLE_XYZ)
    res = P.predict(model, frames_to_batch(frames), forces=True)
    assert len(res) == len(frames)
    for r, f in zip(res, frames):
        assert r["numbers"] == f.numbers
        assert np.abs(r["forces_Ha_per_A"]).max() < 5e-3
        assert abs(sum(r["charges_e"])) < 0.05  # neutral molecules


@pytest.mark.parametrize("case,needle", [
    ("2\nHBr\nBr 0 0 0\nH 0 0 1.41\n", "frame 1 (HBr): element Br"),
    ("2\nclash\nO 0 0 0\nH 0 0 0.01\n", "frame 1 (clash): atoms 0 and 1 are 0.0100 Å apart"),
    ("2\nbad\nO 0 0 0\nH 0 x 1\n", "line 9, frame 1 (bad): non-numeric"),
])
def test_cli_reports_bad_input_without_traceback(checkpoints, tmp_path, capsys, case, needle):
    p = tmp_path / "bad.xyz"
    p.write_text("3\nwater\nO 0 0 0.1173\nH 0 0.7572 -0.4692\nH 0 -0.7572 -0.4692\n" + case)
    code = P.main([str(checkpoints["cv0"]), str(p), "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert code == 1 and not (tmp_path / "o.json").exists()
    assert f"{p} {needle}" in err or f"{p} line" in err and needle in err, err
    assert "Traceback" not in err


def test_cli_error_in_a_fresh_process(checkpoints, tmp_path):
    p = tmp_path / "bad.xyz"
    p.write_text("2\nhydrogen\nH 0 0 0\n")
    r = subprocess.run([sys.executable, "-m", "aimnet_fast.predict", str(checkpoints["cv0"]),
                        str(p)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert f"{p} line 4, frame 0 (hydrogen): truncated" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_errors_for_models_and_devices(checkpoints, reference_xyz, shared, tmp_path, capsys):
    # a released file that was not converted
    released = shared / "aimnet_pretrained" / "aimnet_mt_cv0.pt"
    assert P.main([str(released), str(reference_xyz)]) == 1
    assert "not an aimnet_fast checkpoint" in capsys.readouterr().err
    assert P.main([str(tmp_path / "missing.pt"), str(reference_xyz)]) == 1
    assert "missing.pt: no such checkpoint file" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert P.main([str(checkpoints["cv0"]), str(reference_xyz), "--device", "cuda"]) == 1
        assert "CUDA" in capsys.readouterr().err


def test_console_script_dispatch(checkpoints, reference_xyz, tmp_path, monkeypatch, capsys):
    out = tmp_path / "c.json"
    assert cli.main(["predict", str(checkpoints["cv0"]), str(reference_xyz), "--out",
                     str(out)]) == 0
    assert len(json.loads(out.read_text())["molecules"]) == 20
    assert cli.main(["nonsense"]) == 2
    assert "unknown command" in capsys.readouterr().err
    # train is delegated, lazily, with argv passed through
    seen = []
    fake = types.ModuleType("aimnet_fast.train")
    fake.main = lambda argv=None: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "aimnet_fast.train", fake)
    assert cli.main(["train", "--config", "x.yaml", "--steps", "3"]) == 0
    assert seen == [["--config", "x.yaml", "--steps", "3"]]


def test_stdout_output(checkpoints, tmp_path, capsys):
    p = tmp_path / "w.xyz"
    p.write_text("3\nwater\nO 0 0 0.1173\nH 0 0.7572 -0.4692\nH 0 -0.7572 -0.4692\n")
    assert P.main([str(checkpoints["cv0"]), str(p)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["molecules"][0]["name"] == "water"
    assert -76.6 < doc["molecules"][0]["energy_Ha"] < -76.3  # water near wB97x/TZ, in Hartree
