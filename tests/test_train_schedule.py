"""Reduce-on-plateau against a known sequence of validation losses (worked out by hand) and
against torch's ReduceLROnPlateau (whose ``patience`` counts one epoch more)."""
import pytest
import torch

from aimnet_fast.train.trainer import PlateauSchedule


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
