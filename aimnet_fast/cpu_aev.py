"""The fast CPU backend's AEV contractions: the reference's meaning (``aimnet_fast.aev``) without
its (terms × channels × features) products.

The reference forms g[t, c] · feat[t, f] for every pair or triplet t (T × 32 × 16 numbers for the
angular part, then an ``index_add``), and autograd keeps and gathers as much again. Here the terms
of each centre atom are laid out in rows of ``width`` slots (a centre with more terms takes several
rows, the last one padded with zeros), so that the sum over a centre's terms becomes one batched
matrix product per row, (C × width) @ (width × F), and the rows are summed onto their atoms.

The terms depend on the coordinates alone, so the model's T passes share them: ``aev_terms``
computes them once per forward, already laid out in rows (``AevTerms``), and each pass's
contraction reads them (``terms=``); autograd sums the passes' gradients of the rows before the one
backward of the terms. Called without ``terms``, a contraction computes its own.

The centre sum (``CentreSum``), the layout in rows (``TermRows``) and the AEV terms
(``AngularTerms``, ``RadialTerms``) are autograd Functions with analytic backwards: differentiating
the compositions of torch ops cost as much as the forward again (the angular terms' many
elementwise products on (T, 32) tensors, the padding and gathers of the rows). Each backward is
written in differentiable torch ops on the Function's saved inputs, so that the double backward of
force training comes from autograd over the backward; the forward's intermediates serve the plain
backward only (no ``create_graph``), where nothing differentiates it again. The angular factors are
kept with the triplets along the last dimension, (8, T) and (4, T), where the CPU's elementwise
work vectorizes, and the angular centre sum hands back the terms' gradient in that layout
(``grad_by_channel``).

The angular terms use cos(θ − θ_z) = cos θ cos θ_z + sin θ sin θ_z with sin θ = sqrt(1 − cos²θ)
(θ in [0, π]) instead of arccos, and raise to ζ = 8 by three squarings.

Where no graph is differentiated twice (``native_wanted``: inside ``first_order()``, or gradients
off) and the native kernels are built (``cpu_native``), the terms and the centre sums are theirs
instead: the terms stay (T, C) in the lists' order (sorted by centre, ``CsrPlan``), each atom's sums
are made in vector registers while its terms stream past, and the backwards recompute the terms'
factors from the coordinates rather than keep them (``NativeCentreSum``, ``NativeRadialTerms``,
``NativeAngularTerms``). Training, whose force loss differentiates the backward again, keeps the
torch code above.

Shapes and units as the reference: coord (N, 3) Å; pairs (2, P) and triplets (3, T) int64 sorted
by centre atom (any order is accepted, at the cost of a sort); outputs (N, 16, F) and (N, 32, F).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from . import cpu_mlp, cpu_native
from .aev import cosine_cutoff
from .constants import (ANGULAR_CUTOFF_A, ANGULAR_ETA_PER_A2, ANGULAR_SECTORS_RAD,
                        ANGULAR_SHIFTS_A, ANGULAR_ZETA, COS_CLAMP, RADIAL_CUTOFF_A,
                        RADIAL_ETA_PER_A2, RADIAL_SHIFTS_A)
from .index_memo import IndexMemo

#: Slots per row: a centre with k terms costs ceil(k / width) rows. Narrower rows waste less on
#: padding but make more, smaller matrix products and a longer sum over rows; on S66x8 energy+forces
#: (bench/RESULTS.md) radial 4–16 × angular 16–32 were within 1 % of each other, angular 8 5 % slower.
RADIAL_ROW_WIDTH = 8
ANGULAR_ROW_WIDTH = 16

assert ANGULAR_ZETA == 8.0, "angular_terms raises to the power ζ by three squarings"

#: cos θ_z and sin θ_z of the 8 sectors (8, 2), computed once in float64 and rounded per call.
_SECTORS_COS_SIN = torch.tensor([[math.cos(z), math.sin(z)] for z in ANGULAR_SECTORS_RAD],
                                dtype=torch.float64)
_ANGULAR_SHIFTS = torch.tensor(ANGULAR_SHIFTS_A, dtype=torch.float64)
_RADIAL_SHIFTS = torch.tensor(RADIAL_SHIFTS_A, dtype=torch.float64)
_ANGULAR_SCALE = 2.0 ** (1.0 - ANGULAR_ZETA)


class RowLayout(NamedTuple):
    """Where each term of a centre-sorted list goes in the padded rows.

    - ``slot_term`` (R · width,) the term in each slot, or T (one past the last) for padding
    - ``row_atom``  (R,) the centre atom of each row
    - ``width``     slots per row
    - ``term_slot`` (T,) the slot of each term (the inverse of ``slot_term`` on the real slots)
    """
    slot_term: torch.Tensor
    row_atom: torch.Tensor
    width: int
    term_slot: torch.Tensor


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
    if order is None:
        term_slot = slot
    else:
        term_slot = torch.empty_like(slot)
        term_slot[order] = slot
    row_atom = torch.repeat_interleave(torch.arange(n_atoms, device=device), rows,
                                       output_size=n_rows)
    return RowLayout(slot_term, row_atom, width, term_slot)


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


class CsrPlan(NamedTuple):
    """Terms sorted by centre atom, for the native centre sum (``cpu_native``): atom i's terms are
    ``ptr[i]`` .. ``ptr[i + 1]`` − 1 (``ptr`` (N + 1,)), term t reads feature row
    ``feat_index[t]``; ``centre`` (T,) the terms' centre atoms."""
    ptr: torch.Tensor
    feat_index: torch.Tensor
    centre: torch.Tensor


