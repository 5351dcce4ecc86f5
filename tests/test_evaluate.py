"""The test report (aimnet_fast.evaluate): its numbers against an independent float64 computation
(the model run directly on conformers read with h5py, errors in numpy), the per-source split,
label masks, the rank split, and the command line (report, JSON, one-line errors)."""
import copy
import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from aimnet_fast import data as D
from aimnet_fast.batch import Batch
from aimnet_fast.checkpoint import load_model, save_model
from aimnet_fast.evaluate import evaluate, format_report, main, read_sources, write_report
from aimnet_fast.units import BOHR_TO_A, HARTREE_TO_KCALMOL, REPORT_UNITS

TZ = {"energy": "wb97x_tz.energy", "forces": "wb97x_tz.forces", "charges": "wb97x_tz.mbis_charges",
      "volumes": "wb97x_tz.mbis_volumes"}


@pytest.fixture(scope="module")
def ani1x(shared):
    return shared / "data" / "ani1x_sample.h5"


@pytest.fixture(scope="module")
def r06(shared):
    return shared / "data" / "ani1x_06r_gdb11_s01.h5"


@pytest.fixture(scope="module")
def model64(released_models):
    """cv0 in float64 (a copy: the session's models stay as they are)."""
    return copy.deepcopy(released_models[0]).double().eval()


@pytest.fixture(scope="module")
def ckpt(released_models, tmp_path_factory):
    p = tmp_path_factory.mktemp("evaluate") / "cv0.pt"
    save_model(released_models[0], p)
    return p


def read_h5(path, keys):
    """Every conformer of an ANI-1x-layout file: (numbers, coord Å float64, {label: array})."""
    out = []
    with h5py.File(path, "r") as f:
        for g in sorted(f):
            grp = f[g]
            z = np.asarray(grp["atomic_numbers"], np.int64)
            xyz = np.asarray(grp["coordinates"], np.float64)
            lab = {k: np.asarray(grp[key], np.float64) for k, key in keys.items()}
            for c in range(xyz.shape[0]):
                out.append((z, xyz[c], {k: v[c] for k, v in lab.items()}))
    return out


def direct(model, confs, forces=True):
    """Model outputs of all conformers in one batch: energy (T, M) Ha, charges and volumes (T, N),
    forces (N, 3) Ha/Å of the last pass; float64 numpy."""
    b = Batch.from_molecules([(z, x) for z, x, _ in confs], dtype=torch.float64)
    coord = b.coord.clone().requires_grad_(forces)
    with torch.set_grad_enabled(forces):
        out = model(b.numbers, coord, b.mol_idx, b.n_mol)
        f = -torch.autograd.grad(out["energy"].sum(), coord)[0] if forces else None
    p = {k: out["passes"][k].detach().double().numpy() for k in ("energy", "charges", "volumes")}
    if forces:
        p["forces"] = f.double().numpy()
    return p


def mae_rmse(err):
    err = np.asarray(err, np.float64)
    return np.abs(err).mean(), math.sqrt((err ** 2).mean())


def check(stat, err, rel=1e-9):
    mae, rmse = mae_rmse(err)
    assert stat["n"] == err.size
    assert stat["mae"] == pytest.approx(mae, rel=rel)
    assert stat["rmse"] == pytest.approx(rmse, rel=rel)


