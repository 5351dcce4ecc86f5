"""Helpers shared by the sections: the run context, timing, data, models."""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .bootstrap import SHARED


class NeedsCuda(Exception):
    """A sub-check that cannot mean anything without CUDA (events, graphs, nvidia-smi)."""


class Skip(Exception):
    pass


class CheckFailed(AssertionError):
    """A failed sub-check that still reports the figures it measured."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


@dataclass
class Ctx:
    out: Path
    dry: bool
    device: torch.device
    notes: list = field(default_factory=list)
    ceilings: dict = field(default_factory=dict)   # FLOP/s and B/s from section 1
    inject: set = field(default_factory=set)
    simulate_no_omegaconf: bool = False
    _cache: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def cached(self, key, make: Callable):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def time_fn(ctx: Ctx, fn: Callable, warmup: int, reps: int, budget_s: float = 1e9) -> list[float]:
    """Seconds per call: CUDA events on the GPU (device time of the stream, host gaps included),
    perf_counter on the CPU. Stops early (≥ 1 rep) once ``budget_s`` of timed calls is spent."""
    for _ in range(warmup):
        fn()
    sync(ctx)
    out: list[float] = []
    t_start = time.perf_counter()
    for _ in range(reps):
        if ctx.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s:
            break
    return out


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def rel_fro(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


# -- data ------------------------------------------------------------------------------------------
ANI1X_SAMPLE = SHARED / "data" / "ani1x_sample.h5"


def ani1x_source() -> dict:
    return {"path": str(ANI1X_SAMPLE), "layout": "ani1x"}


def training_data(ctx: Ctx):
    """(dataset, description). On the GPU the ANI-1x release sample (8 conformers of 13–19 atoms,
    15 on average, with energies, forces, MBIS charges and volumes); in the dry run the smallest
    molecules of the embedded default set, because the interpreter costs seconds per atom."""
    from aimnet_fast import data as D

    def make():
        if not ctx.dry and ANI1X_SAMPLE.exists():
            return D.load_dataset(ani1x_source()), f"{ANI1X_SAMPLE.name} (ANI-1x release sample)"
        return D.load_dataset(D.default_sources()), "embedded default data set (aimnet_fast/data/default.h5)"
    return ctx.cached("data", make)


def repeated_batch(ctx: Ctx, n_mol: int):
    """A labelled Batch of ``n_mol`` molecules on ctx.device: the data set's conformers repeated
    (GPU), or the smallest ones with ≥ 3 atoms (dry run), so that triplets exist."""
    import numpy as np

    from aimnet_fast import data as D
    ds, desc = training_data(ctx)
    n = np.asarray(ds.n_atoms)
    if ctx.dry:
        order = np.argsort(n, kind="stable")
        pool = order[n[order] >= 3][:max(n_mol, 1)]
    else:
        pool = np.arange(len(n))
    idx = [int(pool[k % len(pool)]) for k in range(n_mol)]
    b = D.collate(ds, idx).to(ctx.device)
    return b, desc


def fresh_model(ctx: Ctx, backend: str, precision: str = "ieee", seed: int = 0,
                sae=None) -> torch.nn.Module:
    from aimnet_fast.model import AIMNet
    torch.manual_seed(seed)
    m = AIMNet(backend=backend, precision=precision)
    if sae is not None:
        with torch.no_grad():
            m.sae_Ha.copy_(torch.as_tensor(sae, dtype=torch.float64))
    return m.to(ctx.device)


def sae_of(ctx: Ctx):
    from aimnet_fast import data as D
    ds, _ = training_data(ctx)
    return ctx.cached("sae", lambda: D.fit_sae(ds))


def clone_model(m):
    return copy.deepcopy(m)


def neighbor_counts(batch) -> dict:
    from aimnet_fast.neighbors import build_neighbors
    nb = build_neighbors(batch.coord.detach(), batch.mol_idx)
    return {"atoms": int(batch.n_atoms), "radial_pairs": int(nb.radial.shape[1]),
            "triplets": int(nb.triplets.shape[1]), "unique_pairs": int(nb.pairs.shape[1])}


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
