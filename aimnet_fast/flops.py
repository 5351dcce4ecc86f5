"""Counted work of an AIMNet step, for predictions against a device's limits and for printing the
model-FLOPs utilisation (MFU) next to the loss.

Counts are multiply-adds of the network's matrix products and contractions for the actual atom,
pair and triplet counts of a batch (1 multiply-add = 2 FLOP), read from the layers of the model
instance itself (every ``nn.Linear`` of its MLPs and heads, its feature table), so a model with
other layer sizes or other heads is counted as it is. Element-wise work (ELU, the AEV terms,
gathers) is left out of the FLOPs and shows in the bytes instead. The force loss's double backward
is not counted: an MFU from these counts means something for steps without force training only.

``measured_peak_flops`` times a large matrix product on the device, the denominator of the MFU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .constants import N_ANGULAR, N_RADIAL


@dataclass
class StepCount:
    forward_flop: float
    train_flop: float          # forward + backward ≈ 3 × forward (two products per product)
    activation_bytes: float    # activations (model's dtype) written forward and read backward


@dataclass(frozen=True)
class ModelSizes:
    """What the counts need from a model: per row of each MLP, its multiply-adds and the number of
    floats its layers write; the feature sizes of the contractions."""
    embed: tuple[int, int]        # (MACs, output floats) per atom and pass
    update: tuple[int, int]       # per atom, passes 2..T
    interact: tuple[int, int]     # per atom and pass with heads
    heads: tuple[int, int]        # every head together, per atom and pass with heads
    combine: tuple[int, int]      # per unique (j, k) pair, passes 2..T (pass 1: per element pair)
    n_elements: int
    atom_features: int            # F of the radial contraction (afv)
    pair_features: int            # F of the angular contraction (combine_mlp's output)


def _mlp(layers: nn.Module) -> tuple[int, int]:
    lin = [m for m in layers.modules() if isinstance(m, nn.Linear)]
    return (sum(m.in_features * m.out_features for m in lin), sum(m.out_features for m in lin))


def model_sizes(model: nn.Module) -> ModelSizes:
    """The layer sizes of ``model`` (an ``AIMNet``, or a wrapper with ``.module``, e.g. DDP)."""
    m = getattr(model, "module", model)
    heads = [_mlp(h) for h in m.heads.values()]
    combine_out = [x for x in m.combine_mlp.modules() if isinstance(x, nn.Linear)][-1].out_features
    return ModelSizes(embed=_mlp(m.embedding_mlp), update=_mlp(m.update_mlp),
                      interact=_mlp(m.interact_mlp),
                      heads=(sum(h[0] for h in heads), sum(h[1] for h in heads)),
                      combine=_mlp(m.combine_mlp), n_elements=int(m.afv_table.shape[0]),
                      atom_features=int(m.afv_table.shape[1]), pair_features=int(combine_out))


def count(model: nn.Module, n_atoms: int, n_radial_pairs: int, n_triplets: int,
          n_unique_pairs: int, n_pass: int = 3, all_passes: bool = True) -> StepCount:
    """Work of one training step of ``model`` on a batch with these counts (ordered radial pairs,
    triplets, unique (j, k) pairs of the triplets), as ``AIMNet.forward`` does it: the embedding on
    every pass, the update on passes 2..T, combine on a table of element pairs in pass 1 and on
    the unique pairs after, interact and heads on every pass (``all_passes``) or the last."""
    s = model_sizes(model)
    heads_passes = n_pass if all_passes else 1
    macs = n_atoms * (n_pass * s.embed[0] + (n_pass - 1) * s.update[0]
                      + heads_passes * (s.interact[0] + s.heads[0]))
    macs += s.n_elements ** 2 * s.combine[0] + (n_pass - 1) * n_unique_pairs * s.combine[0]
    contract_out = N_RADIAL * s.atom_features + N_ANGULAR * s.pair_features
    macs += n_pass * (n_radial_pairs * N_RADIAL * s.atom_features
                      + n_triplets * N_ANGULAR * s.pair_features)
    fwd = 2.0 * macs
    # Each activation float is written once forward and read once backward.
    per_atom = (n_pass * (contract_out + s.embed[1]) + (n_pass - 1) * s.update[1]
                + heads_passes * (s.interact[1] + s.heads[1]))
    floats = n_atoms * per_atom + (n_pass - 1) * n_unique_pairs * s.combine[1]
    m = getattr(model, "module", model)
    return StepCount(fwd, 3.0 * fwd, 2.0 * m.afv_table.element_size() * floats)


def count_batch(model: nn.Module, nb, n_atoms: int, n_pass: int = 3,
                all_passes: bool = True) -> StepCount:
    """``count`` for a batch of ``n_atoms`` atoms with neighbor lists ``nb``
    (``aimnet_fast.neighbors.Neighbors``)."""
    return count(model, n_atoms, int(nb.radial.shape[1]), int(nb.triplets.shape[1]),
                 int(nb.pairs.shape[1]), n_pass=n_pass, all_passes=all_passes)


_PEAKS: dict[tuple, float] = {}


def measured_peak_flops(device, dtype: torch.dtype = torch.float32, *, tf32: bool | None = None,
                        seconds: float = 0.5, n: int = 4096) -> float | None:
    """FLOP/s of an ``n``×``n`` matrix product in ``dtype`` on ``device``, timed for about
    ``seconds``; None on any device but CUDA. float32 products run under torch's current matmul
    precision (TF32 where ``torch.backends.cuda.matmul.allow_tf32`` is on), or with TF32 on or off
    as ``tf32`` says (for the Triton kernels' ``precision``, which torch's setting does not
    govern). Measured once per (device, dtype, TF32 mode, n) and remembered."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    matmul = torch.backends.cuda.matmul
    old = matmul.allow_tf32
    use_tf32 = old if tf32 is None else bool(tf32)
    key = (str(device), dtype, use_tf32 if dtype == torch.float32 else None, n)
    if key in _PEAKS:
        return _PEAKS[key]
    try:
        if tf32 is not None:
            matmul.allow_tf32 = use_tf32
        with torch.cuda.device(device):
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
            b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
            c = torch.empty(n, n, device=device, dtype=dtype)
            for _ in range(3):  # warm-up: cuBLAS heuristics, clocks
                torch.mm(a, b, out=c)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                torch.mm(a, b, out=c)
            torch.cuda.synchronize()
            reps = max(5, int(seconds / max((time.perf_counter() - t0) / 5, 1e-7)))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
            del a, b, c
    finally:
        if tf32 is not None:
            matmul.allow_tf32 = old
    _PEAKS[key] = 2.0 * n ** 3 * reps / t
    return _PEAKS[key]
