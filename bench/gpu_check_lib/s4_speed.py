"""Section 4: speed of the full training step (forward, loss on every pass, backward, fused
AMSGrad) at 380 molecules, MFU against the ceilings of section 1, peak memory, a per-kernel
profile, and the predicted energy+forces cost per atom from 20 to 20,000 atoms."""
from __future__ import annotations

import math

import torch

from .common import (NeedsCuda, fresh_model, md_table, median, neighbor_counts, repeated_batch,
                     sae_of, time_fn)

PEAK_OF = {"ieee": "fp32", "tf32": "tf32", "bf16": "bf16"}


def _configs(ctx):
    if ctx.dry:
        return [("triton", "ieee", 1, False), ("torch", "ieee", 1, False), ("torch", "ieee", 3, True)]
    # Most telling first: a section cut short by its budget still has the main figures.
    out = []
    for n_pass, forces in ((3, False), (1, False), (3, True), (1, True)):
        for backend, precision in (("triton", "ieee"), ("triton", "tf32"), ("triton", "bf16"),
                                   ("torch", "ieee"), ("torch", "tf32")):
            out.append((backend, precision, n_pass, forces))
    return out


def _make_step(ctx, backend, precision, n_pass, forces, batch):
    from aimnet_fast.train.config import LossConfig, OptimConfig
    from aimnet_fast.train.dist import Dist
    from aimnet_fast.train.loss import active_targets
    from aimnet_fast.train.optim import make_optimizer
    from aimnet_fast.train.step import train_step
    # The reference path has no precision switch of its own: "tf32" there is cuBLAS's TF32 mode.
    model = fresh_model(ctx, backend, precision if backend == "triton" else "ieee", sae=sae_of(ctx))
    opt, desc = make_optimizer(model.parameters(), OptimConfig(), ctx.device)
    cfg = LossConfig(forces=forces)
    targets = active_targets(cfg, model.heads.keys(), batch.labels)
    dist = Dist(device=ctx.device)

    def step():
        return train_step(model, opt, batch, cfg, targets, n_pass, dist)
    return step, model, targets, desc


#: Seconds of the section kept for the profile and the prediction sizes, which come after the
#: training matrix but are figures of their own.
RESERVE_S = 28


def _train_config(sec, ctx, backend, precision, n_pass, forces, rows):
    from aimnet_fast.flops import count

    from .common import Skip
    if not ctx.dry and sec.left() < RESERVE_S:
        raise Skip(f"the last {RESERVE_S} s of the section are kept for the profile and predictions")
    from .s1_environment import ensure_ceilings
    ensure_ceilings(ctx)
    batch, desc_data = ctx.cached("speed_batch", lambda: repeated_batch(ctx, 2 if ctx.dry else 380))
    nc = ctx.cached("speed_counts", lambda: neighbor_counts(batch))
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = backend == "torch" and precision == "tf32"
    try:
        step, model, targets, opt_desc = _make_step(ctx, backend, precision, n_pass, forces, batch)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        warm, reps = ((0 if backend == "triton" else 1), 1) if ctx.dry else (3, 10)
        ts = time_fn(ctx, step, warmup=warm, reps=reps, budget_s=max(1.0, min(8.0, sec.left() / 4)))
        peak_mem = torch.cuda.max_memory_allocated() / 2**30 if ctx.cuda else float("nan")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    t = median(ts)
    work = count(model, nc["atoms"], nc["radial_pairs"], nc["triplets"], nc["unique_pairs"], n_pass=n_pass)
    peak = ctx.ceilings.get(PEAK_OF[precision])
    # flops.count has no term for the force loss's double backward: no MFU where it would be wrong.
    mfu = (work.train_flop / t / peak) if (peak and not forces) else None
    figs = {"ms_per_step": round(t * 1e3, 3), "molecules_per_s": round(batch.n_mol / t, 1),
            "atoms_per_s": round(batch.n_atoms / t), "MFU_pct": None if mfu is None else round(100 * mfu, 2),
            "peak_mem_GiB": round(peak_mem, 3), "reps": len(ts), "targets": "+".join(targets)}
    rows.append([backend, precision, n_pass, "yes" if forces else "no", figs["ms_per_step"],
                 figs["molecules_per_s"], figs["atoms_per_s"],
                 "—" if mfu is None else f"{100 * mfu:.2f}", figs["peak_mem_GiB"], len(ts)])
    sec.figures.setdefault("batch", dict(nc, molecules=batch.n_mol, data=desc_data, optimizer=opt_desc))
    return figs


