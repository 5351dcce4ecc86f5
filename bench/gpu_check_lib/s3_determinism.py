"""Section 3: the same training step twice, from the same weights and batch, gives bit-identical
gradients on the Triton backend (asserted) and on the reference path (reported)."""
from __future__ import annotations

import torch

from .common import CheckFailed, clone_model, fresh_model, repeated_batch, sae_of


def _gradients(model, batch, n_pass, forces, cfg):
    from aimnet_fast.train.loss import active_targets, loss_fn
    from aimnet_fast.train.step import forward
    m = clone_model(model)
    targets = active_targets(cfg, m.heads.keys(), batch.labels)
    out, f = forward(m, batch, n_pass, forces)
    loss = loss_fn(out, batch, cfg, targets, f)
    loss.backward()
    return ({n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None},
            targets, float(loss.detach()))


def _twice(ctx, backend, forces, n_mol, n_pass):
    from aimnet_fast.train.config import LossConfig
    batch, _ = repeated_batch(ctx, n_mol)
    model = fresh_model(ctx, backend, sae=sae_of(ctx))
    cfg = LossConfig(forces=forces)
    g1, targets, l1 = _gradients(model, batch, n_pass, forces, cfg)
    g2, _, l2 = _gradients(model, batch, n_pass, forces, cfg)
    differ = {n: float((g1[n] - g2[n]).abs().max()) for n in g1 if not torch.equal(g1[n], g2[n])}
    missing = sorted(set(g1) ^ set(g2))
    figs = {"targets": "+".join(targets), "n_pass": n_pass, "molecules": batch.n_mol,
            "atoms": batch.n_atoms, "params_with_grad": len(g1), "params_differing": len(differ),
            "loss_equal": l1 == l2, "max_abs_diff": max(differ.values(), default=0.0)}
    if differ:
        figs["differing"] = {n: f"{v:.3g}" for n, v in sorted(differ.items(), key=lambda x: -x[1])[:12]}
    return figs, bool(differ or missing or l1 != l2)


def _triton(ctx, forces, n_mol, n_pass):
    figs, differs = _twice(ctx, "triton", forces, n_mol, n_pass)
    if differs:
        raise CheckFailed(f"{figs['params_differing']} of {figs['params_with_grad']} gradients "
                          f"differ between identical steps (max |Δ| {figs['max_abs_diff']:.3g}): "
                          f"{list(figs.get('differing', {}))[:4]}", figs)
    return figs


def _torch(ctx, forces, n_mol, n_pass):
    figs, differs = _twice(ctx, "torch", forces, n_mol, n_pass)
    figs["_status"] = "info"
    figs["_note"] = ("reference path: " + (f"{figs['params_differing']} gradients differ run to run "
                     f"(max |Δ| {figs['max_abs_diff']:.3g}; atomics in index_add_/scatter on CUDA)"
                     if differs else "bit-identical here"))
    return figs


def run(sec, ctx):
    n_mol = 1 if ctx.dry else 380
    # The dry run uses one pass: three interpreted passes with a double backward take minutes.
    n_pass = 1 if ctx.dry else 3
    res = {}
    for forces in (False, True):
        tag = "with_forces" if forces else "energy_charges_volumes"
        res[tag] = sec.sub(f"triton_{tag}", _triton, ctx, forces, n_mol, n_pass)
    for forces in (False, True):
        tag = "with_forces" if forces else "energy_charges_volumes"
        sec.sub(f"torch_{tag}", _torch, ctx, forces, n_mol, n_pass)
    ok = [k for k, v in res.items() if v is not None]
    sec.headline = f"triton bit-identical: {', '.join(ok) or 'none'} (T={n_pass}, {n_mol} molecules)"