def csr_plan(centre: torch.Tensor, feat_index: torch.Tensor, n_feat_rows: int,
             n_atoms: int, atoms: torch.Tensor | None = None) -> CsrPlan | None:
    """The ``CsrPlan`` of terms with centres ``centre`` (T,) reading rows ``feat_index`` (T,) of a
    (n_feat_rows, F) feature tensor; None where the centres are not sorted (the rows' plan sorts).
    The indices are checked here, once per list, with the terms' other ``atoms`` if given: the C
    reads memory at them unchecked. Needs the native kernels (``cpu_native.library()``)."""
    ptr = cpu_native.csr_offsets(centre, n_atoms)
    if ptr is None:
        return None
    if cpu_native.out_of_range(feat_index, n_feat_rows) \
            or (atoms is not None and cpu_native.out_of_range(atoms, n_atoms)):
        raise ValueError(f"term indices out of range: centres in [0, {n_atoms}), feature rows in "
                         f"[0, {n_feat_rows})")
    return CsrPlan(ptr, feat_index.contiguous(), centre)


def _csr_for(lists, tag: str, centre: torch.Tensor, feat_index: torch.Tensor, n_feat_rows: int,
             n_atoms: int, atoms: torch.Tensor | None = None) -> CsrPlan | None:
    """``csr_plan`` memoized as ``_plan_for``; None (unsorted) is remembered too."""
    key = (tag + "-csr", n_feat_rows, n_atoms)
    plan = _PLANS.get(lists, key)
    if plan is None:
        plan = _PLANS.put(lists, (csr_plan(centre, feat_index, n_feat_rows, n_atoms, atoms),), key)
    return plan[0]