def _profile(ctx):
    from torch.profiler import ProfilerActivity, profile
    backend = "torch" if ctx.dry else "triton"
    n_pass = 1 if ctx.dry else 3
    batch, _ = ctx.cached("speed_batch", lambda: repeated_batch(ctx, 2 if ctx.dry else 380))
    step, *_ = _make_step(ctx, backend, "ieee", n_pass, False, batch)
    for _ in range(1 if ctx.dry else 3):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    n = 1 if ctx.dry else 3
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if ctx.cuda:
            torch.cuda.synchronize()
    ev = prof.key_averages()

    def self_dev(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
    if ctx.cuda:
        items = [e for e in ev if self_dev(e) > 0]
        tot = sum(self_dev(e) for e in items) or 1
        items.sort(key=self_dev, reverse=True)
        rows = [[e.key[:90], e.count // n, round(self_dev(e) / n / 1e3, 3),
                 round(self_dev(e) / e.count, 1), round(100 * self_dev(e) / tot, 1)] for e in items[:15]]
        head = ["CUDA kernel", "calls/step", "self ms/step", "µs/call", "% of GPU time"]
        title = f"per-kernel breakdown, triton T={n_pass} step (torch.profiler, top 15 by self CUDA time)"
    else:
        items = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)
        tot = sum(e.self_cpu_time_total for e in items) or 1
        rows = [[e.key[:90], e.count // n, round(e.self_cpu_time_total / n / 1e3, 3),
                 round(e.self_cpu_time_total / max(e.count, 1), 1),
                 round(100 * e.self_cpu_time_total / tot, 1)] for e in items[:15]]
        head = ["CPU op (dry run: no CUDA kernels)", "calls/step", "self ms/step", "µs/call", "% of CPU"]
        title = f"per-op breakdown, torch T={n_pass} step on the CPU (dry run)"
    return {"_table": (title, md_table(head, rows)), "kernels_listed": len(rows),
            "total_self_ms_per_step": round(tot / n / 1e3, 3)}


def _predict(ctx, backend, n_atoms_target, rows, budget_s):
    import bench.synthetic as syn
    from aimnet_fast.batch import Batch
    n_water = math.ceil(n_atoms_target / 3)
    numbers, coord = syn.water_cluster(n_water)
    b = Batch.from_molecules([(numbers, coord)]).to(ctx.device)
    model = fresh_model(ctx, backend).eval()
    mol_idx, z = b.mol_idx, b.numbers

    def ef():
        c = b.coord.detach().requires_grad_(True)
        e = model(z, c, mol_idx, 1)["energy"]
        return e, -torch.autograd.grad(e.sum(), c)[0]
    warm, reps = ((0, 1) if ctx.dry else (2, 5))
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    ts = time_fn(ctx, ef, warmup=warm, reps=reps, budget_s=budget_s)
    t = median(ts)
    n = b.n_atoms
    mem = torch.cuda.max_memory_allocated() / 2**30 if ctx.cuda else float("nan")
    rows.append([backend, n, round(t * 1e3, 3), round(t / n * 1e6, 3), round(mem, 3), len(ts)])
    return {"atoms": n, "ms": round(t * 1e3, 3), "us_per_atom": round(t / n * 1e6, 3)}


def run(sec, ctx):
    rows: list = []
    for cfg in _configs(ctx):
        backend, precision, n_pass, forces = cfg
        sec.sub(f"train_{backend}_{precision}_T{n_pass}{'_forces' if forces else ''}",
                _train_config, sec, ctx, backend, precision, n_pass, forces, rows)
    b = sec.figures.get("batch", {})
    sec.block(f"training step, {b.get('molecules', '?')} molecules ({b.get('atoms', '?')} atoms, "
              f"{b.get('radial_pairs', '?')} radial pairs, {b.get('triplets', '?')} triplets) of "
              f"{b.get('data', '?')}; median of timed steps after warm-up"
              + (", CUDA events" if ctx.cuda else ", perf_counter on the CPU"),
              md_table(["backend", "precision", "T", "forces", "ms/step", "molecules/s", "atoms/s",
                        "MFU %", "peak GiB", "reps"], rows)
              + "\n\nMFU: aimnet_fast.flops.count(model, ...).train_flop of this batch (counted from "
                "the model's own layer sizes) over the measured ceiling of the matching precision "
                "(section 1); none for force rows, whose double backward flops.count does not count.")
    sec.figures["train_rows"] = rows
    p = sec.sub("profile", _profile, ctx)
    if p and "_table" in p:
        sec.block(*p.pop("_table"))
        sec.checks[-1]["figures"].pop("_table", None)
    prow: list = []
    sizes = [20, 60] if ctx.dry else [20, 200, 2000, 20000]
    for n in sizes:
        # Dry run: the reference only; interpreted kernels took 72 s for 20 atoms there.
        for backend in ["torch"] if ctx.dry else ["triton", "torch"]:
            sec.sub(f"predict_{backend}_{n}", _predict, ctx, backend, n, prow,
                    max(0.5, min(6.0, sec.left() / 6)))
    sec.block("predicted energy + forces, water clusters (bench/synthetic.py water_cluster), "
              "random weights, T = 3",
              md_table(["backend", "atoms", "ms", "µs/atom", "peak GiB", "reps"], prow))
    sec.figures["predict_rows"] = prow
    best = [r for r in rows if r[0] == "triton" and r[2] == 3 and r[3] == "no"]
    sec.headline = ("triton T=3: " + ", ".join(f"{r[1]} {r[5]:.0f} mol/s MFU {r[7]}%" for r in best)
                    if best else "no triton T=3 figure")
    if not ctx.cuda:
        sec.sub("cuda_events", _needs_cuda)


def _needs_cuda():
    raise NeedsCuda("CUDA-event timing and peak GPU memory; the dry run times with perf_counter")