def test_report_equals_independent_float64(model64, ani1x):
    confs = read_h5(ani1x, TZ)
    ds = D.load_dataset([{"path": str(ani1x), "layout": "ani1x"}])
    assert ds.n_conf == len(confs) == 8
    rep = evaluate(model64, ds, mols_per_batch=5, dtype=torch.float64, name="cv0")
    json.dumps(rep, allow_nan=False)                     # plain JSON
    T = model64.n_pass
    assert rep["model"] == "cv0" and rep["n_pass"] == T == 3
    assert rep["targets"] == ["energy", "charges", "volumes", "forces"]
    assert rep["units"] == {t: REPORT_UNITS[t][0] for t in rep["targets"]}
    assert rep["conformers"] == {"all": 8, "sources": {str(ani1x.resolve()): 8}}

    pred = direct(model64, confs)
    e_lab = np.array([lab["energy"] for _, _, lab in confs])
    for name in ("charges", "volumes"):
        assert set(rep["all"][name]) == {f"p{p + 1}" for p in range(T)}
    # the unit's name and factor agree (bohr³ inside; Å³ = bohr³ · BOHR_TO_A³)
    factor = {"charges": 1.0, "volumes": {"A3": BOHR_TO_A ** 3, "bohr3": 1.0}[rep["units"]["volumes"]]}
    for p in range(T):
        check(rep["all"]["energy"][f"p{p + 1}"], (pred["energy"][p] - e_lab) * HARTREE_TO_KCALMOL)
        for name in ("charges", "volumes"):
            lab = np.concatenate([lab[name] for _, _, lab in confs])
            check(rep["all"][name][f"p{p + 1}"], (pred[name][p] - lab) * factor[name])
    f_lab = np.concatenate([lab["forces"] for _, _, lab in confs])
    assert set(rep["all"]["forces"]) == {"last"}
    check(rep["all"]["forces"]["last"], (pred["forces"] - f_lab).ravel() * HARTREE_TO_KCALMOL)
    # the one source is the whole
    assert rep["sources"] == {str(ani1x.resolve()): rep["all"]}

    # a subset of conformers, fewer passes, no forces, chosen targets
    sub = np.array([6, 1, 3])
    rep2 = evaluate(model64, ds, sub, targets=["energy"], n_pass=2, forces=False, dtype=torch.float64)
    assert rep2["targets"] == ["energy"] and set(rep2["all"]["energy"]) == {"p1", "p2"}
    b = D.collate(ds, sub)
    with torch.no_grad():
        out = model64(b.numbers, b.coord.double(), b.mol_idx, b.n_mol, n_pass=2)
    err = (out["passes"]["energy"][1].numpy() - b.labels["energy"].numpy()) * HARTREE_TO_KCALMOL
    check(rep2["all"]["energy"]["p2"], err)


def test_masks_count_only_present_labels(model64, ani1x, tmp_path):
    """NaN labels (energy of one conformer, the charge of one atom) and all-zero rows (the CM5
    charges of 4 of the 8 conformers, which the reader marks as missing) are not counted."""
    bad = tmp_path / "nan.h5"
    with h5py.File(ani1x, "r") as src, h5py.File(bad, "w") as dst:
        for g in src:
            src.copy(src[g], dst, name=g)
        first = sorted(dst)[0]
        e = dst[first]["wb97x_tz.energy"][()]
        e[0] = np.nan
        dst[first]["wb97x_tz.energy"][...] = e
        q = dst[first]["wb97x_dz.cm5_charges"][()]
        q[0, 2] = np.nan
        dst[first]["wb97x_dz.cm5_charges"][...] = q
    keys = {"energy": "wb97x_tz.energy", "charges": "wb97x_dz.cm5_charges"}
    confs = read_h5(bad, keys)
    ds = D.load_dataset([{"path": str(bad), "layout": "ani1x",
                          "properties": {k: {"key": v} for k, v in keys.items()}}])
    rep = evaluate(model64, ds, dtype=torch.float64, mols_per_batch=5)
    assert rep["targets"] == ["energy", "charges"]
    pred = direct(model64, confs, forces=False)

    e_lab = np.array([lab["energy"] for _, _, lab in confs])
    present = np.isfinite(e_lab)
    assert present.sum() == 7
    q_lab = np.concatenate([np.where((lab["charges"] == 0).all(), np.nan, lab["charges"])
                            for _, _, lab in confs])
    q_present = np.isfinite(q_lab)
    n_atoms = sum(len(z) for z, _, _ in confs)
    assert q_present.sum() == n_atoms - (13 + 14 + 14 + 19) - 1 == 59   # 4 zero rows, 1 NaN atom
    for p in range(3):
        check(rep["all"]["energy"][f"p{p + 1}"],
              (pred["energy"][p] - e_lab)[present] * HARTREE_TO_KCALMOL)
        check(rep["all"]["charges"][f"p{p + 1}"], (pred["charges"][p] - q_lab)[q_present])


