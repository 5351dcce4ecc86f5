"""The loss against the formula evaluated independently in numpy, masks, the rank split, metrics."""
import numpy as np
import pytest
import torch

from aimnet_fast.batch import Batch
from aimnet_fast.train.config import LossConfig
from aimnet_fast.units import HARTREE_TO_KCALMOL
from aimnet_fast.train.loss import Metrics, active_targets, loss_fn


def make(sizes, labels, masks) -> Batch:
    n_atoms = torch.as_tensor(sizes)
    N = int(n_atoms.sum())
    return Batch(numbers=torch.ones(N, dtype=torch.long), coord=torch.zeros(N, 3),
                 mol_idx=torch.repeat_interleave(torch.arange(len(n_atoms)), n_atoms),
                 offsets=torch.cat([torch.zeros(1, dtype=torch.long), n_atoms.cumsum(0)]),
                 labels=labels, masks=masks)


def synthetic(seed=0, T=3, sizes=(3, 5, 2, 7)):
    """Random predictions of T passes and labels with some missing (mask False, value 0)."""
    g = torch.Generator().manual_seed(seed)
    M, N = len(sizes), sum(sizes)
    n_atoms = torch.tensor(sizes)
    labels = {"energy": -40 * n_atoms.double() + 0.01 * torch.randn(M, generator=g, dtype=torch.float64),
              "charges": 0.3 * torch.randn(N, generator=g),
              "volumes": 20 + 5 * torch.randn(N, generator=g)}
    masks = {"energy": torch.tensor([True, False, True, True])[:M],
             "charges": torch.rand(N, generator=g) > 0.3,
             "volumes": torch.ones(N, dtype=torch.bool)}
    for k in ("energy", "charges", "volumes"):
        labels[k] = torch.where(masks[k], labels[k], torch.zeros((), dtype=labels[k].dtype))
    batch = make(sizes, labels, masks)
    passes = {"energy": labels["energy"] + 0.005 * torch.randn(T, M, generator=g, dtype=torch.float64),
              "charges": 0.3 * torch.randn(T, N, generator=g),
              "volumes": 20 + 5 * torch.randn(T, N, generator=g)}
    out = {k: v[-1] for k, v in passes.items()}
    out["passes"] = passes
    return out, batch


def numpy_loss(out, batch, cfg: LossConfig, targets):
    units = {"energy": cfg.energy_unit_Ha, "charges": cfg.charges_unit_e, "volumes": cfg.volumes_unit_bohr3}
    total = 0.0
    for t in targets:
        pred = out["passes"][t].double().numpy()
        y = batch.labels[t].double().numpy()
        m = batch.masks[t].numpy()
        T = pred.shape[0]
        for p in range(T):
            r = (pred[p] - y)[m]
            if t == "energy":
                r = r / np.diff(batch.offsets.numpy())[m]
            total += (1.0 / T) * (1.0 / units[t] ** 2) * np.sum(r ** 2) / m.sum()
    return total


@pytest.mark.parametrize("targets", [["energy"], ["charges"], ["energy", "charges", "volumes"]])
def test_loss_matches_formula(targets):
    cfg = LossConfig()
    out, batch = synthetic()
    got = loss_fn(out, batch, cfg, targets)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(numpy_loss(out, batch, cfg, targets), rel=1e-6)


def test_unit_weights_make_one_unit_errors_equal():
    """An error of exactly one unit in one target gives loss 1 (T passes, all atoms)."""
    cfg = LossConfig()
    out, batch = synthetic()
    for t, unit in (("charges", cfg.charges_unit_e), ("volumes", cfg.volumes_unit_bohr3)):
        o = {"passes": {t: batch.labels[t].expand(3, -1) + unit}}
        assert float(loss_fn(o, batch, cfg, [t])) == pytest.approx(1.0, rel=1e-5)
    o = {"passes": {"energy": (batch.labels["energy"] + batch.mol_sizes.double() / HARTREE_TO_KCALMOL)[None]}}
    assert float(loss_fn(o, batch, cfg, ["energy"])) == pytest.approx(1.0, rel=1e-9)