def native_wanted(x: torch.Tensor) -> bool:
    """Whether the contractions of x's terms use the native centre sum: x on the CPU in float32
    or float64, the kernels available, and no graph that will be differentiated twice (gradients
    off, or inside ``first_order()``: the native backward is not differentiable)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and (not torch.is_grad_enabled() or cpu_mlp.in_first_order())
            and cpu_native.library() is not None)


# -- the centre sum ------------------------------------------------------------------------------
def _rows(x: torch.Tensor, slots: torch.Tensor, n_rows: int, width: int) -> torch.Tensor:
    """x (K, D) laid out in rows, (R, width, D); ``slots`` (R · width,) as ``_padded``."""
    return _padded(x, slots).view(n_rows, width, x.shape[1])


class TermRows(torch.autograd.Function):
    """terms (T, C) laid out in the rows of ``layout``, (R, width, C), zeros in the padding.

    Backward reads each term's slot of d rows (a gather; autograd's own backward of the layout
    would scatter into a zeroed (T + 1, C)). ``by_channel``: d terms comes as the transposed view
    of a contiguous (C, T) tensor, read from d rows along the slots, which is free when d rows is
    itself the transposed view of a (R, C, width) tensor (as ``CentreSum`` returns it)."""

    @staticmethod
    def forward(ctx, terms: torch.Tensor, layout: RowLayout, by_channel: bool) -> torch.Tensor:
        ctx.layout, ctx.by_channel = layout, by_channel
        return _rows(terms, layout.slot_term, layout.row_atom.numel(), layout.width)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        layout = ctx.layout
        R, w, C = grad_rows.shape
        if ctx.by_channel:
            d_terms = grad_rows.permute(2, 0, 1).reshape(C, R * w).index_select(1, layout.term_slot).t()
        else:
            d_terms = grad_rows.reshape(R * w, C).index_select(0, layout.term_slot)
        return d_terms, None, None


class CentreSum(torch.autograd.Function):
    """out[i, c, f] = Σ_{rows r of atom i} Σ_s rows[r, s, c] · feat[slot_feat[r, s], f].

    Backward, with dX = d out (N, C, F) gathered per row, dX_r = dX[row_atom] (R, C, F):
    d rows = feat_rows @ dX_rᵀ (R, width, C); d feat_rows = rows @ dX_r (R, width, F), summed onto
    the feature rows → (K, F). Neither forms a (T × C × F) product. The rows of the terms are an
    input, not gathered here: the model's T passes share them (``AevTerms``), so that they are laid
    out, kept for backward and differentiated once."""

    @staticmethod
    def forward(ctx, t_rows: torch.Tensor, feat: torch.Tensor, plan: GatherPlan, n_atoms: int,
                by_channel: bool = False) -> torch.Tensor:
        layout = plan.layout
        n_rows, w = layout.row_atom.numel(), layout.width
        f_rows = _rows(feat, plan.slot_feat, n_rows, w)
        per_row = torch.bmm(t_rows.transpose(1, 2), f_rows)                  # (R, C, F)
        out = feat.new_zeros(n_atoms, t_rows.shape[2], feat.shape[1])
        out.index_add_(0, layout.row_atom, per_row)
        # The feature rows, for a backward that is not differentiated again (saves gathering them
        # twice).
        ctx.save_for_backward(t_rows, feat, f_rows)
        ctx.plan = plan
        ctx.by_channel = by_channel
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        t_rows, feat, f_rows = ctx.saved_tensors
        plan = ctx.plan
        layout = plan.layout
        n_rows, w = layout.row_atom.numel(), layout.width
        need_rows, need_feat = ctx.needs_input_grad[:2]
        g_rows = grad_out.index_select(0, layout.row_atom)                   # (R, C, F)
        d_rows = d_feat = None
        if need_rows:
            # Under create_graph the feature rows are gathered again from the saved input, so that
            # the double backward reaches feat; the forward's carry no history.
            if torch.is_grad_enabled():
                f_rows = _rows(feat, plan.slot_feat, n_rows, w)
            if ctx.by_channel:
                d_rows = torch.bmm(g_rows, f_rows.transpose(1, 2)).transpose(1, 2)  # (R, w, C) view
            else:
                d_rows = torch.bmm(f_rows, g_rows.transpose(1, 2))          # (R, w, C)
        if need_feat:
            d_slots = torch.bmm(t_rows, g_rows).view(-1, feat.shape[1])     # (R · w, F)
            # the padding slots read row K: summed there, then dropped
            d_feat = feat.new_zeros(feat.shape[0] + 1, feat.shape[1]) \
                .index_add(0, plan.slot_feat, d_slots)[:-1]
        return d_rows, d_feat, None, None, None


def centre_sum(terms: torch.Tensor, feat: torch.Tensor, plan: GatherPlan, n_atoms: int, *,
               grad_by_channel: bool = False) -> torch.Tensor:
    """out[i, c, f] = Σ_{t: centre(t) = i} terms[t, c] · feat[feat_index[t], f] → (N, C, F).

    ``terms`` (T, C), ``feat`` (K, F); ``plan`` from ``gather_plan`` over the same T terms, their
    centres and feature indices. ``grad_by_channel``: the gradient of ``terms`` comes as the
    transposed view of a contiguous (C, T) tensor (for a backward that works along T)."""
    t_rows = TermRows.apply(terms, plan.layout, grad_by_channel)
    return CentreSum.apply(t_rows, feat, plan, n_atoms, grad_by_channel)


class NativeCentreSum(torch.autograd.Function):
    """``centre_sum`` by the native kernels on terms (T, C) sorted by centre (``CsrPlan``): no
    rows, no gathers; the backward reads the saved terms and features. Not differentiable twice
    (``native_wanted`` keeps it to where no graph is differentiated again)."""

    @staticmethod
    def forward(ctx, terms: torch.Tensor, feat: torch.Tensor, plan: CsrPlan,
                by_channel: bool) -> torch.Tensor:
        ctx.save_for_backward(terms, feat)
        ctx.plan, ctx.by_channel = plan, by_channel
        return cpu_native.centre_sum(terms, feat, plan.ptr, plan.feat_index)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cpu_mlp.refuse_double_backward("native centre sum")
        terms, feat = ctx.saved_tensors
        d_terms, d_feat = cpu_native.centre_sum_backward(terms, feat, ctx.plan.ptr,
                                                         ctx.plan.feat_index, grad_out,
                                                         *ctx.needs_input_grad[:2], ctx.by_channel)
        return d_terms, d_feat, None, None


def _contract(terms: torch.Tensor, feat: torch.Tensor, plan, n_atoms: int,
              by_channel: bool) -> torch.Tensor:
    """The centre sum of terms laid out for ``plan``: rows (R, width, C) for a ``GatherPlan``,
    (T, C) for a ``CsrPlan``."""
    terms = terms.to(feat.dtype)
    if not isinstance(plan, CsrPlan):
        return CentreSum.apply(terms, feat, plan, n_atoms, by_channel)
    if cpu_native.supports(terms, feat):
        return NativeCentreSum.apply(terms, feat, plan, by_channel)
    # features the kernels do not take (not 16 per row): the sum as the reference writes it
    per_term = terms[:, :, None] * feat.index_select(0, plan.feat_index)[:, None, :]
    return per_term.new_zeros(n_atoms, *per_term.shape[1:]).index_add(0, plan.centre, per_term)


# -- the AEV terms -------------------------------------------------------------------------------
def _cutoff_slope(d: torch.Tensor, cutoff_A: float) -> torch.Tensor:
    """dfc/dd (1/Å) of ``aev.cosine_cutoff`` at d (Å): zero beyond the cutoff, as the
    reference's clamp makes it."""
    x = d / cutoff_A
    return (-0.5 * math.pi / cutoff_A) * torch.sin(math.pi * x.clamp(max=1.0)) * (x <= 1.0)


