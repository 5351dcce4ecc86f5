"""The run's progress display and learning curve (``aimnet_fast.train.runlog``): plain lines at the
right steps with the right numbers, a tqdm bar on a terminal that messages do not break, the choice
between them, and the learning-curve picture of a T=1 → T=3 run (also from metrics.csv after a
resume, where cells are strings and the passes a T=1 phase lacks are empty)."""
from __future__ import annotations

import io
import math
import re

import pytest

from aimnet_fast.errors import ConfigError
from aimnet_fast.train import runlog as R
from aimnet_fast.train.runlog import RunLog
from aimnet_fast.units import REPORT_UNITS


class TTY(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self):
        return True


@pytest.fixture
def no_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)


@pytest.fixture
def fake_clock(monkeypatch):
    """The run log's clock, advanced by hand: ``fake_clock[0] = seconds``."""
    now = [0.0]
    monkeypatch.setattr(R, "clock", lambda: now[0])
    return now


STEP = dict(phase=1, n_pass=3, epoch=2, epochs=10, loss=0.125, lr=1e-3, mols_per_s=123.4)


def test_lines_at_every_log_every_and_the_last_step(tmp_path, fake_clock):
    out = io.StringIO()
    log = RunLog(tmp_path, True, out, plot=False, tensorboard=False, progress="lines", log_every=4)
    log.epoch_begin(phase=1, n_pass=3, epoch=2, epochs=10, n_steps=10)
    for s in range(1, 11):
        fake_clock[0] = 2.0 * s          # 2 s per step
        log.step(**STEP, step=s, n_steps=10, atoms_per_s=1172.0, global_step=100 + s, mfu=0.123,
                 run_left_s=130.0)
    log.epoch_end()
    lines = out.getvalue().splitlines()
    assert lines == [
        "phase 2 T=3 epoch 3/10 step 4/10 loss 0.125 lr 0.001 123.4 mol/s 1172 atoms/s MFU 12.3% "
        "epoch left 0:00:12 run left 0:02:10",
        "phase 2 T=3 epoch 3/10 step 8/10 loss 0.125 lr 0.001 123.4 mol/s 1172 atoms/s MFU 12.3% "
        "epoch left 0:00:04 run left 0:02:10",
        "phase 2 T=3 epoch 3/10 step 10/10 loss 0.125 lr 0.001 123.4 mol/s 1172 atoms/s MFU 12.3% "
        "epoch left 0:00:00 run left 0:02:10"]


def test_lines_after_a_resume_time_only_the_steps_taken(tmp_path, fake_clock):
    out = io.StringIO()
    log = RunLog(tmp_path, True, out, plot=False, tensorboard=False, progress="lines", log_every=5)
    log.epoch_begin(phase=1, n_pass=3, epoch=2, epochs=10, n_steps=100, start_step=40)
    fake_clock[0] = 30.0                  # 10 steps in 30 s: 3 s per step, 50 left
    log.step(**STEP, step=50, n_steps=100, global_step=1)
    assert out.getvalue().strip().endswith("123.4 mol/s epoch left 0:02:30")


def test_old_call_without_epoch_begin_atoms_or_mfu(tmp_path, fake_clock):
    """The trainer's call before the switch: every log_every steps, no epoch_begin, no atoms/s,
    MFU or run time; the first line cannot know the epoch's time left, the next can."""
    out = io.StringIO()
    log = RunLog(tmp_path, True, out, plot=False, tensorboard=False, progress="lines", log_every=5)
    fake_clock[0] = 10.0
    log.step(phase=0, n_pass=1, epoch=0, epochs=2, step=5, n_steps=12, loss=1.5, lr=2e-3,
             mols_per_s=50.0, global_step=5)
    fake_clock[0] = 20.0
    log.step(phase=0, n_pass=1, epoch=0, epochs=2, step=10, n_steps=12, loss=1.25, lr=2e-3,
             mols_per_s=60.0, global_step=10)
    assert out.getvalue().splitlines() == [
        "phase 1 T=1 epoch 1/2 step 5/12 loss 1.5 lr 0.002 50.0 mol/s",
        "phase 1 T=1 epoch 1/2 step 10/12 loss 1.25 lr 0.002 60.0 mol/s epoch left 0:00:04"]
    # The epoch summary ends the epoch: the next epoch's clock starts afresh.
    log.epoch_end()
    log.close()


