"""Radial AEV fused with its contraction over neighbor features, in Triton.

x_r[i, s, f] = Σ_j g_r(r_ij)[s] · afv[j, f], with g_r(r)[s] = exp(−η (r − R_s)²) · fc(r; 4.6 Å):
same math and signature as ``aimnet_fast.aev.radial_contract``. g_r is computed on the fly in
registers and never written to memory.

- forward: one program per (atom, feature tile) walks the atom's CSR neighbor list.
- backward: one program per atom walks its own list once and gathers both gradients. g_r is
  symmetric in (i, j) and the list holds both directions, so grad afv[j] = Σ_i Σ_s g_r(r_ij)[s]·
  grad_out[i, s] is a gather over j's own list, and each atom collects the coordinate gradient of
  both directions of its pairs itself: no atomics, deterministic.
- double backward (force training): one more kernel per atom over its own list, same pattern
  (``radial_bwd2_kernel``); no third derivative.

Shapes: coord (N, 3) Å; pairs (2, P) int64 ordered (i, j), sorted by i, both directions present;
afv (N, F) → (N, 16, F), in the dtype of afv (float32 or float64, same as coord).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from aimnet_fast.constants import N_RADIAL, RADIAL_CUTOFF_A, RADIAL_ETA_PER_A2, RADIAL_SHIFTS_A

from . import _alloc
from ._aev_common import (check_inputs, check_pairs, cosine_cutoff, cosine_cutoff_grad,
                          cosine_cutoff_grad2, csr_starts)
from ._op_chain import contraction_ops

# The kernels rebuild the shells as R0 + DR·s; make sure that is the model's table.
_R0, _DR = 0.5, 0.25625
assert N_RADIAL == 16
assert all(abs(r - (_R0 + _DR * s)) < 1e-15 for s, r in enumerate(RADIAL_SHIFTS_A))
RC = tl.constexpr(RADIAL_CUTOFF_A)
ETA = tl.constexpr(RADIAL_ETA_PER_A2)
R0 = tl.constexpr(_R0)
DR = tl.constexpr(_DR)
NS = tl.constexpr(N_RADIAL)

BLOCK_P = 16   # neighbors per step of the list walk
BLOCK_F = 16   # features per program (the model has F = 16)
# The backward holds grad_out of BLOCK_P neighbors (BLOCK_P × 16 × BLOCK_F): 16 spills registers
# in float32 on sm_90 (ptxas -v), 8 does not.
BLOCK_P_BWD = 8
# float64 takes two registers per value: its backward needs shorter steps not to spill.
BLOCK_P_FP64, BLOCK_P_BWD_FP64 = 16, 4
# The double backward holds twice the backward's tiles.
BLOCK_P_BWD2, BLOCK_P_BWD2_FP64 = 4, 2


@triton.jit
def _radial_g(d):
    """g (P, 16) for distances d (P,) in Å."""
    shift = tl.arange(0, NS).to(d.dtype) * DR + R0
    x = d[:, None] - shift[None, :]
    return tl.exp((x * x) * (-ETA)) * cosine_cutoff(d, RC)[:, None]


@triton.jit
def _radial_terms(d):
    """g (P, 16) and dg/dd (P, 16, Å⁻¹) for distances d (P,) in Å."""
    shift = tl.arange(0, NS).to(d.dtype) * DR + R0
    x = d[:, None] - shift[None, :]
    gauss = tl.exp((x * x) * (-ETA))
    fc = cosine_cutoff(d, RC)
    dfc = cosine_cutoff_grad(d, RC)
    return gauss * fc[:, None], gauss * (dfc[:, None] - x * fc[:, None] * (2.0 * ETA))


@triton.jit
def _radial_terms2(d):
    """g, dg/dd and d²g/dd² (P, 16 each) for distances d (P,) in Å."""
    shift = tl.arange(0, NS).to(d.dtype) * DR + R0
    x = d[:, None] - shift[None, :]
    gauss = tl.exp((x * x) * (-ETA))
    dgauss = gauss * x * (-2.0 * ETA)
    d2gauss = gauss * (x * x * (4.0 * ETA * ETA) - 2.0 * ETA)
    fc = cosine_cutoff(d, RC)[:, None]
    dfc = cosine_cutoff_grad(d, RC)[:, None]
    d2fc = cosine_cutoff_grad2(d, RC)[:, None]
    return gauss * fc, dgauss * fc + gauss * dfc, d2gauss * fc + 2.0 * dgauss * dfc + gauss * d2fc


@triton.jit
def _pair_geometry(coord_ptr, nbr_ptr, offs_p, mask_p, xi, yi, zi):
    """Neighbor indices j (P,), bond vector r_j − r_i (Å) and its length; padded lanes get d = 1."""
    j = tl.load(nbr_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    dx = tl.load(coord_ptr + j * 3 + 0, mask=mask_p, other=0.0) - xi
    dy = tl.load(coord_ptr + j * 3 + 1, mask=mask_p, other=0.0) - yi
    dz = tl.load(coord_ptr + j * 3 + 2, mask=mask_p, other=0.0) - zi
    d = tl.sqrt(dx * dx + dy * dy + dz * dz)
    d = tl.where(mask_p, d, 1.0)
    return j, dx, dy, dz, d


@triton.jit
def radial_fwd_kernel(coord_ptr, nbr_ptr, start_ptr, afv_ptr, out_ptr, F,
                      BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr):
    """out[i, s, f] for one atom i = program 0 and one feature tile = program 1."""
    i = tl.program_id(0).to(tl.int64)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    xi = tl.load(coord_ptr + i * 3 + 0)
    yi = tl.load(coord_ptr + i * 3 + 1)
    zi = tl.load(coord_ptr + i * 3 + 2)
    p_lo = tl.load(start_ptr + i)
    p_hi = tl.load(start_ptr + i + 1)
    acc = tl.zeros((NS, BLOCK_F), dtype=out_ptr.dtype.element_ty)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < p_hi
        j, dx, dy, dz, d = _pair_geometry(coord_ptr, nbr_ptr, offs_p, mask_p, xi, yi, zi)
        g = tl.where(mask_p[:, None], _radial_g(d), 0.0)
        a = tl.load(afv_ptr + j[:, None] * F + offs_f[None, :],
                    mask=mask_p[:, None] & mask_f[None, :], other=0.0)
        acc += tl.sum(g[:, :, None] * a[:, None, :], axis=0)
    s = tl.arange(0, NS)
    tl.store(out_ptr + i * (NS * F) + s[:, None] * F + offs_f[None, :], acc, mask=mask_f[None, :])


@triton.jit
def radial_bwd_kernel(coord_ptr, nbr_ptr, start_ptr, afv_ptr, gout_ptr, gafv_ptr, gcoord_ptr, F,
                      BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr, NEED_COORD: tl.constexpr,
                      NEED_AFV: tl.constexpr):
    """grad afv[i, :] and grad coord[i, :] for one atom i, from its own neighbor list (each only
    when its NEED_ flag is set: training on energies needs no coordinate gradient).

    With c_ij[s] = grad_out[i, s]·afv[j] and c_ji[s] = grad_out[j, s]·afv[i], the pair's distance
    gets dL/dr_ij = Σ_s g'_s(r_ij)(c_ij[s] + c_ji[s]) from both directions, and atom i gets
    −dL/dr_ij · (r_j − r_i)/r_ij.
    """
    i = tl.program_id(0).to(tl.int64)
    xi = tl.load(coord_ptr + i * 3 + 0)
    yi = tl.load(coord_ptr + i * 3 + 1)
    zi = tl.load(coord_ptr + i * 3 + 2)
    p_lo = tl.load(start_ptr + i)
    p_hi = tl.load(start_ptr + i + 1)
    s = tl.arange(0, NS)
    gx = tl.zeros((BLOCK_P,), dtype=gcoord_ptr.dtype.element_ty)
    gy = tl.zeros((BLOCK_P,), dtype=gcoord_ptr.dtype.element_ty)
    gz = tl.zeros((BLOCK_P,), dtype=gcoord_ptr.dtype.element_ty)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        if NEED_COORD:
            a_i = tl.load(afv_ptr + i * F + offs_f, mask=mask_f, other=0.0)
            go_i = tl.load(gout_ptr + i * (NS * F) + s[:, None] * F + offs_f[None, :],
                           mask=mask_f[None, :], other=0.0)
        acc_a = tl.zeros((BLOCK_F,), dtype=gafv_ptr.dtype.element_ty)
        for p0 in range(p_lo, p_hi, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < p_hi
            j, dx, dy, dz, d = _pair_geometry(coord_ptr, nbr_ptr, offs_p, mask_p, xi, yi, zi)
            mask_pf = mask_p[:, None] & mask_f[None, :]
            go_j = tl.load(gout_ptr + j[:, None, None] * (NS * F) + s[None, :, None] * F
                           + offs_f[None, None, :], mask=mask_pf[:, None, :], other=0.0)
            if NEED_COORD:
                g, dg = _radial_terms(d)
            else:
                g = _radial_g(d)
            if NEED_AFV:
                g = tl.where(mask_p[:, None], g, 0.0)
                acc_a += tl.sum(tl.sum(g[:, :, None] * go_j, axis=1), axis=0)
            if NEED_COORD:
                a_j = tl.load(afv_ptr + j[:, None] * F + offs_f[None, :], mask=mask_pf, other=0.0)
                c = tl.sum(go_i[None, :, :] * a_j[:, None, :] + go_j * a_i[None, None, :], axis=2)
                w = tl.sum(dg * c, axis=1)
                w = tl.where(mask_p, w / d, 0.0)
                gx -= w * dx
                gy -= w * dy
                gz -= w * dz
        if NEED_AFV:
            tl.store(gafv_ptr + i * F + offs_f, acc_a, mask=mask_f)
    if NEED_COORD:
        tl.store(gcoord_ptr + i * 3 + 0, tl.sum(gx, axis=0))
        tl.store(gcoord_ptr + i * 3 + 1, tl.sum(gy, axis=0))
        tl.store(gcoord_ptr + i * 3 + 2, tl.sum(gz, axis=0))


@triton.jit
def radial_bwd2_kernel(coord_ptr, nbr_ptr, start_ptr, afv_ptr, gout_ptr, u_ptr, v_ptr,
                       ggout_ptr, gafv_ptr, gcoord_ptr, F,
                       BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr):
    """Double backward for one atom i, from its own neighbor list: the gradients wrt grad_out[i],
    afv[i] and coord[i] of S = <u, grad afv> + <v, grad coord> (u (N, F) and v (N, 3) arrive at
    the first backward's results; grad_out is what the first backward received).

    Per pair, with r = |r_j − r_i|, û = (r_j − r_i)/r, μ = (v_j − v_i)·û, c_ij[s] =
    grad_out[i, s]·afv[j], e_ij[s] = grad_out[i, s]·u[j]:
      <v, grad coord> = Σ_{pairs} μ Σ_s g'_s (c_ij + c_ji),  <u, grad afv> = Σ_{i,j} Σ_s g_s e_ij.
    """
    i = tl.program_id(0).to(tl.int64)
    xi = tl.load(coord_ptr + i * 3 + 0)
    yi = tl.load(coord_ptr + i * 3 + 1)
    zi = tl.load(coord_ptr + i * 3 + 2)
    vxi = tl.load(v_ptr + i * 3 + 0)
    vyi = tl.load(v_ptr + i * 3 + 1)
    vzi = tl.load(v_ptr + i * 3 + 2)
    p_lo = tl.load(start_ptr + i)
    p_hi = tl.load(start_ptr + i + 1)
    s = tl.arange(0, NS)
    gx = tl.zeros((BLOCK_P,), dtype=gcoord_ptr.dtype.element_ty)
    gy = tl.zeros((BLOCK_P,), dtype=gcoord_ptr.dtype.element_ty)
    gz = tl.zeros((BLOCK_P,), dtype=gcoord_ptr.dtype.element_ty)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        a_i = tl.load(afv_ptr + i * F + offs_f, mask=mask_f, other=0.0)
        u_i = tl.load(u_ptr + i * F + offs_f, mask=mask_f, other=0.0)
        go_i = tl.load(gout_ptr + i * (NS * F) + s[:, None] * F + offs_f[None, :],
                       mask=mask_f[None, :], other=0.0)
        acc_go = tl.zeros((NS, BLOCK_F), dtype=ggout_ptr.dtype.element_ty)
        acc_a = tl.zeros((BLOCK_F,), dtype=gafv_ptr.dtype.element_ty)
        for p0 in range(p_lo, p_hi, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < p_hi
            j, dx, dy, dz, d = _pair_geometry(coord_ptr, nbr_ptr, offs_p, mask_p, xi, yi, zi)
            g, dg, d2g = _radial_terms2(d)
            g = tl.where(mask_p[:, None], g, 0.0)
            dg = tl.where(mask_p[:, None], dg, 0.0)
            d2g = tl.where(mask_p[:, None], d2g, 0.0)
            ux = dx / d
            uy = dy / d
            uz = dz / d
            mu = (tl.load(v_ptr + j * 3 + 0, mask=mask_p, other=0.0) - vxi) * ux \
                + (tl.load(v_ptr + j * 3 + 1, mask=mask_p, other=0.0) - vyi) * uy \
                + (tl.load(v_ptr + j * 3 + 2, mask=mask_p, other=0.0) - vzi) * uz
            mu = tl.where(mask_p, mu, 0.0)
            mask_pf = mask_p[:, None] & mask_f[None, :]
            a_j = tl.load(afv_ptr + j[:, None] * F + offs_f[None, :], mask=mask_pf, other=0.0)
            u_j = tl.load(u_ptr + j[:, None] * F + offs_f[None, :], mask=mask_pf, other=0.0)
            go_j = tl.load(gout_ptr + j[:, None, None] * (NS * F) + s[None, :, None] * F
                           + offs_f[None, None, :], mask=mask_pf[:, None, :], other=0.0)
            mdg = dg * mu[:, None]
            acc_go += tl.sum(g[:, :, None] * u_j[:, None, :] + mdg[:, :, None] * a_j[:, None, :],
                             axis=0)
            acc_a += tl.sum(tl.sum(mdg[:, :, None] * go_j, axis=1), axis=0)
            c = tl.sum(go_i[None, :, :] * a_j[:, None, :] + go_j * a_i[None, None, :], axis=2)
            e = tl.sum(go_i[None, :, :] * u_j[:, None, :] + go_j * u_i[None, None, :], axis=2)
            w_u = tl.sum(dg * e, axis=1)        # d<u, grad afv>/dr
            w = tl.sum(dg * c, axis=1)          # d(first-order energy)/dr
            w2 = tl.sum(d2g * c, axis=1)
            # −d/dr_ij of (w_u·1 + μ w): radial parts along û, and μ's own dependence on û
            radial = w_u + mu * w2 - mu * w / d
            tangential = w / d
            gx -= radial * ux + tangential * (tl.load(v_ptr + j * 3 + 0, mask=mask_p, other=0.0)
                                              - vxi)
            gy -= radial * uy + tangential * (tl.load(v_ptr + j * 3 + 1, mask=mask_p, other=0.0)
                                              - vyi)
            gz -= radial * uz + tangential * (tl.load(v_ptr + j * 3 + 2, mask=mask_p, other=0.0)
                                              - vzi)
        tl.store(ggout_ptr + i * (NS * F) + s[:, None] * F + offs_f[None, :], acc_go,
                 mask=mask_f[None, :])
        tl.store(gafv_ptr + i * F + offs_f, acc_a, mask=mask_f)
    tl.store(gcoord_ptr + i * 3 + 0, tl.sum(gx, axis=0))
    tl.store(gcoord_ptr + i * 3 + 1, tl.sum(gy, axis=0))
    tl.store(gcoord_ptr + i * 3 + 2, tl.sum(gz, axis=0))


# ---------------------------------------------------------------- launch functions (no policy)

def radial_forward(coord, nbr, starts, afv, block_p: int | None = None, block_f: int = BLOCK_F):
    """Launch the forward. nbr = pairs[1] (P,), starts (N + 1,) CSR row starts → (N, 16, F).
    block_p None: the default of the dtype."""
    n, f = coord.shape[0], afv.shape[1]
    block_p = block_p or (BLOCK_P_FP64 if afv.dtype == torch.float64 else BLOCK_P)
    out = _alloc.empty((n, N_RADIAL, f), afv)
    if n and f:
        radial_fwd_kernel[(n, triton.cdiv(f, block_f))](coord, nbr, starts, afv, out, f,
                                                        BLOCK_P=block_p, BLOCK_F=block_f)
    else:
        out.zero_()
    return out


def radial_backward(grad_out, coord, nbr, starts, afv, block_p: int | None = None,
                    block_f: int = BLOCK_F, need_coord: bool = True, need_afv: bool = True):
    """Launch the backward → (grad coord (N, 3), grad afv (N, F)); a gradient not needed comes
    back as an empty (0,) tensor."""
    n, f = coord.shape[0], afv.shape[1]
    block_p = block_p or (BLOCK_P_BWD_FP64 if afv.dtype == torch.float64 else BLOCK_P_BWD)
    gcoord = _alloc.empty(coord.shape if need_coord else (0,), coord)
    gafv = _alloc.empty(afv.shape if need_afv else (0,), afv)
    if n and (need_coord or need_afv):
        radial_bwd_kernel[(n,)](coord, nbr, starts, afv, grad_out,
                                gafv if need_afv else afv, gcoord if need_coord else coord, f,
                                BLOCK_P=block_p, BLOCK_F=block_f, NEED_COORD=need_coord,
                                NEED_AFV=need_afv)
    return gcoord, gafv


def radial_double_backward(grad_out, coord, nbr, starts, afv, u, v, block_p: int | None = None,
                           block_f: int = BLOCK_F):
    """Launch the double backward: u (N, F), v (N, 3) are the gradients arriving at grad afv and
    grad coord → gradients wrt (grad_out (N, 16, F), coord (N, 3), afv (N, F))."""
    n, f = coord.shape[0], afv.shape[1]
    block_p = block_p or (BLOCK_P_BWD2_FP64 if afv.dtype == torch.float64 else BLOCK_P_BWD2)
    ggout = _alloc.empty(grad_out.shape, grad_out)
    gcoord = _alloc.empty(coord.shape, coord)
    gafv = _alloc.empty(afv.shape, afv)
    if n:
        radial_bwd2_kernel[(n,)](coord, nbr, starts, afv, grad_out, u, v, ggout, gafv, gcoord, f,
                                 BLOCK_P=block_p, BLOCK_F=block_f)
    return ggout, gcoord, gafv


# ---------------------------------------------------------------- torch ops and autograd

def _forward_from_pairs(coord, pairs, afv):
    return radial_forward(coord, pairs[1].contiguous(), csr_starts(pairs[0], coord.shape[0]), afv)


def _backward_from_pairs(grad_out, coord, pairs, afv, need_coord, need_afv):
    return radial_backward(grad_out, coord, pairs[1].contiguous(),
                           csr_starts(pairs[0], coord.shape[0]), afv,
                           need_coord=need_coord, need_afv=need_afv)


def _double_backward_from_pairs(grad_out, coord, pairs, afv, u, v):
    return radial_double_backward(grad_out, coord, pairs[1].contiguous(),
                                  csr_starts(pairs[0], coord.shape[0]), afv, u, v)


_OPS = contraction_ops("radial_contract", ("coord", "pairs", "afv"), "afv",
                       _forward_from_pairs, _backward_from_pairs, _double_backward_from_pairs,
                       out_shape=lambda coord, pairs, afv: (coord.shape[0], N_RADIAL, afv.shape[1]))
_radial_op = _OPS.forward


def radial_contract(coord: torch.Tensor, pairs: torch.Tensor, afv: torch.Tensor) -> torch.Tensor:
    """x_r[i, s, f] = Σ_j g_r(r_ij)[s] · afv[j, f].

    coord (N, 3) Å; pairs (2, P) int64 ordered (i, j), sorted by i, both directions present;
    afv (N, F) in coord's dtype → (N, 16, F). Differentiable twice in coord and afv (force
    training). A list that is not sorted by i or lacks a direction raises ValueError (checked once
    per list tensor, outside CUDA-graph capture).
    """
    check_inputs("radial_contract", coord, afv)
    check_pairs("radial_contract", pairs, coord.shape[0])
    return _radial_op(coord.contiguous(), pairs.contiguous(), afv.contiguous())
