"""The fast CPU backend's AEV contractions: the reference's meaning (``aimnet_fast.aev``) without
its (terms × channels × features) products.

The reference forms g[t, c] · feat[t, f] for every pair or triplet t (T × 32 × 16 numbers for the
angular part, then an ``index_add``), and autograd keeps and gathers as much again. Here the terms
of each centre atom are laid out in rows of ``width`` slots (a centre with more terms takes several
rows, the last one padded with zeros), so that the sum over a centre's terms becomes one batched
matrix product per row, (C × width) @ (width × F), and the rows are summed onto their atoms. Every
step is a differentiable torch operation, so gradients, and the double backward of force training,
come from autograd over those products, with the same small intermediates.

The angular terms use cos(θ − θ_z) = cos θ cos θ_z + sin θ sin θ_z with sin θ = sqrt(1 − cos²θ)
(θ in [0, π]) instead of arccos, and raise to ζ = 8 by three squarings.

Shapes and units as the reference: coord (N, 3) Å; pairs (2, P) and triplets (3, T) int64 sorted
by centre atom (any order is accepted, at the cost of a sort); outputs (N, 16, F) and (N, 32, F).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .aev import cosine_cutoff, radial_terms
from .constants import (ANGULAR_CUTOFF_A, ANGULAR_ETA_PER_A2, ANGULAR_SECTORS_RAD,
                        ANGULAR_SHIFTS_A, ANGULAR_ZETA, COS_CLAMP)
from .index_memo import IndexMemo

#: Slots per row: a centre with k terms costs ceil(k / width) rows. Narrower rows waste less on
#: padding but make more, smaller matrix products and a longer sum over rows; on S66x8 energy+forces
#: (bench/RESULTS.md) radial 4–16 × angular 16–32 were within 1 % of each other, angular 8 5 % slower.
RADIAL_ROW_WIDTH = 8
ANGULAR_ROW_WIDTH = 16

assert ANGULAR_ZETA == 8.0, "angular_terms raises to the power ζ by three squarings"


class RowLayout(NamedTuple):
    """Where each term of a centre-sorted list goes in the padded rows.

    - ``slot_term`` (R · width,) the term in each slot, or T (one past the last) for padding
    - ``row_atom``  (R,) the centre atom of each row
    - ``width``     slots per row
    """
    slot_term: torch.Tensor
    row_atom: torch.Tensor
    width: int


def row_layout(centre: torch.Tensor, n_atoms: int, width: int) -> RowLayout:
    """The rows of ``width`` slots for terms whose centre atoms are ``centre`` (T,)."""
    device = centre.device
    n_terms = centre.numel()
    order = None
    if n_terms > 1 and bool((centre[1:] < centre[:-1]).any()):
        order = torch.argsort(centre, stable=True)
        centre = centre[order]
    count = torch.bincount(centre, minlength=n_atoms)
    rows = (count + width - 1) // width
    row_start = torch.cumsum(rows, 0) - rows
    first = torch.cumsum(count, 0) - count
    rank = torch.arange(n_terms, device=device) - first[centre]
    slot = (row_start[centre] + rank // width) * width + rank % width
    n_rows = int(rows.sum())
    term = torch.arange(n_terms, device=device) if order is None else order
    slot_term = torch.full((n_rows * width,), n_terms, dtype=torch.long, device=device)
    slot_term[slot] = term
    row_atom = torch.repeat_interleave(torch.arange(n_atoms, device=device), rows,
                                       output_size=n_rows)
    return RowLayout(slot_term, row_atom, width)


def _padded(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] where index may be x.shape[0] (a padding slot), which reads zeros."""
    # index_select, not x[index]: its backward is an index_add, several times faster on the CPU
    # than the accumulating index_put behind advanced indexing.
    return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, index)


class GatherPlan(NamedTuple):
    """A row layout and, for each slot, the feature row it reads (``slot_feat``, K for padding)."""
    layout: RowLayout
    slot_feat: torch.Tensor


def gather_plan(centre: torch.Tensor, feat_index: torch.Tensor, n_feat_rows: int, n_atoms: int,
                width: int) -> GatherPlan:
    """The plan of ``centre_sum`` for terms with centres ``centre`` (T,) reading feature rows
    ``feat_index`` (T,) of a (n_feat_rows, F) feature tensor."""
    layout = row_layout(centre, n_atoms, width)
    slot_feat = torch.cat([feat_index, feat_index.new_full((1,), n_feat_rows)]) \
        .index_select(0, layout.slot_term)
    return GatherPlan(layout, slot_feat)


#: Plans derived from a neighbor list alone, one per list: the model's T passes and their backward
#: reuse it instead of rebuilding it at every call (6 times per forward).
_PLANS = IndexMemo()


