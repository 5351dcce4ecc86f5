"""One training step: forward (and −dE/dR where forces are fitted), loss, backward, and the
optimizer step unless some rank saw a non-finite loss or gradient (that decision is all-reduced)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..batch import Batch
from . import config as C
from .dist import Dist
from .loss import loss_fn, predicted_forces


@dataclass
class StepResult:
    loss: float          # loss of the global batch
    ok: bool             # False: non-finite loss or gradient on some rank, the step was skipped
    n_mol: int           # molecules in the global batch


def forward(model: nn.Module, batch: Batch, n_pass: int, need_forces: bool,
            create_graph: bool = True):
    """Model outputs for a batch, and −dE/dR (N, 3) Hartree/Å if ``need_forces``."""
    coord = batch.coord
    if need_forces:
        coord = coord.detach().requires_grad_(True)
    out = model(batch.numbers, coord, batch.mol_idx, batch.n_mol, n_pass=n_pass)
    forces = predicted_forces(out, coord, create_graph=create_graph) if need_forces else None
    return out, forces


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
               loss_cfg: C.LossConfig, targets: list[str], n_pass: int, dist: Dist,
               grad_clip: float = 0.0) -> StepResult:
    """Forward, loss, backward (DDP averages the gradients), and an optimizer step unless the loss
    or a gradient is NaN/inf on any rank: that decision is all-reduced, so every rank skips alike
    and non-finite numbers never reach the weights."""
    optimizer.zero_grad(set_to_none=True)
    out, forces = forward(model, batch, n_pass, "forces" in targets)
    loss = loss_fn(out, batch, loss_cfg, targets, forces,
                   reduce_counts=dist.all_reduce_sum if dist.active else None,
                   world_size=dist.world_size)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = torch.isfinite(loss.detach())
    if grads:
        finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
    flags = torch.stack([loss.detach() / dist.world_size, (~finite).to(torch.float64),
                         torch.tensor(float(batch.n_mol), dtype=torch.float64, device=loss.device)])
    flags = dist.all_reduce_sum(flags).tolist()
    if flags[1] > 0:
        optimizer.zero_grad(set_to_none=True)
        return StepResult(flags[0], False, int(flags[2]))
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    optimizer.step()
    return StepResult(flags[0], True, int(flags[2]))