def test_per_source_split_adds_up(released_models, ani1x, r06):
    model = released_models[0]
    ds = D.load_dataset([{"path": str(ani1x), "layout": "ani1x",
                          "properties": {"energy": {"key": TZ["energy"]},
                                         "forces": {"key": TZ["forces"]},
                                         "charges": {"key": "wb97x_dz.cm5_charges"}}},
                         {"path": str(r06), "layout": "06r"}])
    src = np.asarray(ds.source)
    rng = np.random.default_rng(0)
    idx = np.sort(np.concatenate([np.flatnonzero(src == 0),
                                  rng.choice(np.flatnonzero(src == 1), 24, replace=False)]))
    rep = evaluate(model, ds, idx, mols_per_batch=16)
    a, b = str(ani1x.resolve()), str(r06.resolve())
    assert list(rep["sources"]) == [a, b]
    assert rep["conformers"] == {"all": 32, "sources": {a: 8, b: 24}}
    assert rep["targets"] == ["energy", "charges", "forces"]
    assert rep["sources"][b]["charges"]["p1"] == {"mae": None, "rmse": None, "n": 0}   # 06r has none
    for t, stats in rep["all"].items():
        for tag, st in stats.items():
            parts = [rep["sources"][s][t][tag] for s in (a, b)]
            assert sum(x["n"] for x in parts) == st["n"] > 0
            ok = [x for x in parts if x["n"]]
            mse = sum(x["n"] * x["rmse"] ** 2 for x in ok) / st["n"]
            mae = sum(x["n"] * x["mae"] for x in ok) / st["n"]
            assert st["rmse"] ** 2 == pytest.approx(mse, rel=1e-12)
            assert st["mae"] == pytest.approx(mae, rel=1e-12)
    # each source alone gives its entry (float32, other batches: the predictions differ in the
    # last bits of float32)
    alone = evaluate(model, ds, idx[src[idx] == 1], mols_per_batch=16)
    for tag, st in rep["sources"][b]["energy"].items():
        assert alone["all"]["energy"][tag] == pytest.approx(st, rel=1e-6)
    text = format_report(rep)
    lines = text.splitlines()
    assert a in text and b in text and lines[-len(rep["targets"])].startswith("all (32 conformers)")
    assert "kcal/mol/A" in text and "p3 RMSE" in text


class FakeDist:
    """Two ranks run one after the other: rank 1 keeps its sums, rank 0 adds them (the all-reduce)."""
    world_size, active = 2, True

    def __init__(self, rank, other=None):
        self.rank, self.other, self.sent = rank, other, None

    def all_reduce_sum(self, t):
        self.sent = t.clone()
        return t + self.other.sent if self.other is not None else t


def test_rank_split_gives_the_whole(model64, ani1x):
    ds = D.load_dataset([{"path": str(ani1x), "layout": "ani1x"}])
    kw = {"mols_per_batch": 3, "dtype": torch.float64}
    whole = evaluate(model64, ds, **kw)
    r1 = FakeDist(1)
    evaluate(model64, ds, **kw, dist=r1)
    r0 = evaluate(model64, ds, **kw, dist=FakeDist(0, r1))
    assert r0["conformers"] == whole["conformers"]
    for t in whole["targets"]:
        for tag, st in whole["all"][t].items():
            assert r0["all"][t][tag] == pytest.approx(st, rel=1e-10)


def test_cli_hdf5_and_yaml(ckpt, ani1x, tmp_path, capsys, monkeypatch):
    model = load_model(ckpt, backend="torch").eval()
    # HDF5 with a layout
    out = tmp_path / "h5.json"
    assert main([str(ckpt), str(ani1x), "--layout", "ani1x", "--backend", "torch",
                 "--mols-per-batch", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    ds = D.load_dataset([{"path": str(ani1x), "layout": "ani1x"}])
    rep = evaluate(model, ds, mols_per_batch=3, name=str(ckpt))
    assert json.loads(out.read_text()) == rep
    assert printed.strip() == format_report(rep)

    # YAML list: the same file twice with other labels, one by a path relative to the YAML
    (tmp_path / "link.h5").symlink_to(ani1x)
    yml = tmp_path / "sources.yaml"
    yml.write_text(f"- path: {ani1x}\n  layout: ani1x\n"
                   "- path: link.h5\n"
                   "  properties:\n"
                   "    energy: {key: wb97x_tz.energy, unit: hartree}\n"
                   "    charges: {key: wb97x_dz.cm5_charges, unit: e}\n")
    out2 = tmp_path / "yaml.json"
    monkeypatch.chdir(tmp_path.parent)
    assert main([str(ckpt), str(yml), "--no-forces", "--backend", "torch", "--n-pass", "2",
                 "-o", str(out2)]) == 0
    printed = capsys.readouterr().out
    sources, _, _ = read_sources(yml)
    assert sources[1]["path"] == str(tmp_path / "link.h5") and sources[1]["layout"] == "auto"
    ds2 = D.load_dataset(sources)
    rep2 = evaluate(model, ds2, forces=False, n_pass=2, name=str(ckpt))
    got = json.loads(out2.read_text())
    assert got == rep2 and printed.strip() == format_report(rep2)
    assert got["targets"] == ["energy", "charges", "volumes"]
    assert list(got["sources"]) == [str(ani1x.resolve()), str(tmp_path / "link.h5")]
    assert got["conformers"]["all"] == 16


def test_read_sources_forms(ani1x, tmp_path):
    entry = {"path": str(ani1x), "layout": "ani1x",
             "properties": {"energy": {"key": "wb97x_tz.energy", "unit": "hartree"}}}
    import yaml
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([entry]))
    (tmp_path / "map.yaml").write_text(yaml.safe_dump({"sources": [entry, str(ani1x)]}))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"data": {"sources": [entry]}, "seed": 1}))
    one, _, _ = read_sources(tmp_path / "list.yaml")
    assert one[0]["path"] == str(ani1x) and one[0]["layout"] == "ani1x"
    assert one[0]["properties"]["energy"]["key"] == "wb97x_tz.energy"
    two, _, _ = read_sources(tmp_path / "map.yaml", layout="ani1x")
    assert two[0] == one[0] and two[1]["path"] == str(ani1x) and two[1]["layout"] == "ani1x"
    three, _, what = read_sources(tmp_path / "train.yaml")
    assert three == one and what.startswith("data.sources of")
    h5, cache, _ = read_sources(ani1x, layout="06r")
    assert h5 == [{"path": str(ani1x), "layout": "06r"}] and cache is None
    from aimnet_fast.train import config as C
    if "test_sources" in {f.name for f in C.dataclasses.fields(C.DataConfig)}:
        held = {**entry, "layout": "auto"}
        (tmp_path / "held.yaml").write_text(yaml.safe_dump(
            {"data": {"sources": [entry], "test_sources": [held]}}))
        four, _, what = read_sources(tmp_path / "held.yaml")
        assert what.startswith("data.test_sources of") and four[0]["layout"] == "auto"
        assert four[0]["properties"]["energy"]["key"] == "wb97x_tz.energy"


