"""Section 5: the training step captured in a CUDA graph.

1. The plain ``train_step`` (its neighbor search sizes its lists on the host, it reads its skip
   flag with ``.tolist()``): expected to fail; the reason is the figure.
2. Precomputed neighbors and no host-side skip decision: what else stands in the way.
3. The static-shape step (``aimnet_fast.padded``: batch and lists padded to fixed capacities,
   neighbor search included, no host sync), with and without forces: the padded loss equals the
   unpadded one (also in the dry run, on the CPU); a graph of forward + loss + backward replays to
   the eager loss and gradients; and the full step with a capturable AMSGrad, eager vs replayed."""
from __future__ import annotations

import torch

from .common import CheckFailed, NeedsCuda, fresh_model, median, repeated_batch, sae_of, time_fn


def _capture(step, warmup=3):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    # A failure inside the capture is usually followed by a second one when the capture ends
    # (the invalidated graph); the first is the reason, so that is the one raised.
    first: list = []
    try:
        with torch.cuda.graph(g):
            try:
                step()
            except Exception as e:
                first.append(e)
                raise
    except Exception as e:
        if first and first[0] is not e:
            raise first[0] from e
        raise
    return g


def _setup(ctx, n_pass):
    from aimnet_fast.train.config import LossConfig
    from aimnet_fast.train.loss import active_targets
    batch, _ = ctx.cached("speed_batch", lambda: repeated_batch(ctx, 380))
    model = fresh_model(ctx, "triton", sae=sae_of(ctx))
    cfg = LossConfig()
    return batch, model, cfg, active_targets(cfg, model.heads.keys(), batch.labels)


def _full_step(ctx, n_pass):
    if not ctx.cuda:
        raise NeedsCuda("CUDA graphs")
    from aimnet_fast.train.config import OptimConfig
    from aimnet_fast.train.dist import Dist
    from aimnet_fast.train.optim import make_optimizer
    from aimnet_fast.train.step import train_step
    batch, model, cfg, targets = _setup(ctx, n_pass)
    opt, _ = make_optimizer(model.parameters(), OptimConfig(), ctx.device)
    dist = Dist(device=ctx.device)
    try:
        _capture(lambda: train_step(model, opt, batch, cfg, targets, n_pass, dist))
    except Exception as e:
        msg = " ".join(str(e).split())[:400]
        return {"_status": "info", "_note": f"capture failed (expected today): {type(e).__name__}: {msg}",
                "captured": False}
    return {"captured": True, "_note": "the full train_step captured"}


def _static_neighbors_step(ctx, n_pass):
    if not ctx.cuda:
        raise NeedsCuda("CUDA graphs")
    from aimnet_fast.neighbors import build_neighbors
    from aimnet_fast.train.loss import loss_fn
    batch, model, cfg, targets = _setup(ctx, n_pass)
    nb = build_neighbors(batch.coord, batch.mol_idx)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True, capturable=True)

    def step():
        opt.zero_grad(set_to_none=False)
        out = model(batch.numbers, batch.coord, batch.mol_idx, batch.n_mol, neighbors=nb, n_pass=n_pass)
        loss_fn(out, batch, cfg, targets).backward()
        opt.step()
    eager = median(time_fn(ctx, step, warmup=3, reps=10))
    try:
        g = _capture(step, warmup=0)
    except Exception as e:
        msg = " ".join(str(e).split())[:400]
        return {"_status": "info", "eager_ms": round(eager * 1e3, 3), "captured": False,
                "_note": f"capture failed: {type(e).__name__}: {msg}"}
    replay = median(time_fn(ctx, g.replay, warmup=3, reps=20))
    return {"captured": True, "eager_ms": round(eager * 1e3, 3), "graph_ms": round(replay * 1e3, 3),
            "speedup": round(eager / replay, 2), "molecules_per_s_graph": round(batch.n_mol / replay, 1)}