def test_missing_labels_do_not_count():
    cfg = LossConfig()
    out, batch = synthetic()
    base = float(loss_fn(out, batch, cfg, ["energy", "charges"]))
    # Whatever the prediction for a missing label, the loss is the same.
    out["passes"]["energy"][:, 1] += 100.0
    out["passes"]["charges"][:, ~batch.masks["charges"]] = 1e6
    assert float(loss_fn(out, batch, cfg, ["energy", "charges"])) == pytest.approx(base, rel=1e-12)


def split(out, batch, atoms_cut, mols_cut):
    """The first mols_cut molecules (atoms_cut atoms) and the rest, as two ranks would hold them."""
    parts = []
    sizes = batch.mol_sizes
    halves = ((slice(0, mols_cut), slice(0, atoms_cut)), (slice(mols_cut, None), slice(atoms_cut, None)))
    for ms, as_ in halves:
        o = {"passes": {}}
        labels, masks = {}, {}
        for k in ("energy", "charges", "volumes"):
            s = ms if k == "energy" else as_
            labels[k], masks[k] = batch.labels[k][s], batch.masks[k][s]
            o["passes"][k] = out["passes"][k][:, s]
        b = make(sizes[ms], labels, masks)
        assert b.n_atoms == batch.coord[as_].shape[0]
        parts.append((o, b))
    return parts


def test_rank_split_gives_the_global_loss():
    """Each rank divides by the global label count and multiplies by the world size; DDP's
    average of the rank losses (and so of their gradients) is the loss of the whole batch."""
    cfg = LossConfig()
    targets = ["energy", "charges", "volumes"]
    out, batch = synthetic()
    whole = float(loss_fn(out, batch, cfg, targets))
    (o0, b0), (o1, b1) = split(out, batch, atoms_cut=8, mols_cut=2)
    from aimnet_fast.train.loss import counts, residuals
    n_global = counts(residuals(o0, b0, targets), targets) + counts(residuals(o1, b1, targets), targets)
    ranks = [float(loss_fn(o, b, cfg, targets, reduce_counts=lambda n: n_global, world_size=2))
             for o, b in ((o0, b0), (o1, b1))]
    assert sum(ranks) / 2 == pytest.approx(whole, rel=1e-12)


def test_metrics_user_units_and_loss():
    cfg = LossConfig()
    targets = ["energy", "charges", "volumes"]
    out, batch = synthetic()
    m = Metrics(targets, 3, cfg)
    for o, b in split(out, batch, atoms_cut=8, mols_cut=2):
        m.update(o, b)
    s = m.summary()
    assert s["loss"] == pytest.approx(float(loss_fn(out, batch, cfg, targets)), rel=1e-10)
    em = batch.masks["energy"]
    for p in range(3):
        err = (out["passes"]["energy"][p] - batch.labels["energy"])[em].numpy() * HARTREE_TO_KCALMOL
        assert s[f"energy_mae_p{p + 1}"] == pytest.approx(np.abs(err).mean(), rel=1e-9)
        assert s[f"energy_rmse_p{p + 1}"] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-9)
        cm = batch.masks["charges"]
        err = (out["passes"]["charges"][p] - batch.labels["charges"])[cm].double().numpy()
        assert s[f"charges_mae_p{p + 1}"] == pytest.approx(np.abs(err).mean(), rel=1e-6)


def test_forces_term():
    cfg = LossConfig(forces=True)
    g = torch.Generator().manual_seed(1)
    N = 6
    batch = make([N], {"forces": torch.randn(N, 3, generator=g)},
                 {"forces": torch.tensor([1, 1, 0, 1, 1, 1]).bool()})
    pred = torch.randn(N, 3, generator=g)
    got = float(loss_fn({"passes": {}}, batch, cfg, ["forces"], forces=pred))
    m = batch.masks["forces"]
    r = (pred - batch.labels["forces"])[m].numpy()
    assert got == pytest.approx(np.mean(r ** 2) / cfg.forces_unit_Ha_per_A ** 2, rel=1e-6)


def test_active_targets():
    cfg = LossConfig()
    assert active_targets(cfg, ["energy", "elmoments", "volume"], {"energy", "charges", "forces"}) == \
        ["energy", "charges"]
    assert active_targets(LossConfig(forces=True), ["energy"], {"energy", "forces", "charges"}) == \
        ["energy", "forces"]