def test_write_report_atomic(tmp_path):
    rep = {"model": None, "n_pass": 1, "targets": ["energy"], "units": {"energy": "kcal/mol"},
           "conformers": {"all": 1, "sources": {"a.h5": 1}},
           "all": {"energy": {"p1": {"mae": 1.0, "rmse": 1.0, "n": 1}}},
           "sources": {"a.h5": {"energy": {"p1": {"mae": 1.0, "rmse": 1.0, "n": 1}}}}}
    p = tmp_path / "sub" / "test_metrics.json"
    write_report(rep, p)
    assert json.loads(p.read_text()) == rep
    assert [f.name for f in p.parent.iterdir()] == ["test_metrics.json"]
    assert "all (1 conformers)" in format_report(rep)


@pytest.fixture
def bad_inputs(tmp_path, ani1x):
    notes = tmp_path / "notes.pt"
    notes.write_text("not weights\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("- path: [unclosed\n")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text(f"- path: {ani1x}\n  lay_out: ani1x\n")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    return {"notes": notes, "broken": broken, "unknown": unknown_key, "scalar": scalar,
            "data": ani1x}


@pytest.mark.parametrize("args, status, culprit", [
    (["/nonexistent/cv0.pt", "{data}"], 1, "/nonexistent/cv0.pt: no such checkpoint file"),
    (["{notes}", "{data}"], 1, "not a checkpoint"),
    (["{ckpt}", "/nonexistent/data.h5"], 1, "/nonexistent/data.h5"),
    (["{ckpt}", "{data}", "--layout", "xyz"], 2, "--layout 'xyz': unknown layout"),
    (["{ckpt}", "{broken}"], 2, "cannot read the YAML"),
    (["{ckpt}", "{unknown}"], 2, "sources.0.lay_out"),
    (["{ckpt}", "{scalar}"], 2, "expected a list of sources"),
    (["{ckpt}", "{data}", "--mols-per-batch", "0"], 2, "--mols-per-batch"),
    (["{ckpt}", "{notes}", "--layout", "ani1x"], 1, "cannot read HDF5 file"),
    (["{ckpt}", "{data}", "--out", "{notes}/x.json"], 1, "--out"),
])
def test_cli_errors_one_line(args, status, culprit, bad_inputs, ckpt, capsys):
    fill = {**{k: str(v) for k, v in bad_inputs.items()}, "ckpt": str(ckpt)}
    args = [a.format(**fill) for a in args]
    assert main(args) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m aimnet_fast.evaluate: error:"), err
    assert culprit in err[0]


def test_module_runs(ani1x):
    r = subprocess.run([sys.executable, "-m", "aimnet_fast.evaluate", "/nonexistent.pt", str(ani1x)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "python -m aimnet_fast.evaluate: error: /nonexistent.pt: no such checkpoint file"]