def _padded_step(ctx, n_pass, forces):
    from aimnet_fast.padded import CapacityPlan, build_neighbors_padded
    from aimnet_fast.train.config import LossConfig
    from aimnet_fast.train.loss import active_targets, loss_fn
    from aimnet_fast.train.step import forward
    if ctx.dry:   # the reference ops: in Triton's interpreter padded lists take minutes
        batch = ctx.cached("capture_dry_batch", lambda: repeated_batch(ctx, 4))[0]
        model = fresh_model(ctx, "torch", sae=sae_of(ctx))
    else:
        batch, model, _, _ = _setup(ctx, n_pass)
    cfg = LossConfig(forces=forces)
    targets = active_targets(cfg, model.heads.keys(), batch.labels)
    plan = CapacityPlan(model.elements[0])
    for _ in range(3):   # the first capacities are a guess: grow until the lists fit
        pb, pad = plan.pad(batch.to("cpu"))
        pb = pb.to(ctx.device)
        _, counts = build_neighbors_padded(pb.coord, pb.mol_idx, pb.offsets, pad.cap, pad.ghosts)
        if not counts.host()["overflow"]:
            break
        plan.grow(counts)

    def loss_of(b, padded: bool):
        nb = None
        if padded:
            nb, _ = build_neighbors_padded(b.coord, b.mol_idx, b.offsets, pad.cap, pad.ghosts)
        out, f = forward(model, b, n_pass, forces, neighbors=nb)
        return loss_fn(out, b, cfg, targets, f)

    model.zero_grad(set_to_none=False)
    plain = loss_of(batch, False).detach()
    model.zero_grad(set_to_none=False)
    eager = loss_of(pb, True)
    eager.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.detach().clone() for p in params]
    figs = {"atoms": batch.n_atoms, "padded_atoms": pb.n_atoms, "capacity": str(pad.cap),
            "loss_rel_diff_padded_vs_plain": abs(float(eager) - float(plain)) / abs(float(plain))}
    if figs["loss_rel_diff_padded_vs_plain"] > 1e-5:
        raise CheckFailed("the padded batch's loss differs from the unpadded batch's", figs)
    if not ctx.cuda:
        raise NeedsCuda("CUDA graphs (the padded loss equals the plain one: "
                        f"{figs['loss_rel_diff_padded_vs_plain']:.1e} relative)")

    holder = {}

    def compute():
        model.zero_grad(set_to_none=False)
        loss = loss_of(pb, True)
        loss.backward()
        holder["loss"] = loss.detach()
    try:
        g = _capture(compute, warmup=2)
    except Exception as e:
        msg = " ".join(str(e).split())[:400]
        return {**figs, "_status": "fail", "captured": False,
                "_note": f"capture failed: {type(e).__name__}: {msg}"}
    g.replay()
    torch.cuda.synchronize()
    figs["graph_loss_rel_diff"] = abs(float(holder["loss"]) - float(eager)) / abs(float(eager))
    figs["graph_grad_max_rel_diff"] = max(
        float((p.grad - q).norm() / q.norm().clamp_min(1e-30)) for p, q in zip(params, grads))

    opt = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True, capturable=True)

    def full():
        compute()
        opt.step()
    eager_s = median(time_fn(ctx, full, warmup=3, reps=10))
    g_full = _capture(full, warmup=0)
    replay_s = median(time_fn(ctx, g_full.replay, warmup=3, reps=20))
    figs.update(captured=True, eager_ms=round(eager_s * 1e3, 3), graph_ms=round(replay_s * 1e3, 3),
                speedup=round(eager_s / replay_s, 2),
                molecules_per_s_graph=round(batch.n_mol / replay_s, 1))
    if figs["graph_loss_rel_diff"] > 1e-5 or figs["graph_grad_max_rel_diff"] > 1e-4:
        raise CheckFailed("the replayed graph's loss or gradients differ from the eager step's", figs)
    return figs


def run(sec, ctx):
    a = sec.sub("full_train_step_T3", _full_step, ctx, 3) or {}
    b = sec.sub("precomputed_neighbors_T3", _static_neighbors_step, ctx, 3) or {}
    c = sec.sub("static_shapes_T3", _padded_step, ctx, 3, False) or {}
    sec.sub("static_shapes_T3_forces", _padded_step, ctx, 3, True)
    sec.headline = (f"static-shape step captured: {c.get('captured', 'n/a')}"
                    + (f" ({c['graph_ms']} ms vs {c['eager_ms']} ms eager)" if c.get("graph_ms") else "")
                    + f"; plain step: {a.get('captured', 'n/a')}; with precomputed neighbors: "
                    f"{b.get('captured', 'n/a')}")
