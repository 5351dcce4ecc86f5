"""Reduce-on-plateau against a known sequence of validation losses (worked out by hand), against
the paper's rule written out, and against torch's ReduceLROnPlateau (whose ``patience`` counts one
epoch more)."""
import math

import pytest
import torch

from aimnet_fast.train.schedule import PlateauSchedule


def opt(lr=1e-3):
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_known_sequence_patience_3():
    # epoch:     1     2    3    4    5    6    7    8    9    10   11   12
    losses = [10.0, 9.0, 9.5, 9.0, 9.2, 8.0, 8.5, 8.1, 8.0, 8.6, 8.7, 8.9]
    # bad runs: e3,e4,e5 → 3 bad → reduce after e5; e7,e8,e9 (8.0 is not < 8.0) → reduce after e9;
    # e10,e11,e12 → reduce after e12.
    expected_lr = [1e-3] * 4 + [0.9e-3] * 4 + [0.81e-3] * 3 + [0.729e-3]
    s = PlateauSchedule(opt(), factor=0.9, patience=3)
    got = []
    for loss in losses:
        s.step(loss)
        got.append(s.lr)
    assert got == pytest.approx(expected_lr, rel=1e-12)
    assert s.best == 8.0


def test_paper_setting_six_epochs_and_nan():
    s = PlateauSchedule(opt(), factor=0.9, patience=6)
    s.step(1.0)
    for n in range(5):
        s.step(float("nan") if n == 2 else 1.5)
        assert s.lr == 1e-3
    s.step(1.2)  # the 6th epoch without improvement
    assert s.lr == pytest.approx(0.9e-3)


@pytest.mark.parametrize("patience, threshold", [(6, 0.0), (2, 0.01), (1, 0.0)])
def test_same_as_torch_reduce_on_plateau(patience, threshold):
    g = torch.Generator().manual_seed(patience)
    losses = (1.0 / (1 + torch.arange(60)).sqrt() + 0.3 * torch.rand(60, generator=g)).tolist()
    ours = PlateauSchedule(opt(), factor=0.9, patience=patience, threshold=threshold)
    o = opt()
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="min", factor=0.9, patience=patience - 1,
                                                     threshold=threshold, threshold_mode="rel", eps=0.0)
    for loss in losses:
        ours.step(loss)
        ref.step(loss)
        assert ours.lr == pytest.approx(o.param_groups[0]["lr"], rel=1e-12)
    assert ours.lr < 1e-3


def test_floor_and_state_roundtrip():
    s = PlateauSchedule(opt(), factor=0.5, patience=1, min_lr=2e-4)
    s.step(1.0)
    s.step(2.0)
    s.step(2.0)
    assert s.lr == pytest.approx(2.5e-4) and not s.below_floor
    s.step(2.0)
    assert s.below_floor
    t = PlateauSchedule(opt(), factor=0.5, patience=1, min_lr=2e-4)
    t.load_state_dict(s.state_dict())
    assert (t.lr, t.best, t.bad_epochs) == (s.lr, s.best, s.bad_epochs)


def paper_rule(losses, factor, patience, threshold, lr=1e-3):
    """The rule as the paper states it (the trainer's own code before torch's scheduler)."""
    best, bad, out = math.inf, 0, []
    for loss in losses:
        reduced = False
        if loss < best * (1.0 - threshold):
            best, bad = loss, 0
        else:
            bad += 1
            if bad >= patience:
                lr, bad, reduced = lr * factor, 0, True
        out.append((lr, reduced, best, bad))
    return out


@pytest.mark.parametrize("seed, patience, threshold", [(0, 6, 0.0), (1, 3, 0.01), (2, 1, 0.0), (3, 2, 0.05)])
def test_long_random_sequence_with_nan_and_plateaus(seed, patience, threshold):
    g = torch.Generator().manual_seed(seed)
    n = 600
    losses = (2.0 / (1 + torch.arange(n)).sqrt() + 0.2 * torch.rand(n, generator=g)).tolist()
    for i in torch.randint(0, n, (40,), generator=g).tolist():
        losses[i] = float("nan")
    for i in torch.randint(1, n - 12, (20,), generator=g).tolist():    # plateaus: repeated values
        losses[i:i + 10] = [losses[i - 1]] * 10
    ours = PlateauSchedule(opt(), factor=0.9, patience=patience, threshold=threshold, min_lr=1e-9)
    o = opt()
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="min", factor=0.9, patience=patience - 1,
                                                     threshold=threshold, threshold_mode="rel",
                                                     cooldown=0, min_lr=0.0, eps=0.0)
    n_reduced = 0
    for loss, (lr, reduced, best, bad) in zip(losses, paper_rule(losses, 0.9, patience, threshold)):
        got = ours.step(loss)
        ref.step(loss)
        assert got == reduced
        assert ours.lr == pytest.approx(lr, rel=1e-12) and ours.lr == o.param_groups[0]["lr"]
        assert (ours.best, ours.bad_epochs) == (best, bad)
        n_reduced += got
    assert n_reduced >= 5


def test_floor_stops_instead_of_clamping():
    s = PlateauSchedule(opt(1e-3), factor=0.1, patience=1, min_lr=5e-4)
    s.step(1.0)
    assert s.step(2.0) and s.lr == pytest.approx(1e-4) and s.below_floor   # not clamped to 5e-4
    assert s.step(2.0) and s.lr == pytest.approx(1e-5)                     # and goes on falling
    with pytest.raises(ValueError, match="patience"):
        PlateauSchedule(opt(), patience=0)


def test_loads_the_state_of_old_checkpoints():
    old = {"best": 0.25, "bad_epochs": 2, "lr": 7e-4}   # what the trainer's checkpoints hold
    s = PlateauSchedule(opt(), factor=0.5, patience=3)
    s.load_state_dict(old)
    assert s.state_dict() == old
    assert s.step(0.3)                               # the third bad epoch in a row: reduce
    assert s.lr == pytest.approx(3.5e-4) and (s.best, s.bad_epochs) == (0.25, 0)
    assert not s.step(0.2) and s.best == 0.2