def _plan_for(lists, tag: str, centre: torch.Tensor, feat_index: torch.Tensor,
              n_feat_rows: int, n_atoms: int, width: int) -> GatherPlan:
    """The plan of a neighbor list, memoized on its index tensors ``lists`` (pairs, or triplets
    with their triplet_pair)."""
    key = (tag, n_feat_rows, n_atoms, width)
    plan = _PLANS.get(lists, key)
    if plan is None:
        plan = _PLANS.put(lists, gather_plan(centre, feat_index, n_feat_rows, n_atoms, width), key)
    return plan


def centre_sum(terms: torch.Tensor, feat: torch.Tensor, plan: GatherPlan,
               n_atoms: int) -> torch.Tensor:
    """out[i, c, f] = Σ_{t: centre(t) = i} terms[t, c] · feat[feat_index[t], f] → (N, C, F).

    ``terms`` (T, C), ``feat`` (K, F); ``plan`` from ``gather_plan`` over the same T terms, their
    centres and feature indices."""
    layout = plan.layout
    n_rows = layout.row_atom.numel()
    C, F = terms.shape[1], feat.shape[1]
    w = layout.width
    t_rows = _padded(terms, layout.slot_term).view(n_rows, w, C)
    f_rows = _padded(feat, plan.slot_feat).view(n_rows, w, F)
    per_row = torch.bmm(t_rows.transpose(1, 2), f_rows)                      # (R, C, F)
    return feat.new_zeros(n_atoms, C, F).index_add(0, layout.row_atom, per_row)


def angular_terms(r_ij: torch.Tensor, r_ik: torch.Tensor) -> torch.Tensor:
    """g_a (T, 32), channel c = z·4 + a, from the two bond vectors (T, 3) in Å: the reference's
    ``aev.angular_terms`` without arccos."""
    d_ij = r_ij.norm(dim=1)
    d_ik = r_ik.norm(dim=1)
    cos = ((r_ij * r_ik).sum(1) / (d_ij * d_ik)).clamp(-COS_CLAMP, COS_CLAMP)
    sin = torch.sqrt(1.0 - cos * cos)
    sectors = torch.tensor(ANGULAR_SECTORS_RAD, dtype=torch.float64)
    cos_z = sectors.cos().to(r_ij)
    sin_z = sectors.sin().to(r_ij)
    a = 1.0 + cos[:, None] * cos_z + sin[:, None] * sin_z                   # (T, 8)
    a = a * a
    a = a * a
    ang = a * a                                                             # (1 + cos(θ − θ_z))^8
    shifts = torch.tensor(ANGULAR_SHIFTS_A, dtype=r_ij.dtype, device=r_ij.device)
    rad = torch.exp(-ANGULAR_ETA_PER_A2 * (0.5 * (d_ij + d_ik)[:, None] - shifts).square())  # (T, 4)
    fc = (2.0 ** (1.0 - ANGULAR_ZETA)) * cosine_cutoff(d_ij, ANGULAR_CUTOFF_A) \
        * cosine_cutoff(d_ik, ANGULAR_CUTOFF_A)
    return ((fc[:, None] * ang)[:, :, None] * rad[:, None, :]).reshape(-1, ang.shape[1] * rad.shape[1])


def radial_contract(coord: torch.Tensor, pairs: torch.Tensor, afv: torch.Tensor) -> torch.Tensor:
    """x_r[i, s, f] = Σ_j g_r[i, s, j] · afv[j, f]: coord (N, 3) Å, pairs (2, P), afv (N, F)
    → (N, 16, F), as ``aev.radial_contract``."""
    i, j = pairs[0], pairs[1]
    g = radial_terms((coord.index_select(0, j) - coord.index_select(0, i)).norm(dim=1)).to(afv.dtype)
    n = coord.shape[0]
    plan = _plan_for(pairs, "radial", i, j, afv.shape[0], n, RADIAL_ROW_WIDTH)
    return centre_sum(g, afv, plan, n)


def angular_contract(coord: torch.Tensor, triplets: torch.Tensor, pair_feat: torch.Tensor,
                     triplet_pair: torch.Tensor) -> torch.Tensor:
    """x_a[i, c, f] = Σ_{j<k} g_a[i, c, jk] · p_jk[f]: coord (N, 3) Å, triplets (3, T),
    pair_feat (Q, F), triplet_pair (T,) → (N, 32, F), as ``aev.angular_contract``."""
    i, j, k = triplets[0], triplets[1], triplets[2]
    r_i = coord.index_select(0, i)
    g = angular_terms(coord.index_select(0, j) - r_i, coord.index_select(0, k) - r_i).to(pair_feat.dtype)
    n = coord.shape[0]
    plan = _plan_for((triplets, triplet_pair), "angular", i, triplet_pair, pair_feat.shape[0], n,
                     ANGULAR_ROW_WIDTH)
    return centre_sum(g, pair_feat, plan, n)

