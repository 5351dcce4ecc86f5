"""Whole runs on small data: the run folder, the T=1 → T=3 switch, fine-tuning a released model
with a frozen backbone, NaN steps stopping a run, two gloo ranks under torchrun, and a resume with
another world size."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import functools

import numpy as np
import pytest
import torch

from aimnet_fast import data as D
from aimnet_fast.checkpoint import convert_released, load_model, save_model
from aimnet_fast.errors import TrainingError
from aimnet_fast.train import config as C
from aimnet_fast.train import step as S
from aimnet_fast.train import trainer as T
from aimnet_fast.train.batches import device_batches, load_data
from aimnet_fast.train.dist import Dist
from aimnet_fast.train.model_setup import zero_last_update_layer

REPO = Path(__file__).resolve().parents[1]
#: The TrainConfig defaults as a config file: the bare command line runs configs/default.yaml.
BASE = str(REPO / "aimnet_fast" / "configs" / "base.yaml")
SMALL = ["data.max_conformers=40", "data.mols_per_batch=4", "max_steps_per_epoch=5", "num_threads=1",
         "log_every=5", "tensorboard=false", "device=cpu"]


def cfg_for(tmp_path, *extra):
    return C.load_config(None, SMALL + [f"run_dir={tmp_path / 'run'}", *extra])


def predict(model, batch, n_pass):
    with torch.no_grad():
        return model(batch.numbers, batch.coord.to(model.afv_table.dtype), batch.mol_idx, batch.n_mol,
                     n_pass=n_pass)


def test_the_bare_command_runs_the_default_yaml():
    from aimnet_fast.train.trainer import parse_args
    assert parse_args([]) == C.load_config(C.DEFAULT_RUN) != C.TrainConfig()
    assert parse_args(["optim.lr=2e-3"]).optim.lr == 2e-3
    assert parse_args(["optim.lr=2e-3"]).loss.forces is True
    for p in (REPO / "aimnet_fast" / "configs").glob("*.yaml"):
        C.load_config(p)  # every example parses


def test_run_folder_and_falling_validation_loss(tmp_path, capsys):
    cfg = cfg_for(tmp_path, "curriculum.0.epochs=3", "curriculum.1.epochs=1", "plot=true")
    T.run(cfg)
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert C.load_config(run / "config.yaml") == cfg
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["n_pass"]) for r in rows] == [1, 1, 1, 3]
    assert float(rows[2]["val_loss"]) < float(rows[0]["val_loss"])
    assert rows[3]["val_energy_mae_p3"] and not rows[0]["val_energy_mae_p3"]
    assert "val energy MAE/RMSE (kcal/mol) p1" in out and "mol/s" in out and "AMSGrad (fused" in out
    # Checkpoints load as models and carry the fitted SAE (in float64).
    ds, train_idx, _ = load_data(cfg, Dist(), print)
    sae = D.fit_sae(ds, indices=train_idx)
    # best.pt: the epoch whose prediction (last pass) had the lowest validation loss, of any phase.
    best = min(rows, key=lambda r: float(r["val_loss_last"]))
    for name, n_pass in (("last.pt", 3), ("best.pt", int(best["n_pass"])),
                         ("best_phase1.pt", 1), ("best_phase2.pt", 3)):
        m = load_model(run / name)
        assert m.n_pass == n_pass, name
        np.testing.assert_allclose(m.sae_Ha.numpy(), sae, rtol=0, atol=1e-12)
    assert json.loads((run / "test_metrics.json").read_text())["best_epoch"] == int(best["epoch"])
    try:
        import matplotlib  # noqa: F401  (the optional `plot` extra)
    except ImportError:
        assert not (run / "learning_curve.png").exists()
    else:
        assert (run / "learning_curve.png").stat().st_size > 1000


def test_phase_switch_keeps_predictions(tmp_path):
    """After T=1 training the switch (last update_mlp layer zeroed, T=3) changes no prediction."""
    cfg = cfg_for(tmp_path, "curriculum.0.epochs=1", "curriculum.1.epochs=0", "plot=false")
    trainer = T.Trainer(cfg)
    trainer.fit()  # phase 1 trains one epoch; phase 2 starts (the switch) and trains 0 epochs
    before = load_model(tmp_path / "run" / "last.pt")  # written at the end of phase 1
    assert before.n_pass == 1
    after = trainer.model
    assert after.n_pass == 3 and not after.update_mlp[-1].weight.any()
    batch = D.collate(trainer.ds, trainer.val_idx[:6])
    p1, p3 = predict(before, batch, 1), predict(after, batch, 3)
    for key in ("energy", "charges", "volumes"):
        for t in range(3):
            torch.testing.assert_close(p3["passes"][key][t], p1[key], rtol=1e-6, atol=1e-6)


def test_zero_update_exact_in_float64():
    from aimnet_fast.model import AIMNet
    from test_train_common import make_batch, sample_conformers
    torch.manual_seed(0)
    m = AIMNet(backend="torch").double()
    batch = make_batch(sample_conformers()[:4])
    p1 = predict(m, batch, 1)
    zero_last_update_layer(m)
    p3 = predict(m, batch, 3)
    for key in ("energy", "charges", "volumes"):
        torch.testing.assert_close(p3["passes"][key], p1[key].expand_as(p3["passes"][key]),
                                   rtol=1e-12, atol=1e-12)


def test_finetune_new_energy_head_on_frozen_released_backbone(tmp_path, shared):
    pre = shared / "aimnet_pretrained"
    released = convert_released(pre / "aimnet_cv0.pt", pre / "aimnet_mt_cv0.pt")
    ck = tmp_path / "released.pt"
    save_model(released, ck)
    cfg = cfg_for(tmp_path, f"model.init_from={ck}", "model.trainable=['heads.energy.*']",
                  "model.reinit=['heads.energy.*']", "curriculum=[{n_pass: 3, epochs: 1}]", "plot=false")
    trainer = T.Trainer(cfg)
    trainer.fit()
    tuned = trainer.model
    ref = released.state_dict()
    changed = []
    for k, v in tuned.state_dict().items():
        if k == "sae_Ha":
            continue
        if k.startswith("heads.energy."):
            changed.append(not torch.equal(v, ref[k]))
        else:
            assert torch.equal(v, ref[k]), f"{k} should be frozen"
    assert all(changed)
    assert not any(p.requires_grad for n, p in tuned.named_parameters() if not n.startswith("heads.energy."))


def test_repeated_nan_steps_stop_the_run_and_keep_the_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = S.loss_fn

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(S, "loss_fn", flaky)
    # The loader reads one batch ahead (as on CUDA): the checkpoint still holds the steps taken.
    monkeypatch.setattr(T, "device_batches", functools.partial(device_batches, prefetch=True))
    cfg = cfg_for(tmp_path, "checkpoint_every=1", "max_bad_steps=2", "curriculum.0.epochs=1",
                  "plot=false")
    trainer = T.Trainer(cfg)
    with pytest.raises(TrainingError, match="2 consecutive steps had a NaN/inf loss"):
        trainer.fit()
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ck["training"]["state"]["step"] == 3
    assert ck["training"]["state"]["sampler"]["position"] == 3
    assert ck["training"]["state"]["sampler"]["epoch"] == 0
    for k, v in trainer.model.state_dict().items():
        assert torch.isfinite(v.double()).all()
        assert torch.equal(ck["state_dict"][k], v), k  # the skipped steps did not touch the weights
    assert "non-finite loss or gradient" in capsys.readouterr().out
    # The command line says so and exits with 1.
    calls["n"] = 0
    code = T.main([BASE] + SMALL + [f"run_dir={tmp_path / 'cli'}", "max_bad_steps=2", "plot=false"])
    assert code == 1 and "max_bad_steps=2" in capsys.readouterr().err


def test_torchrun_two_gloo_ranks(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "aimnet_fast.train", BASE, *SMALL, "curriculum.0.epochs=1", "curriculum.1.epochs=1",
           f"run_dir={tmp_path / 'run'}", "plot=false"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 process(es), backend gloo" in p.stdout
    assert "batch 4 molecules per rank × 2 = 8" in p.stdout
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert len(rows) == 2 and all(np.isfinite(float(r["val_loss"])) for r in rows)
    load_model(tmp_path / "run" / "last.pt")


def test_forces_term_trains(tmp_path):
    """loss.forces=true: −dE/dR of the last pass enters the loss (double backward) and the
    validation reports force errors; the default data has GFN2 forces."""
    cfg = cfg_for(tmp_path, "loss.forces=true", "max_steps_per_epoch=3",
                  "curriculum=[{n_pass: 1, epochs: 2}]", "plot=false")
    trainer = T.Trainer(cfg)
    assert trainer.targets == ["energy", "charges", "forces"]
    row = trainer.fit()
    assert float(row["val_forces_mae_last"]) > 0 and np.isfinite(float(row["val_loss"]))
    assert trainer.state.bad_steps == 0


def test_prefetched_batches_are_the_same(tmp_path):
    """The background-thread batch assembly (used on CUDA) yields exactly the plain batches."""
    trainer = T.Trainer(cfg_for(tmp_path, "plot=false"))
    trainer.train_sampler.set_epoch(0)
    args = (trainer.ds, iter(trainer.train_sampler), 4, trainer.dist.device, trainer.dtype)
    plain = list(device_batches(*args, prefetch=False))
    trainer.train_sampler.set_epoch(0)
    args = (trainer.ds, iter(trainer.train_sampler), 4, trainer.dist.device, trainer.dtype)
    ahead = list(device_batches(*args, prefetch=True))
    assert len(plain) == len(ahead) == 4
    for a, b in zip(plain, ahead):
        ta, tb = dict(a.tensors()), dict(b.tensors())
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        assert ta.keys() >= {"labels.energy", "masks.energy", "conf_idx"}
