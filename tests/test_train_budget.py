"""The trainer's run control: a wall-clock budget (``max_time``) with phases as fractions of it,
early stopping, the lr warm-up after each cold restart, the weight average (EMA) and its exact
resume, ``best.pt`` across phases, and held-out validation and test sources with the test report
checked against the predict command."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from aimnet_fast.errors import ConfigError
from aimnet_fast.train import config as C
from aimnet_fast.train import step as S
from aimnet_fast.train import trainer as T
from aimnet_fast.train.dist import Dist, process_settings
from aimnet_fast.train.ema import EMA
from aimnet_fast.units import HARTREE_TO_KCALMOL

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SMALL = ["data.max_conformers=40", "data.mols_per_batch=4", "max_steps_per_epoch=3", "num_threads=1",
         "log_every=100", "tensorboard=false", "plot=false", "device=cpu", "progress=lines"]


def cfg_for(tmp_path, *extra):
    return C.load_config(None, SMALL + [f"run_dir={tmp_path / 'run'}", *extra])


def rows_of(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "metrics.csv")))


def record(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture
def as_main():
    """One thread and flushed denormals, as ``main`` sets them: runs in this process are then
    bit-for-bit repeatable."""
    threads = torch.get_num_threads()
    process_settings(1, True, torch.device("cpu"))
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [("90s", 90), ("90", 90), (45, 45), ("45m", 2700),
                                           ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400),
                                           ("2m30s", 150), (" 10 s ", 10)])
def test_durations(text, seconds):
    assert C.parse_duration(text) == seconds


@pytest.mark.parametrize("overrides, words", [
    (["max_time=5 parsecs"], "max_time"),
    (["max_time=0"], "positive"),
    (["max_time=30sm"], "not a duration"),
    (["curriculum.0.time_fraction=0.5"], "needs a budget"),
    (["max_time=1m", "curriculum.0.time_fraction=0.7", "curriculum.1.time_fraction=0.6"], "add up to 1.3"),
    (["max_time=1m", "curriculum.0.time_fraction=0"], "not in (0, 1]"),
    (["optim.lr=-1"], "optim.lr"),
    (["ema.decay=1"], "ema.decay"),
    (["schedule.warmup_steps=-3"], "warmup_steps"),
    (["curriculum.1.lr=0"], "curriculum.1.lr"),
])
def test_bad_run_control_values_are_config_errors(overrides, words):
    with pytest.raises(ConfigError, match=None) as e:
        C.load_config(None, overrides)
    assert words in str(e.value)


# -- the time budget ---------------------------------------------------------------------------------
def test_budget_with_phase_fractions_reaches_every_phase_and_resumes_with_more(tmp_path, capsys):
    budget = 8.0
    cfg = cfg_for(tmp_path, f"max_time={budget:g}s", "curriculum.0.epochs=10000",
                  "curriculum.0.time_fraction=0.5", "curriculum.1.epochs=10000",
                  "curriculum.1.time_fraction=0.5")
    T.run(cfg)
    out = capsys.readouterr().out
    run = tmp_path / "run"
    rows = rows_of(run)
    p1 = [r for r in rows if r["phase"] == "1"]
    p2 = [r for r in rows if r["phase"] == "2"]
    assert p1 and p2, "a budgeted run reaches the T=3 phase"
    # Phase 1 ran until its share of the budget (its epochs never run out), phase 2 until the end.
    # The phase ends at the first check after its deadline, which follows the epoch's row (its
    # time stamp can be just short of the deadline); phase 2's first row is past it.
    assert f"its share of max_time is used ({budget / 2:.0f} s)" in out
    assert float(p2[0]["time_s"]) >= budget / 2
    last = record(run / "last.pt")["training"]["state"]
    assert last["stopped"] == "max_time" and last["phase"] == 1
    assert last["elapsed_s"] >= budget     # the last row, like phase 1's, may be stamped just before
    assert "max_time reached" in out and (run / "best.pt").exists()
    assert json.loads((run / "test_metrics.json").read_text())["validation"]["all"]["energy"]

    # The same budget again: nothing more to do. A bigger one: phase 2 goes on.
    T.run(C.load_config(run / "config.yaml", ["resume=true"]))
    assert len(rows_of(run)) == len(rows)
    bigger = last["elapsed_s"] + 4.0      # the time used so far (slow machines use more) + 4 s
    T.run(C.load_config(run / "config.yaml", ["resume=true", f"max_time={bigger:.1f}"]))
    more = rows_of(run)
    assert len(more) > len(rows) and all(r["phase"] == "2" for r in more[len(rows):])
    assert float(more[-1]["time_s"]) >= bigger - 0.05


# -- early stopping, best.pt across phases: validation losses scripted ------------------------------
def scripted_validation(monkeypatch, losses: list[float], last_losses: list[float]):
    """Trainer.validate runs as usual, then reports the next scripted loss (all passes) and
    loss_last (the prediction)."""
    real = T.Trainer.validate
    it = iter(zip(losses, last_losses))

    def validate(self, n_pass):
        val = real(self, n_pass)
        val["loss"], val["loss_last"] = next(it)
        return val
    monkeypatch.setattr(T.Trainer, "validate", validate)


def test_early_stopping_ends_the_phase(tmp_path, monkeypatch):
    # Phase 1: best 4 at epoch 2, then 2 epochs without a better one → stops after epoch 4.
    losses = [5, 4, 4.5, 4.2] + [3, 2, 1]
    scripted_validation(monkeypatch, losses, losses)
    T.run(cfg_for(tmp_path, "curriculum.0.epochs=20", "curriculum.1.epochs=3", "schedule.early_stopping=2"))
    rows = rows_of(tmp_path / "run")
    assert [int(r["phase"]) for r in rows] == [1, 1, 1, 1, 2, 2, 2]


def test_best_is_the_best_prediction_of_the_run_and_of_each_phase(tmp_path, monkeypatch):
    # The T=3 phase never beats the T=1 model's prediction (epoch 2): best.pt stays at epoch 2.
    last = [3.0, 2.0, 2.5, 4.0, 2.2, 3.0]
    scripted_validation(monkeypatch, [10.0] * 6, last)
    T.run(cfg_for(tmp_path, "curriculum.0.epochs=3", "curriculum.1.epochs=3"))
    run = tmp_path / "run"
    epoch_of = {name: record(run / name)["training"]["state"]["global_epoch"]
                for name in ("best.pt", "best_phase1.pt", "best_phase2.pt", "last.pt")}
    assert epoch_of == {"best.pt": 2, "best_phase1.pt": 2, "best_phase2.pt": 5, "last.pt": 6}
    assert record(run / "best.pt")["model"]["n_pass"] == 1
    assert record(run / "best_phase2.pt")["model"]["n_pass"] == 3
    report = json.loads((run / "test_metrics.json").read_text())
    assert report["best_epoch"] == 2 and report["n_pass"] == 1


# -- warm-up -----------------------------------------------------------------------------------------
def test_warmup_ramps_the_lr_after_every_cold_restart(tmp_path, monkeypatch):
    scales = []
    real = T.train_step

    def spy(*args, lr_scale=1.0, **kw):
        scales.append(lr_scale)
        return real(*args, lr_scale=lr_scale, **kw)
    monkeypatch.setattr(T, "train_step", spy)
    T.run(cfg_for(tmp_path, "curriculum.0.epochs=2", "curriculum.1.epochs=1", "schedule.warmup_steps=4"))
    ramp = [0.25, 0.5, 0.75, 1.0]
    assert scales == ramp + [1.0, 1.0] + ramp[:3]     # 3 steps per epoch; phase 2 starts again


def test_a_phase_starts_at_its_own_lr(tmp_path):
    trainer = T.Trainer(cfg_for(tmp_path, "curriculum.0.epochs=1", "curriculum.1.epochs=1",
                                "curriculum.1.lr=2.5e-4"))
    lrs = []
    real = trainer.start_phase

    def start(n):
        real(n)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    trainer.start_phase = start
    trainer.fit()
    assert lrs == [1e-3, 2.5e-4]


def test_lr_scale_is_one_step_at_the_scaled_lr():
    """A step with lr_scale s equals a step of an optimizer whose lr is s·lr, and the lr is back
    after it."""
    from aimnet_fast.model import AIMNet
    from tests.test_train_common import make_batch, sample_conformers
    torch.manual_seed(0)
    batch = make_batch(sample_conformers()[:3])
    cfg = C.LossConfig()
    models, opts = [], []
    for lr, in ((1e-3,), (2.5e-4,)):
        torch.manual_seed(1)
        m = AIMNet().double()
        models.append(m)
        opts.append(torch.optim.Adam(m.parameters(), lr=lr, amsgrad=True))
    S.train_step(models[0], opts[0], batch, cfg, ["energy", "charges"], 1, Dist(), lr_scale=0.25)
    S.train_step(models[1], opts[1], batch, cfg, ["energy", "charges"], 1, Dist())
    assert opts[0].param_groups[0]["lr"] == 1e-3
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


# -- the weight average ---------------------------------------------------------------------------
def test_ema_is_the_exponential_average_and_applied_restores_the_weights():
    lin = torch.nn.Linear(3, 2).double()
    w0 = lin.weight.detach().clone()
    ema = EMA(lin, 0.75)
    seq = [torch.randn(2, 3, dtype=torch.float64) for _ in range(4)]
    expect = w0.clone()
    for w in seq:
        with torch.no_grad():
            lin.weight.copy_(w)
        ema.update()
        expect = 0.75 * expect + 0.25 * w
    torch.testing.assert_close(ema.shadow[0], expect, rtol=1e-15, atol=1e-15)
    with ema.applied():
        torch.testing.assert_close(lin.weight.detach(), expect, rtol=1e-15, atol=1e-15)
    assert torch.equal(lin.weight.detach(), seq[-1])


class Interrupt(Exception):
    pass


def test_ema_run_interrupted_and_resumed_is_bit_identical(tmp_path, monkeypatch, as_main):
    args = ["curriculum.0.epochs=2", "curriculum.1.epochs=2", "ema.decay=0.9", "schedule.warmup_steps=4",
            "checkpoint_every=2", "max_steps_per_epoch=5"]
    whole = C.load_config(None, SMALL + args + [f"run_dir={tmp_path / 'whole'}"])
    T.run(whole)

    cut = C.load_config(None, SMALL + args + [f"run_dir={tmp_path / 'cut'}"])
    real, seen = T.train_step, []

    def dies_at_step_13(*a, **kw):   # phase 2, epoch 3, step 3: after the save at its step 2
        seen.append(1)
        if len(seen) == 13:
            raise Interrupt
        return real(*a, **kw)
    monkeypatch.setattr(T, "train_step", dies_at_step_13)
    with pytest.raises(Interrupt):
        T.run(cut)
    monkeypatch.setattr(T, "train_step", real)
    assert record(tmp_path / "cut" / "last.pt")["training"]["state"]["global_step"] == 12
    T.run(C.load_config(tmp_path / "cut" / "config.yaml", ["resume=true"]))

    for name in ("last.pt", "best.pt"):
        a, b = record(tmp_path / "whole" / name), record(tmp_path / "cut" / name)
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for k in a["state_dict"]:
            assert torch.equal(a["state_dict"][k], b["state_dict"][k]), (name, k)
    ra = record(tmp_path / "whole" / "last.pt")["training"]["ema"]
    rb = record(tmp_path / "cut" / "last.pt")["training"]["ema"]
    assert ra["updates"] == rb["updates"] == 20
    for k in ra["raw"]:
        assert torch.equal(ra["raw"][k], rb["raw"][k]), k
    # The checkpoint's model is the average, not the raw weights.
    sd = record(tmp_path / "whole" / "last.pt")["state_dict"]
    assert any(not torch.equal(sd[k], ra["raw"][k]) for k in ra["raw"])


# -- held-out sources and the test report ----------------------------------------------------------
def test_held_out_sources_and_the_test_report_match_the_predict_command(tmp_path):
    ani1, r06 = SHARED / "ani1_gdb_s01.h5", SHARED / "ani1x_06r_gdb11_s01.h5"
    if not (ani1.exists() and r06.exists()):
        pytest.skip("shared data not found")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "aimnet_fast.train", str(REPO / "aimnet_fast" / "configs" / "base.yaml"),
           f"run_dir={run}", "device=cpu", "num_threads=2",
           "plot=false", "tensorboard=false", "progress=lines", "log_every=1000",
           f"data.sources=[{{path: {ani1}, layout: ani1}}]",
           f"data.val_sources=[{{path: {r06}, layout: 06r, properties: {{energy: {{key: energies}}}}}}]",
           f"data.test_sources=[{{path: {r06}, layout: 06r}}]",
           "data.mols_per_batch=32", "data.val_mols_per_batch=512", "max_time=15s",
           "curriculum.0.epochs=1000", "curriculum.0.time_fraction=0.6",
           "curriculum.1.epochs=1000", "curriculum.1.time_fraction=0.4"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "10800 train / 4366 validation conformers" in p.stdout
    report = json.loads((run / "test_metrics.json").read_text())
    test = report["test"]
    assert test["all"]["energy"]["p1"]["n"] == 4366 and test["all"]["forces"]

    # Independently: the predict command on the test conformers written as XYZ, against the labels.
    xyz, energies = tmp_path / "test.xyz", []
    with h5py.File(r06) as f, open(xyz, "w") as out:
        for grp in f.values():
            for mol in grp.values():
                species = [s.decode() for s in mol["species"][:]]
                for coord, e in zip(mol["coordinates"][:], mol["energies"][:]):
                    out.write(f"{len(species)}\n\n" + "".join(
                        f"{s} {x:.8f} {y:.8f} {z:.8f}\n" for s, (x, y, z) in zip(species, coord)))
                    energies.append(float(e))
    p = subprocess.run([sys.executable, "-m", "aimnet_fast.predict", str(run / "best.pt"), str(xyz),
                        "--out", str(tmp_path / "o.npz"), "--device", "cpu"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    pred = np.load(tmp_path / "o.npz")["energy_Ha"]
    err = (pred - np.asarray(energies)) * HARTREE_TO_KCALMOL
    rmse = math.sqrt(float(np.mean(err ** 2)))
    tag = f"p{report['n_pass']}"
    assert test["all"]["energy"][tag]["rmse"] == pytest.approx(rmse, rel=0.05)
    assert test["all"]["energy"][tag]["mae"] == pytest.approx(float(np.mean(np.abs(err))), rel=0.05)


def test_counted_step_is_the_same_step_with_its_flops():
    """With ``count_flop`` (the MFU on CUDA) the step builds the neighbor lists itself: the same
    loss and update as without, and the FLOPs of ``flops.count_batch`` for the batch."""
    from aimnet_fast import flops, ops
    from aimnet_fast.model import AIMNet
    from tests.test_train_common import make_batch, sample_conformers
    batch = make_batch(sample_conformers()[:4])
    results, models = [], []
    for counted in (False, True):
        torch.manual_seed(3)
        m = AIMNet().double()
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        fn = (lambda nb, n, m=m: flops.count_batch(m, nb, n, 1).train_flop) if counted else None
        results.append(S.train_step(m, opt, batch, C.LossConfig(), ["energy", "charges"], 1, Dist(),
                                    count_flop=fn))
        models.append(m)
    assert results[0].loss == results[1].loss and results[0].flop == 0
    nb = ops.build_neighbors(batch.coord, batch.mol_idx, "torch")
    assert results[1].flop == flops.count_batch(models[1], nb, batch.n_atoms, 1).train_flop > 0
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