def test_other_ranks_print_nothing(tmp_path):
    for progress in ("lines", "bar"):
        out = TTY()
        log = RunLog(tmp_path, False, out, plot=False, tensorboard=False, progress=progress, log_every=1)
        log.epoch_begin(phase=0, n_pass=1, epoch=0, epochs=1, n_steps=2)
        for s in (1, 2):
            log.step(**STEP, step=s, n_steps=2, global_step=s)
        log.info("x")
        log.epoch_end()
        log.close()
        assert out.getvalue() == ""


def test_bar_on_a_terminal(tmp_path, no_torchrun):
    pytest.importorskip("tqdm")
    from tqdm import tqdm
    out = TTY()
    log = RunLog(tmp_path, True, out, plot=False, tensorboard=False, log_every=5)
    assert log.progress == "bar"
    log.epoch_begin(phase=0, n_pass=1, epoch=0, epochs=2, n_steps=20, start_step=5)  # resumed at 5
    for s in range(6, 21):
        log.step(phase=0, n_pass=1, epoch=0, epochs=2, step=s, n_steps=20, loss=0.5, lr=1e-3,
                 mols_per_s=10.0, atoms_per_s=150.0, global_step=s, mfu=0.123, run_left_s=3725)
        if s == 10:
            log.info("a message during the bar")
    bar = log._bar
    assert bar is not None and bar.n == 20
    log.epoch_end()
    assert log._bar is None and bar not in getattr(tqdm, "_instances", ())
    log.info("epoch summary")
    log.close()
    text = out.getvalue()
    assert "phase 1 T=1 epoch 1/2" in text and "20/20" in text
    assert "loss 0.5, lr 0.001, 10.0 mol/s 150 atoms/s, MFU 12.3%, run left 1:02:05" in text
    # tqdm estimates the epoch's time left itself: [elapsed<remaining, rate]
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", text)
    # Messages stand on lines of their own, not inside the bar's line.
    assert "\ra message during the bar\n" in text
    assert text.endswith("]\nepoch summary\n")


def test_bar_opens_without_epoch_begin_and_closes_on_close(tmp_path, no_torchrun):
    pytest.importorskip("tqdm")
    out = TTY()
    log = RunLog(tmp_path, True, out, plot=False, tensorboard=False, progress="bar", log_every=5)
    for s in (5, 10):   # the old call: every log_every steps only
        log.step(**STEP, step=s, n_steps=10, global_step=s)
    assert log._bar.n == 10
    log.step(**dict(STEP, epoch=3), step=5, n_steps=10, global_step=15)  # next epoch: a new bar
    assert log._bar.n == 5
    log.close()
    assert log._bar is None
    assert out.getvalue().count("phase 2 T=3 epoch 4/10") >= 1


def test_auto_picks_lines_under_torchrun_and_off_a_terminal(monkeypatch, no_torchrun):
    pytest.importorskip("tqdm")
    assert R.choose_progress("auto", TTY()) == "bar"
    assert R.choose_progress("auto", io.StringIO()) == "lines"
    assert R.choose_progress("auto", object()) == "lines"        # a stream without isatty
    assert R.choose_progress("bar", io.StringIO()) == "bar"
    assert R.choose_progress("lines", TTY()) == "lines"
    for var in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.setenv(var, "0")
        assert R.choose_progress("auto", TTY()) == "lines"
        monkeypatch.delenv(var)
    with pytest.raises(ConfigError, match="progress"):
        R.choose_progress("fancy", TTY())


def test_auto_without_tqdm(monkeypatch, no_torchrun):
    import builtins
    real = builtins.__import__

    def no_tqdm(name, *a, **k):
        if name == "tqdm" or name.startswith("tqdm."):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    assert R.choose_progress("auto", TTY()) == "lines"
    with pytest.raises(ConfigError, match="tqdm"):
        R.choose_progress("bar", TTY())


