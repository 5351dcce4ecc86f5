"""The AIMNet training loss and the validation metrics.

Loss (the paper's, with masks for missing labels):

    L = Σ_p w_p · Σ_t w_t · (1/N_p) Σ_i (y_tpi − ŷ_pi)²

- t = pass (the model's ``passes`` outputs, leading dim T), w_t = 1/T;
- p = target: ``energy`` (molecular energy divided by the atom count, Hartree per atom),
  ``charges`` (e), ``volumes`` (bohr³), optionally ``forces`` (Hartree/Å, −dE/dR of the last pass
  only: one double backward, not T);
- w_p = 1/unit_p², with units 1 kcal/mol per atom, 0.0063 e, 4.386 bohr³ (0.65 Å³) by default,
  so that an error of one unit in any target weighs the same;
- N_p = number of present labels of target p (``<name>_mask``; absent labels do not count), summed
  over all ranks when ``reduce_counts`` is given: then every rank divides by the global count and
  the gradient averaged by DDP equals the gradient of one process on the global batch.

Batches are ``aimnet_fast.batch.Batch`` as ``aimnet_fast.data.collate`` returns them: ``coord``
(N, 3) Å, ``offsets`` (M+1,), ``labels[name]`` and ``masks[name]`` per label (no mask: all present).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..batch import Batch
from ..units import REPORT_UNITS
from .config import LossConfig

#: Target → model head that predicts it.
TARGET_HEAD = {"energy": "energy", "charges": "elmoments", "volumes": "volume"}


def target_weights(cfg: LossConfig) -> dict[str, float]:
    """w_p = 1/unit_p² in the internal units (Hartree per atom, e, bohr³, Hartree/Å)."""
    return {"energy": cfg.energy_unit_Ha ** -2, "charges": cfg.charges_unit_e ** -2,
            "volumes": cfg.volumes_unit_bohr3 ** -2, "forces": cfg.forces_unit_Ha_per_A ** -2}


def active_targets(cfg: LossConfig, heads, labels) -> list[str]:
    """Targets of the config that the model predicts and the data holds, in a fixed order."""
    out = [t for t in ("energy", "charges", "volumes")
           if t in cfg.targets and TARGET_HEAD[t] in heads and t in labels]
    if cfg.forces and "energy" in heads and "forces" in labels:
        out.append("forces")
    return out


def predicted_forces(out: dict, coord: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """−dE/dR of the last pass, (N, 3) Hartree/Å (``coord`` must require grad)."""
    (grad,) = torch.autograd.grad(out["energy"].sum(), coord, create_graph=create_graph)
    return -grad


def _present(batch: Batch, name: str, n: int, device) -> torch.Tensor:
    mask = batch.masks.get(name)
    return torch.ones(n, dtype=torch.bool, device=device) if mask is None else mask


def residuals(out: dict, batch: Batch, targets: list[str],
              forces: Optional[torch.Tensor] = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per target: (prediction − label) of every pass, (T, n), in internal units (energy per
    molecule in Hartree), and the label mask (n,) bool. Forces: (1, 3N) and a (3N,) mask."""
    res = {}
    passes = out["passes"]
    for t in targets:
        if t == "forces":
            if forces is None:
                raise ValueError("the forces target needs predicted forces")
            mask = _present(batch, "forces", forces.shape[0], forces.device)
            r = (forces - batch.labels["forces"].to(forces.dtype)).reshape(1, -1)
            res[t] = (r, mask.repeat_interleave(3))
            continue
        pred = passes[t]
        label = batch.labels[t].to(pred.dtype)
        mask = _present(batch, t, label.shape[0], label.device)
        res[t] = (pred - label, mask)
    return res


def counts(res: dict, targets: list[str]) -> torch.Tensor:
    """Number of present labels per target (len(targets),) float64."""
    dev = next(iter(res.values()))[1].device if res else "cpu"
    return torch.stack([res[t][1].sum() for t in targets]).to(torch.float64) if targets else \
        torch.zeros(0, dtype=torch.float64, device=dev)