def _norm(r: torch.Tensor) -> torch.Tensor:
    """|r| (T,) of r (T, 3), from its columns: on the CPU several times faster than ``norm(dim=1)``
    over the short rows."""
    x, y, z = r.unbind(1)
    return torch.sqrt(x * x + y * y + z * z)


class _AngularParts(NamedTuple):
    """The factors of g_a, all recomputable from r_ij, r_ik, with the triplets along the last
    dimension: distances (T,) Å, cos θ before and after the clamp, sin θ, the cutoffs fc(d_ij),
    fc(d_ik), the sector bases b = 1 + cos(θ − θ_z) (8, T) and ang = b^8, the mean distance minus
    the shifts (4, T) Å and rad = exp(−η · that²)."""
    d_ij: torch.Tensor
    d_ik: torch.Tensor
    cos_raw: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    fc_ij: torch.Tensor
    fc_ik: torch.Tensor
    base: torch.Tensor
    ang: torch.Tensor
    shifted: torch.Tensor
    rad: torch.Tensor


def _angular_parts(r_ij: torch.Tensor, r_ik: torch.Tensor) -> _AngularParts:
    # (8, T) and (4, T), not (T, 8) and (T, 4): elementwise work over a long contiguous last
    # dimension vectorizes, over 8 or 4 it does not (several times slower on the CPU)
    d_ij, d_ik = _norm(r_ij), _norm(r_ik)
    cos_raw = (r_ij[:, 0] * r_ik[:, 0] + r_ij[:, 1] * r_ik[:, 1] + r_ij[:, 2] * r_ik[:, 2]) \
        / (d_ij * d_ik)
    cos = cos_raw.clamp(-COS_CLAMP, COS_CLAMP)
    sin = torch.sqrt(1.0 - cos * cos)
    cs = _SECTORS_COS_SIN.to(r_ij)
    base = 1.0 + cs[:, :1] * cos + cs[:, 1:] * sin                          # (8, T)
    a = base * base
    a = a * a
    ang = a * a                                                             # (1 + cos(θ − θ_z))^8
    shifted = 0.5 * (d_ij + d_ik) - _ANGULAR_SHIFTS.to(r_ij)[:, None]        # (4, T)
    rad = torch.exp(-ANGULAR_ETA_PER_A2 * shifted.square())
    fc_ij = cosine_cutoff(d_ij, ANGULAR_CUTOFF_A)
    fc_ik = cosine_cutoff(d_ik, ANGULAR_CUTOFF_A)
    return _AngularParts(d_ij, d_ik, cos_raw, cos, sin, fc_ij, fc_ik, base, ang, shifted, rad)