def test_hms():
    assert R.hms(0) == "0:00:00"
    assert R.hms(130.4) == "0:02:10"
    assert R.hms(3725) == "1:02:05"
    assert R.hms(float("nan")) == "?"


# -- the learning curve ----------------------------------------------------------------------------
TARGETS = ["energy", "forces", "charges"]


def _fill(log: RunLog, tmp_path):
    """Three T=1 epochs, then two T=3 epochs, through ``RunLog.epoch`` as the trainer does."""
    cols = RunLog.columns(TARGETS, 3)
    epoch = 0
    for phase, (n_pass, epochs) in enumerate([(1, 3), (3, 2)]):
        for e in range(epochs):
            epoch += 1
            val = {"loss": 1.0 / epoch}
            for t in TARGETS:
                tags = ["last"] if t == "forces" else [f"p{p + 1}" for p in range(n_pass)]
                for tag in tags:
                    val[f"{t}_mae_{tag}"] = 2.0 / epoch
                    val[f"{t}_rmse_{tag}"] = 3.0 / epoch
            row = {"time_s": f"{epoch:.1f}", "phase": phase + 1, "n_pass": n_pass, "epoch": epoch,
                   "lr": 1e-3 / (phase + 1), "train_loss": 1.1 / epoch, "val_loss": 1.0 / epoch,
                   "bad_steps": 0}
            log.epoch(row, val, TARGETS, n_pass=n_pass, phase_epoch=e + 1, epochs=epochs,
                      improved=True, elapsed_s=1.0, columns=cols)


def _check_figure(fig):
    panels = [a for a in fig.axes if a.get_title(loc="left")]
    assert [a.get_title(loc="left") for a in panels] == [
        "validation energy", "validation forces", "validation charges", "loss and learning rate"]
    for a, t in zip(panels, TARGETS):
        assert a.get_ylabel() == f"MAE ({REPORT_UNITS[t][0]})"
        assert a.get_yscale() == "log"
        assert [x.get_text() for x in a.get_legend().get_texts()] == (
            ["last pass"] if t == "forces" else ["pass 1", "pass 2", "pass 3"])
    # The phase switch (between epochs 3 and 4) on every panel; phases labelled with their T.
    for a in panels:
        assert [ln.get_xdata()[0] for ln in a.get_lines() if ln.get_linestyle() == ":"] == [3.5]
    assert [t.get_text() for t in panels[0].texts] == ["phase 1: T=1", "phase 2: T=3"]
    # Pass 3 of energy: nothing in the T=1 epochs, values in the T=3 ones.
    p3 = [ln for ln in panels[0].get_lines() if ln.get_color() == "C2"]
    ys = [y for ln in p3 for y in ln.get_ydata()]
    assert sum(math.isfinite(y) for y in ys) == 2


def test_learning_curve_png_for_t1_and_t3_phases(tmp_path):
    pytest.importorskip("matplotlib")
    log = RunLog(tmp_path, True, io.StringIO(), plot=True, tensorboard=False, progress="lines")
    _fill(log, tmp_path)
    png = tmp_path / "learning_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(tmp_path.glob(".*.tmp"))
    _check_figure(R.learning_curve_figure(log.rows))
    # After a resume the rows come from metrics.csv: strings, empty cells for the missing passes.
    log2 = RunLog(tmp_path, True, io.StringIO(), plot=True, tensorboard=False, progress="lines")
    cols = RunLog.columns(TARGETS, 3)
    log2.restore_rows(None, 5, cols)
    assert log2.rows[0]["val_energy_mae_p3"] == "" and isinstance(log2.rows[0]["epoch"], str)
    _check_figure(R.learning_curve_figure(log2.rows))
    log2.restore_rows(None, 1, cols)
    fig = R.learning_curve_figure(log2.rows)   # one epoch of T=1: one pass per target
    assert [x.get_text() for x in fig.axes[0].get_legend().get_texts()] == ["pass 1"]
    log.close()


def test_no_plot_when_off(tmp_path):
    log = RunLog(tmp_path, True, io.StringIO(), plot=False, tensorboard=False, progress="lines")
    _fill(log, tmp_path)
    assert (tmp_path / "metrics.csv").exists() and not (tmp_path / "learning_curve.png").exists()