def loss_fn(out: dict, batch: Batch, cfg: LossConfig, targets: list[str],
            forces: Optional[torch.Tensor] = None,
            reduce_counts: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
            world_size: int = 1) -> torch.Tensor:
    """The loss of this rank's part of the batch, scaled so that DDP's gradient average gives
    the gradient of the global-batch loss (module docstring). Returns a float64 scalar; with
    ``world_size`` = 1 and no ``reduce_counts`` it is the loss L of this batch."""
    w = target_weights(cfg)
    res = residuals(out, batch, targets, forces)
    n = counts(res, targets)
    if reduce_counts is not None:
        n = reduce_counts(n)
    total = torch.zeros((), dtype=torch.float64, device=batch.coord.device)
    for k, t in enumerate(targets):
        r, mask = res[t]
        if t == "energy":
            r = r / batch.mol_sizes.to(r.dtype)
        sq = torch.where(mask, r, torch.zeros((), dtype=r.dtype, device=r.device)).to(torch.float64) ** 2
        per_pass = sq.sum(dim=1)                       # (T,)
        term = per_pass.mean()                         # w_t = 1/T
        total = total + w[t] * term / n[k].clamp(min=1.0)
    return total * world_size


class Metrics:
    """Sums of |error| and error² per target and pass, in user units, over one epoch, and the
    loss of all of it (the same formula as ``loss_fn`` with N_p = all labels seen).

    ``sums`` is a flat float64 tensor (all-reduce it over ranks before ``summary()``);
    ``summary()`` gives ``{f"{target}_mae_p{t}": ..., f"{target}_rmse_p{t}": ..., "loss": ...,
    "loss_last": ...}`` with t = 1..T (``_last`` for forces); ``loss_last`` is the loss of the
    last pass alone (the model's prediction), comparable between phases of different T.
    """

    def __init__(self, targets: list[str], n_pass: int, cfg: LossConfig, device="cpu"):
        self.targets = list(targets)
        self.weights = target_weights(cfg)
        self.passes = {t: (1 if t == "forces" else n_pass) for t in self.targets}
        size = sum(2 * self.passes[t] + 3 for t in self.targets)
        self.sums = torch.zeros(size, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, out: dict, batch: Batch, forces: Optional[torch.Tensor] = None) -> None:
        res = residuals(out, batch, self.targets, forces)
        pos = 0
        for t in self.targets:
            T = self.passes[t]
            r, mask = res[t]
            r = torch.where(mask, r, torch.zeros((), dtype=r.dtype, device=r.device)).to(torch.float64)
            u = r * REPORT_UNITS[t][1]
            self.sums[pos:pos + T] += u.abs().sum(dim=1)
            self.sums[pos + T:pos + 2 * T] += (u ** 2).sum(dim=1)
            self.sums[pos + 2 * T] += mask.sum()
            rl = r / batch.mol_sizes.to(r.dtype) if t == "energy" else r
            sq = (rl ** 2).sum(dim=1)
            self.sums[pos + 2 * T + 1] += sq.mean()
            self.sums[pos + 2 * T + 2] += sq[-1]
            pos += 2 * T + 3

    def summary(self) -> dict[str, float]:
        s = self.sums.cpu().tolist()
        out, pos, loss, loss_last = {}, 0, 0.0, 0.0
        for t in self.targets:
            T = self.passes[t]
            n = max(s[pos + 2 * T], 1.0)
            for p in range(T):
                tag = "last" if t == "forces" else f"p{p + 1}"
                out[f"{t}_mae_{tag}"] = s[pos + p] / n
                out[f"{t}_rmse_{tag}"] = (s[pos + T + p] / n) ** 0.5
            loss += self.weights[t] * s[pos + 2 * T + 1] / n
            loss_last += self.weights[t] * s[pos + 2 * T + 2] / n
            pos += 2 * T + 3
        out["loss"], out["loss_last"] = loss, loss_last
        return out
