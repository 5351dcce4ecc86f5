"""The fast CPU backend's energies and forces of a frozen model: the model's forward and the
gradient of its energy written out by hand, without autograd (the predict command's path).

Why: a small molecule's call is mostly fixed costs, and autograd's graph (its nodes, saved tensors
and engine) was one of them: without it a 21-atom molecule's energy and forces took 0.87× the
time (bench/RESULTS.md). Here the forward keeps only what the backward reads: each MLP's ELU outputs
(``cpu_mlp.Tape``), each pass's features, and the AEV terms. The backward then walks the passes
in reverse:

- the energy head and the interaction MLP give d e and d a for the last pass;
- each pass's embedding MLP gives d x_r and d x_a. Their centre sums give d g (summed over the
  passes, one backward of the terms at the end) and d a, d p;
- for passes after the first, d p goes back through the pair MLP to the two atoms of each pair,
  and d a back through the update a ← a + update(e, a) to the pass before;
- the first pass's features are constants of the elements, so it stops there.

It computes the same thing as ``model(...)`` followed by ``autograd.grad(energy.sum(), coord)``
with the cpu backend inside ``ops.first_order()``: the same kernels, with each MLP's gradient
from ``cpu_mlp.input_grad``. tests/test_cpu_forces.py checks it against the float64 reference
at 1e-10; tests/test_reference_outputs.py checks the predict path, which takes it, against the
original's outputs.

It runs where ``energy_forces`` finds everything it was written for; otherwise it returns None
and the caller takes the autograd path. That means: CPU coordinates in float32 or float64, the
native kernels built, weights of the coordinates' dtype that need no gradient, the released
architecture (an energy head, Linear–ELU MLPs, 16 features), and neighbor lists sorted by centre.
The first pass's pair features, a table by element pair, are kept per model while its weights
are unchanged.

Units: coord Å; energy Hartree; forces Hartree/Å.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import cpu_aev, cpu_mlp, cpu_native
from .constants import ENERGY_SCALE_HA
from .index_memo import IndexMemo


#: From this many pairs on, the pair MLP keeps its 32 inputs per pair instead of its first layer's
#: 256 ELU outputs, and makes those again in the backward (``cpu_mlp.forward_kept``'s
#: ``recompute_first``). A 20,001-atom droplet (422k pairs) then peaks at 2.35 GB instead of 2.75
#: in a fresh process, and its first call, which pays the first touch of that memory in page
#: faults, takes 0.89× the time; a second call takes 1.05× (the products made again;
#: bench/RESULTS.md). Fewer pairs, as in the predict command's batches of small molecules, keep
#: them.
RECOMPUTE_MIN_PAIRS = 1 << 17


class _Pass(NamedTuple):
    """What one pass's backward reads: the AFVs a (N, 16) and pair features p (Q, 16) it
    contracted, the embedding MLP's tape, and for passes after the first the update MLP's and the
    pair MLP's tapes with the pair's two AFVs a_j, a_k (Q, 16)."""
    afv: torch.Tensor
    pair_feat: torch.Tensor
    embedding: cpu_mlp.Tape
    update: cpu_mlp.Tape | None = None
    combine: cpu_mlp.Tape | None = None
    afv_j: torch.Tensor | None = None
    afv_k: torch.Tensor | None = None


def _steps(model, dtype: torch.dtype) -> dict | None:
    """The model's MLPs as ``cpu_mlp`` steps by name, where each is Linear–ELU with frozen weights
    of ``dtype``; else None."""
    out = {"embedding": cpu_mlp.mlp_steps(model.embedding_mlp),
           "update": cpu_mlp.mlp_steps(model.update_mlp),
           "combine": cpu_mlp.mlp_steps(model.combine_mlp),
           "interact": cpu_mlp.mlp_steps(model.interact_mlp),
           "energy": cpu_mlp.mlp_steps(model.heads["energy"])}
    if any(steps is None or not cpu_mlp.frozen(steps, dtype) for steps in out.values()):
        return None
    return out


def _runs_here(model, coord: torch.Tensor) -> bool:
    # the other heads run with gradients off (``AIMNet.heads_output``): any weights will do
    return (coord.device.type == "cpu" and coord.dtype in (torch.float32, torch.float64)
            and "energy" in model.heads and model.afv_table.shape[1] == cpu_native.WIDTH
            and not model.afv_table.requires_grad and model.afv_table.dtype == coord.dtype
            and cpu_native.library() is not None)


#: The first pass's pair features by element pair, (elements², 16), per model: they depend on
#: the AFV table and the pair MLP's weights alone (kept while those are unchanged).
_PAIR_TABLES = IndexMemo()


def _pair_table(model, steps: dict) -> torch.Tensor:
    """``combine_mlp([t_a + t_b, t_a ⊙ t_b])`` for every element pair (a, b) of the AFV table t,
    row a · elements + b, as ``AIMNet.forward`` makes it."""
    key = (model.afv_table, *(p for s in steps["combine"] for p in (s.weight, s.bias)
                              if p is not None))
    table = _PAIR_TABLES.get(key)
    if table is None:
        t = model.afv_table
        n_el = t.shape[0]
        table = _PAIR_TABLES.put(key, model.pair_features(t.repeat_interleave(n_el, 0),
                                                          t.repeat(n_el, 1)))
    return table


def energy_forces(model, numbers: torch.Tensor, coord: torch.Tensor, mol_idx: torch.Tensor,
                  n_mol: int, nb) -> dict | None:
    """``model(numbers, coord, mol_idx, n_mol, neighbors=nb, all_passes=False)``'s outputs with
    ``forces`` (N, 3) Hartree/Å, −d energy.sum() / d coord; None where this path does not apply
    (see the module's docstring). coord (N, 3) Å; ``nb`` the ``Neighbors`` at coord."""
    if not _runs_here(model, coord):
        return None
    steps = _steps(model, coord.dtype)
    plans = cpu_aev.native_plans(nb, coord.shape[0]) if steps is not None else None
    if plans is None:
        return None
    with torch.no_grad():
        coord = coord.detach()
        species = model.species(numbers)
        aim, passes, g_r, g_a = _forward(model, steps, species, coord, nb, plans)
        out = model.heads_output(aim[None], species, mol_idx, n_mol)
        out["forces"] = -_coord_grad(steps, coord, nb, plans, aim, passes, g_r, g_a)
    return out


def _contract(g: torch.Tensor, feat: torch.Tensor, plan: cpu_aev.CsrPlan) -> torch.Tensor:
    return cpu_native.centre_sum(g, feat, plan.ptr, plan.feat_index).flatten(1)


def _forward(model, steps: dict, species: torch.Tensor, coord: torch.Tensor, nb, plans):
    """The passes of ``AIMNet.forward``, each one's ``_Pass`` kept: → the last pass's AIM vectors
    (N, 128), the passes, the radial and angular terms g_r (P, 16) and g_a (T, 32)."""
    (plan_r, plan_a), (j, k) = plans, nb.pairs
    g_r = cpu_aev.native_radial_terms(coord, nb.radial)
    g_a = cpu_aev.native_angular_terms(coord, nb.triplets)
    # the first pass's features depend on the elements alone, as in AIMNet.forward
    n_el = model.afv_table.shape[0]
    afv = model.afv_table[species]
    pair_feat = _pair_table(model, steps)[species[j] * n_el + species[k]]
    passes: list[_Pass] = []
    e = None
    for p in range(model.n_pass):
        update = combine = afv_j = afv_k = None
        if p > 0:
            u, update = cpu_mlp.forward_kept(torch.cat([e, afv], 1), steps["update"])
            afv = afv + u
            afv_j, afv_k = afv.index_select(0, j), afv.index_select(0, k)
            pair_feat, combine = cpu_mlp.forward_kept(
                torch.cat([afv_j + afv_k, afv_j * afv_k], 1), steps["combine"],
                recompute_first=j.numel() >= RECOMPUTE_MIN_PAIRS)
        x = torch.cat([_contract(g_r, afv, plan_r), _contract(g_a, pair_feat, plan_a)], 1)
        e, embedding = cpu_mlp.forward_kept(x, steps["embedding"])
        passes.append(_Pass(afv, pair_feat, embedding, update, combine, afv_j, afv_k))
    aim, interact = cpu_mlp.forward_kept(torch.cat([e, afv], 1), steps["interact"])
    return aim, (passes, interact), g_r, g_a


def _coord_grad(steps: dict, coord: torch.Tensor, nb, plans, aim: torch.Tensor, kept,
                g_r: torch.Tensor, g_a: torch.Tensor) -> torch.Tensor:
    """d energy.sum() / d coord (N, 3) Hartree/Å from what ``_forward`` kept. Each pass's
    tensors are let go as soon as its backward has read them: a large molecule's peak memory is
    the forward's."""
    (plan_r, plan_a), (j, k) = plans, nb.pairs
    passes, interact = kept
    n, width = aim.shape[0], cpu_native.WIDTH
    # energy = Σ_atoms ENERGY_SCALE_HA · head(aim) + SAE: d head output = ENERGY_SCALE_HA
    _, head = cpu_mlp.forward_kept(aim, steps["energy"])
    d_aim = cpu_mlp.input_grad(head, aim.new_full((n, 1), ENERGY_SCALE_HA))
    d_in = cpu_mlp.input_grad(interact, d_aim)
    n_e = d_in.shape[1] - width
    d_e, d_afv = d_in[:, :n_e], d_in[:, n_e:].clone()  # added to in place below
    del d_in, d_aim
    # the terms' gradients, summed over the passes by the centre sums' backwards
    d_g_r, d_g_a = torch.zeros_like(g_r), torch.zeros_like(g_a)
    n_r = g_r.shape[1] * width
    while passes:
        ps = passes.pop()
        later = bool(passes)  # the first pass's features are constants
        d_x = cpu_mlp.input_grad(ps.embedding, d_e)
        _, d_afv_r = cpu_native.centre_sum_backward(
            g_r, ps.afv, plan_r.ptr, plan_r.feat_index, d_x[:, :n_r].unflatten(1, (-1, width)),
            True, later, into=d_g_r)
        _, d_pair = cpu_native.centre_sum_backward(
            g_a, ps.pair_feat, plan_a.ptr, plan_a.feat_index,
            d_x[:, n_r:].unflatten(1, (-1, width)), True, later, into=d_g_a)
        del d_x, d_e
        if not later:
            break
        d_afv += d_afv_r
        # p = combine([a_j + a_k, a_j ⊙ a_k])
        d_c = cpu_mlp.input_grad(ps.combine, d_pair)
        del d_pair
        d_sum, d_prod = d_c[:, :width], d_c[:, width:]
        d_afv.index_add_(0, j, d_sum + d_prod * ps.afv_k)
        d_afv.index_add_(0, k, d_sum + d_prod * ps.afv_j)
        del d_c, d_sum, d_prod
        # a ← a + update([e, a]) of the pass before
        d_u = cpu_mlp.input_grad(ps.update, d_afv)
        del ps
        d_e = d_u[:, :n_e]
        d_afv += d_u[:, n_e:]
    return (cpu_aev.native_radial_terms_backward(coord, nb.radial, d_g_r)
            + cpu_aev.native_angular_terms_backward(coord, nb.triplets, d_g_a))
