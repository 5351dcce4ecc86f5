"""One training step: forward (and −dE/dR where forces are fitted), loss, backward, and the
optimizer step unless some rank saw a non-finite loss or gradient (that decision is all-reduced)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .. import ops
from ..batch import Batch
from ..padded import NeighborCounts, Padding, build_neighbors_padded
from . import config as C
from .dist import Dist
from .loss import loss_fn, predicted_forces


@dataclass
class StepResult:
    loss: float          # loss of the global batch
    ok: bool             # False: non-finite loss or gradient on some rank, the step was skipped
    n_mol: int           # molecules in the global batch
    n_atoms: int = 0     # atoms in the global batch
    stop: bool = False   # some rank asked the run to stop after this step (``stop_vote``)
    flop: float = 0.0    # this rank's counted FLOPs (with ``count_flop``)
    overflow: bool = False   # some rank's padded lists overflowed: nothing was applied, redo
    counts: Optional[NeighborCounts] = None   # this rank's list lengths (with ``padding``)


def forward(model: nn.Module, batch: Batch, n_pass: int, need_forces: bool,
            create_graph: bool = True, neighbors=None):
    """Model outputs for a batch, and −dE/dR (N, 3) Hartree/Å if ``need_forces``."""
    coord = batch.coord
    if need_forces:
        coord = coord.detach().requires_grad_(True)
    out = model(batch.numbers, coord, batch.mol_idx, batch.n_mol, n_pass=n_pass, neighbors=neighbors)
    forces = predicted_forces(out, coord, create_graph=create_graph) if need_forces else None
    return out, forces


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
               loss_cfg: C.LossConfig, targets: list[str], n_pass: int, dist: Dist,
               grad_clip: float = 0.0, lr_scale: float = 1.0, stop_vote: bool = False,
               count_flop: Optional[Callable] = None,
               padding: Optional[Padding] = None) -> StepResult:
    """Forward, loss, backward (DDP averages the gradients), and an optimizer step unless the loss
    or a gradient is NaN/inf on any rank: that decision is all-reduced, so every rank skips alike
    and non-finite numbers never reach the weights. ``lr_scale`` multiplies the lr of this step
    only (the warm-up). ``stop_vote`` rides on the same all-reduce: ``StepResult.stop`` is true on
    every rank if any rank voted (a time budget ends all ranks at the same step). With
    ``count_flop(neighbors, n_atoms) -> float`` the neighbor lists are built here, once, so that
    the step's work can be counted (``StepResult.flop``).

    With ``padding`` (a batch from ``pad_batch``), the lists come from ``build_neighbors_padded``
    and nothing between ``zero_grad`` and the all-reduce reads a device value: the one host read
    is the flags after the backward, where the lists' overflow flag rides too. If any rank's lists
    overflowed, nothing is applied (``StepResult.overflow``): grow the capacities from
    ``StepResult.counts`` and redo the step on the same molecules."""
    optimizer.zero_grad(set_to_none=True)
    nb, flop, counts = None, 0.0, None
    if padding is not None:
        nb, counts = build_neighbors_padded(batch.coord, batch.mol_idx, batch.offsets,
                                            padding.cap, padding.ghosts)
    elif count_flop is not None:
        nb = ops.build_neighbors(batch.coord, batch.mol_idx, getattr(model, "module", model).backend)
        flop = float(count_flop(nb, batch.n_atoms))
    out, forces = forward(model, batch, n_pass, "forces" in targets, neighbors=nb)
    loss = loss_fn(out, batch, loss_cfg, targets, forces,
                   reduce_counts=dist.all_reduce_sum if dist.active else None,
                   world_size=dist.world_size)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = torch.isfinite(loss.detach())
    if grads:
        finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
    n_mol, n_atoms = (batch.n_mol, batch.n_atoms) if padding is None else \
        (padding.n_mol, padding.n_atoms)      # the real ones, not the ghosts
    host = torch.tensor([float(n_mol), float(n_atoms), float(stop_vote)],
                        dtype=torch.float64, device=loss.device)
    overflow = counts.overflow.to(torch.float64) if counts is not None else \
        torch.zeros((), dtype=torch.float64, device=loss.device)
    flags = torch.cat([torch.stack([loss.detach() / dist.world_size, (~finite).to(torch.float64),
                                    overflow]), host])
    flags = dist.all_reduce_sum(flags).tolist()
    res = StepResult(flags[0], flags[1] == 0 and flags[2] == 0, int(flags[3]), int(flags[4]),
                     flags[5] > 0, flop, overflow=flags[2] > 0, counts=counts)
    if not res.ok:
        optimizer.zero_grad(set_to_none=True)
        return res
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    if lr_scale != 1.0:
        lrs = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * lr_scale
        optimizer.step()
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
    else:
        optimizer.step()
    return res