def _angular_backward(r_ij: torch.Tensor, r_ik: torch.Tensor, p: _AngularParts,
                      grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d r_ij, d r_ik (T, 3) from d g_a (T, 32), g[t, z·4 + a] = fc[t] · ang[z, t] · rad[a, t]
    with fc = 2^(1−ζ) fc(d_ij) fc(d_ik)."""
    n_z, n_a, n = p.ang.shape[0], p.rad.shape[0], p.ang.shape[1]
    # (8, 4, T), as the parts; no copy where the gradient comes from TermRows(by_channel)
    g = grad.t().contiguous().view(n_z, n_a, n)
    # Σ_a dG · rad (8, T) and Σ_z dG · ang (4, T) as sums of rows: a product over the whole
    # (8, 4, T) and a reduction would each pass over it once more
    by_sector = g[:, 0] * p.rad[0]
    for a in range(1, n_a):
        by_sector = torch.addcmul(by_sector, g[:, a], p.rad[a])
    by_shell = g[0] * p.ang[0]
    for z in range(1, n_z):
        by_shell = torch.addcmul(by_shell, g[z], p.ang[z])
    fc = _ANGULAR_SCALE * p.fc_ij * p.fc_ik
    d_fc = _ANGULAR_SCALE * (by_sector * p.ang).sum(0)                      # d fc(d_ij) fc(d_ik)
    b2 = p.base * p.base
    d_base = (8.0 * fc) * by_sector * (b2 * b2 * b2 * p.base)               # fc · Σ_a dG rad · 8b^7
    # d/d cos θ of cos θ cos θ_z + sqrt(1 − cos²θ) sin θ_z is cos θ_z − (cos θ / sin θ) sin θ_z
    cs = _SECTORS_COS_SIN.to(grad)
    d_cos = ((d_base * cs[:, :1]).sum(0) - (d_base * cs[:, 1:]).sum(0) * p.cos / p.sin) \
        * (p.cos_raw.abs() <= COS_CLAMP)                                    # clamped: no gradient
    # mean distance m: d m = fc · Σ_a (Σ_z ang · dG) · rad · (−2η)(m − s_a)
    d_mean = (-2.0 * ANGULAR_ETA_PER_A2) * fc * (by_shell * p.rad * p.shifted).sum(0)
    d_dot = d_cos / (p.d_ij * p.d_ik)                                       # cos = dot / (d_ij d_ik)
    d_ij = 0.5 * d_mean + d_fc * _cutoff_slope(p.d_ij, ANGULAR_CUTOFF_A) * p.fc_ik \
        - d_cos * p.cos_raw / p.d_ij
    d_ik = 0.5 * d_mean + d_fc * p.fc_ij * _cutoff_slope(p.d_ik, ANGULAR_CUTOFF_A) \
        - d_cos * p.cos_raw / p.d_ik
    d_r_ij = d_dot[:, None] * r_ik + (d_ij / p.d_ij)[:, None] * r_ij
    d_r_ik = d_dot[:, None] * r_ij + (d_ik / p.d_ik)[:, None] * r_ik
    return d_r_ij, d_r_ik


class AngularTerms(torch.autograd.Function):
    """g_a (T, 32) from r_ij, r_ik (T, 3) Å, with the analytic backward ``_angular_backward``:
    d g reduced to the factors (8, T), (4, T), (T,), then to the distances and cos θ, then to the
    vectors."""

    @staticmethod
    def forward(ctx, r_ij: torch.Tensor, r_ik: torch.Tensor) -> torch.Tensor:
        p = _angular_parts(r_ij, r_ik)
        fc_ang = (_ANGULAR_SCALE * p.fc_ij * p.fc_ik) * p.ang                 # (8, T)
        # the one product in the (T, 8, 4) layout that centre_sum gathers rows from
        g = fc_ang.t().contiguous()[:, :, None] * p.rad.t().contiguous()[:, None, :]
        ctx.save_for_backward(r_ij, r_ik, *p)
        return g.view(g.shape[0], g.shape[1] * g.shape[2])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        r_ij, r_ik, *parts = ctx.saved_tensors
        # under create_graph, the factors again from the saved inputs, so that the double backward
        # differentiates them too; the forward's carry no history
        p = _angular_parts(r_ij, r_ik) if torch.is_grad_enabled() else _AngularParts(*parts)
        return _angular_backward(r_ij, r_ik, p, grad)


def angular_terms(r_ij: torch.Tensor, r_ik: torch.Tensor) -> torch.Tensor:
    """g_a (T, 32), channel c = z·4 + a, from the two bond vectors (T, 3) in Å: the reference's
    ``aev.angular_terms`` without arccos."""
    return AngularTerms.apply(r_ij, r_ik)


def _exp_floored(x: torch.Tensor) -> torch.Tensor:
    """exp(max(x, log(tiny) + 1)), tiny the smallest normal number of x's dtype: where exp(x)
    would underflow, e·tiny (3e-38 in float32) instead of 0 or a subnormal, a difference that no
    sum of terms of order 1e-8 or more can show.

    The radial Gaussians reach exp(−269); torch's vectorized float32 exp takes a path ~13 times
    slower where its result underflows (measured on this project's 2-core CPU). Never reached in
    float64 (floor −707)."""
    return torch.exp(x.clamp(min=_exp_floor(x.dtype)))


def _exp_floor(dtype: torch.dtype) -> float:
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _radial_parts(r: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """d (P,) Å, fc(d), d minus the shifts (P, 16) Å and the Gaussians exp(−η (d − s)²)."""
    d = _norm(r)
    shifted = d[:, None] - _RADIAL_SHIFTS.to(r)
    gauss = _exp_floored(-RADIAL_ETA_PER_A2 * shifted.square())
    return d, cosine_cutoff(d, RADIAL_CUTOFF_A), shifted, gauss


class RadialTerms(torch.autograd.Function):
    """g_r (P, 16) from the bond vectors r (P, 3) Å, as ``aev.radial_terms`` of their lengths;
    backward: d d = Σ_s dG · gauss · (fc · (−2η)(d − s) + fc'), then d r = d d · r / d."""

    @staticmethod
    def forward(ctx, r: torch.Tensor) -> torch.Tensor:
        d, fc, shifted, gauss = _radial_parts(r)
        ctx.save_for_backward(r, d, fc, shifted, gauss)
        return gauss * fc[:, None]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        r, *parts = ctx.saved_tensors
        # as AngularTerms.backward: recomputed under create_graph
        d, fc, shifted, gauss = _radial_parts(r) if torch.is_grad_enabled() else parts
        gg = grad * gauss
        d_d = fc * (-2.0 * RADIAL_ETA_PER_A2) * (gg * shifted).sum(1) \
            + _cutoff_slope(d, RADIAL_CUTOFF_A) * gg.sum(1)
        return (d_d / d)[:, None] * r


@functools.cache
def _native_constants(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The radial shifts (16,), the angular sectors' cos and sin (8, 2) and shifts (4,) in dtype."""
    return tuple(t.to(dtype).contiguous() for t in (_RADIAL_SHIFTS, _SECTORS_COS_SIN, _ANGULAR_SHIFTS))


def native_radial_terms(coord: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``RadialTerms`` of the pairs (2, P) at coord (N, 3) Å by the native kernels, bond vectors
    and all: g (P, 16)."""
    return cpu_native.radial_terms(coord, pairs, _native_constants(coord.dtype)[0],
                                   RADIAL_ETA_PER_A2, RADIAL_CUTOFF_A, _exp_floor(coord.dtype))


def native_radial_terms_backward(coord: torch.Tensor, pairs: torch.Tensor,
                                 d_g: torch.Tensor) -> torch.Tensor:
    """d coord (N, 3) from d g (P, 16) of ``native_radial_terms``, recomputed from the
    coordinates."""
    return cpu_native.radial_terms_backward(coord, pairs, _native_constants(coord.dtype)[0],
                                            RADIAL_ETA_PER_A2, RADIAL_CUTOFF_A,
                                            _exp_floor(coord.dtype), d_g)


def native_angular_terms(coord: torch.Tensor, triplets: torch.Tensor) -> torch.Tensor:
    """``AngularTerms`` of the triplets (3, T) at coord (N, 3) Å by the native kernels: g (T, 32)."""
    _, sectors, shifts = _native_constants(coord.dtype)
    return cpu_native.angular_terms(coord, triplets, sectors, shifts, ANGULAR_ETA_PER_A2,
                                    ANGULAR_CUTOFF_A, COS_CLAMP, _ANGULAR_SCALE)


def native_angular_terms_backward(coord: torch.Tensor, triplets: torch.Tensor,
                                  d_g: torch.Tensor) -> torch.Tensor:
    """d coord (N, 3) from d g (T, 32) of ``native_angular_terms`` (any strides)."""
    _, sectors, shifts = _native_constants(coord.dtype)
    return cpu_native.angular_terms_backward(coord, triplets, sectors, shifts, ANGULAR_ETA_PER_A2,
                                             ANGULAR_CUTOFF_A, COS_CLAMP, _ANGULAR_SCALE, d_g)


class NativeRadialTerms(torch.autograd.Function):
    """``native_radial_terms`` as an autograd Function: backward d coord, recomputed from the
    coordinates. Not differentiable twice (used where ``native_wanted``)."""

    @staticmethod
    def forward(ctx, coord: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(coord, pairs)
        return native_radial_terms(coord, pairs)

    @staticmethod
    def backward(ctx, d_g: torch.Tensor):
        cpu_mlp.refuse_double_backward("native radial terms")
        coord, pairs = ctx.saved_tensors
        return native_radial_terms_backward(coord, pairs, d_g), None


class NativeAngularTerms(torch.autograd.Function):
    """``native_angular_terms`` as an autograd Function: backward d coord. Not differentiable
    twice."""

    @staticmethod
    def forward(ctx, coord: torch.Tensor, triplets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(coord, triplets)
        return native_angular_terms(coord, triplets)

    @staticmethod
    def backward(ctx, d_g: torch.Tensor):
        cpu_mlp.refuse_double_backward("native angular terms")
        coord, triplets = ctx.saved_tensors
        return native_angular_terms_backward(coord, triplets, d_g), None


class AevTerms(NamedTuple):
    """The AEV terms of one neighbor list, laid out for the centre sums. They depend on the
    coordinates alone: the model's T passes contract the same terms with other features, so they
    are computed, laid out, kept for backward and differentiated once per forward instead of once
    per pass. ``radial`` and ``angular`` with autograd history to the coordinates, laid out for
    their ``plans``: in rows, (R, width, 16) and (R', width', 32), for ``GatherPlan``s; as they
    are, (P, 16) and (T, 32), for the native sum's ``CsrPlan``s. ``lists`` the index tensors they
    belong to (radial pairs, triplets), checked by identity when used."""
    radial: torch.Tensor
    angular: torch.Tensor
    plans: tuple[GatherPlan | CsrPlan, GatherPlan | CsrPlan]
    lists: tuple[torch.Tensor, torch.Tensor]


def _radial_plan(pairs: torch.Tensor, n_atoms: int, native: bool) -> GatherPlan | CsrPlan:
    """The native sum's plan where ``native`` and the pairs are sorted by centre, else the rows'."""
    plan = _csr_for(pairs, "radial", pairs[0], pairs[1], n_atoms, n_atoms) if native else None
    return plan or _plan_for(pairs, "radial", pairs[0], pairs[1], n_atoms, n_atoms,
                             RADIAL_ROW_WIDTH)


def _angular_plan(triplets: torch.Tensor, triplet_pair: torch.Tensor, n_pairs: int,
                  n_atoms: int, native: bool) -> GatherPlan | CsrPlan:
    lists = (triplets, triplet_pair)
    plan = _csr_for(lists, "angular", triplets[0], triplet_pair, n_pairs, n_atoms,
                    triplets[1:]) if native else None
    return plan or _plan_for(lists, "angular", triplets[0], triplet_pair, n_pairs, n_atoms,
                             ANGULAR_ROW_WIDTH)


def native_plans(nb, n_atoms: int) -> tuple[CsrPlan, CsrPlan] | None:
    """The native sums' plans of ``nb``'s radial pairs and triplets (a ``Neighbors`` of n_atoms
    atoms), as ``aev_terms`` makes them where ``native_wanted``; None where either list is not
    sorted by centre. Needs the native kernels."""
    plans = (_radial_plan(nb.radial, n_atoms, True),
             _angular_plan(nb.triplets, nb.triplet_pair, nb.pairs.shape[1], n_atoms, True))
    return plans if all(isinstance(p, CsrPlan) for p in plans) else None


def _radial_rows(coord: torch.Tensor, pairs: torch.Tensor, plan) -> torch.Tensor:
    if isinstance(plan, CsrPlan):  # the native sums' plan: the native terms too
        return NativeRadialTerms.apply(coord, pairs)
    g = RadialTerms.apply(coord.index_select(0, pairs[1]) - coord.index_select(0, pairs[0]))
    return TermRows.apply(g, plan.layout, False)


def _angular_rows(coord: torch.Tensor, triplets: torch.Tensor, plan) -> torch.Tensor:
    if isinstance(plan, CsrPlan):
        return NativeAngularTerms.apply(coord, triplets)
    r_i = coord.index_select(0, triplets[0])
    g = angular_terms(coord.index_select(0, triplets[1]) - r_i,
                      coord.index_select(0, triplets[2]) - r_i)
    # by channel: AngularTerms' backward works along the triplets
    return TermRows.apply(g, plan.layout, True)


def aev_terms(coord: torch.Tensor, nb) -> AevTerms:
    """The terms of ``nb`` (a ``Neighbors``) at coord (N, 3) Å, for ``radial_contract`` and
    ``angular_contract``'s ``terms``."""
    n = coord.shape[0]
    native = native_wanted(coord)
    plans = (_radial_plan(nb.radial, n, native),
             _angular_plan(nb.triplets, nb.triplet_pair, nb.pairs.shape[1], n, native))
    return AevTerms(_radial_rows(coord, nb.radial, plans[0]),
                    _angular_rows(coord, nb.triplets, plans[1]), plans, (nb.radial, nb.triplets))


def _given(terms: AevTerms, which: int, index: torch.Tensor, plan) -> torch.Tensor:
    if terms.lists[which] is not index or terms.plans[which] is not plan:
        raise ValueError("AEV terms of another neighbor list: build them with aev_terms(coord, nb) "
                         "from the list passed here")
    return terms[which]


def radial_contract(coord: torch.Tensor, pairs: torch.Tensor, afv: torch.Tensor,
                    terms: AevTerms | None = None) -> torch.Tensor:
    """x_r[i, s, f] = Σ_j g_r[i, s, j] · afv[j, f]: coord (N, 3) Å, pairs (2, P), afv (N, F)
    → (N, 16, F), as ``aev.radial_contract``; the terms from ``terms`` when given (built by
    ``aev_terms`` for these pairs), else from coord."""
    n = coord.shape[0]
    native = native_wanted(coord) if terms is None else isinstance(terms.plans[0], CsrPlan)
    plan = _radial_plan(pairs, n, native)
    rows = _radial_rows(coord, pairs, plan) if terms is None else _given(terms, 0, pairs, plan)
    return _contract(rows, afv, plan, n, False)


def angular_contract(coord: torch.Tensor, triplets: torch.Tensor, pair_feat: torch.Tensor,
                     triplet_pair: torch.Tensor, terms: AevTerms | None = None) -> torch.Tensor:
    """x_a[i, c, f] = Σ_{j<k} g_a[i, c, jk] · p_jk[f]: coord (N, 3) Å, triplets (3, T),
    pair_feat (Q, F), triplet_pair (T,) → (N, 32, F), as ``aev.angular_contract``; the terms as
    ``radial_contract``'s."""
    n = coord.shape[0]
    native = native_wanted(coord) if terms is None else isinstance(terms.plans[1], CsrPlan)
    plan = _angular_plan(triplets, triplet_pair, pair_feat.shape[0], n, native)
    rows = _angular_rows(coord, triplets, plan) if terms is None \
        else _given(terms, 1, triplets, plan)
    return _contract(rows, pair_feat, plan, n, True)
