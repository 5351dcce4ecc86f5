"""Angular AEV fused with its contraction over pair features, in Triton.

x_a[i, c, f] = Σ_{j<k} g_a(i; j, k)[c] · p_jk[f], channel c = z·4 + a, with
g_a = 2^(1−ζ) (1 + cos(θ_ijk − θ_z))^ζ · exp(−η ((r_ij + r_ik)/2 − R_a)²) · fc(r_ij) fc(r_ik),
same math and signature as ``aimnet_fast.aev.angular_contract``. cos θ is clamped to ±0.99999 as in
the reference; cos(θ − θ_z) = cos θ cos θ_z + sin θ sin θ_z with sin θ = sqrt(1 − cos²θ) ≥ 0 (θ in
[0, π]) is the same function without arccos. g_a is computed in registers, never stored.

- forward: one program per (centre atom, feature tile) walks the centre's triplets (sorted by i).
- backward, three deterministic kernels, no atomics:
  1. per centre atom: dL/dg from grad_out[i]·p_jk, then per triplet the gradients wrt the two bond
     vectors r_ij, r_ik (written, 6 numbers per triplet) and their sum onto the centre;
  2. per unique pair: grad p_jk = Σ over the triplets of that pair (stably sorted by pair) of
     Σ_c g_a[c] · grad_out[i, c];
  3. per atom: its centre part plus the bond-vector gradients of the triplets where it is j or k
     (stably sorted by j and by k).
- double backward (force training): the same three-kernel pattern on the bond-vector level
  (``angular_bwd2_centre_kernel`` with a forward-mode derivative of the per-triplet gradient,
  ``angular_bwd2_gout_kernel``, the pair kernel with TANGENT, the gather kernel); no third
  derivative.

Shapes: coord (N, 3) Å; triplets (3, T) int64 rows i, j, k (j<k), sorted by i; pair_feat (Q, F);
triplet_pair (T,) int64 into pair_feat → (N, 32, F) in pair_feat's dtype (float32 or float64,
same as coord).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from aimnet_fast.constants import (ANGULAR_CUTOFF_A, ANGULAR_ETA_PER_A2, ANGULAR_SECTORS_RAD,
                                   ANGULAR_SHIFTS_A, ANGULAR_ZETA, COS_CLAMP, N_ANGULAR)

from . import _alloc
from ._aev_common import (check_inputs, check_triplets, cosine_cutoff, cosine_cutoff_grad,
                          cosine_cutoff_grad2, csr_starts, group_by)
from ._op_chain import contraction_ops

# The kernels rebuild the tables as θ_z = z·π/4 and R_a = 0.5 + 0.65·a, and raise to the power ζ = 8
# by three squarings; make sure those are the model's constants.
_NZ, _NA = len(ANGULAR_SECTORS_RAD), len(ANGULAR_SHIFTS_A)
assert (_NZ, _NA, N_ANGULAR, ANGULAR_ZETA) == (8, 4, 32, 8.0)
assert all(abs(t - z * math.pi / 4) < 1e-15 for z, t in enumerate(ANGULAR_SECTORS_RAD))
assert all(abs(r - (0.5 + 0.65 * a)) < 1e-15 for a, r in enumerate(ANGULAR_SHIFTS_A))
RC = tl.constexpr(ANGULAR_CUTOFF_A)
ETA = tl.constexpr(ANGULAR_ETA_PER_A2)
CLAMP = tl.constexpr(COS_CLAMP)
SCALE = tl.constexpr(2.0 ** (1.0 - ANGULAR_ZETA))
NC = tl.constexpr(N_ANGULAR)
NA = tl.constexpr(_NA)
SQRT_HALF = tl.constexpr(math.sqrt(0.5))

BLOCK_T = 16   # triplets per step of the list walk
BLOCK_F = 16   # features per program (the model has F = 16)
# The pair backward holds grad_out of BLOCK_T centres (BLOCK_T × 32 × BLOCK_F): 16 spills registers
# in float32 on sm_90 (ptxas -v), 8 does not.
BLOCK_T_BWD = 8
# float64 takes two registers per value: it needs shorter steps not to spill.
BLOCK_T_FP64, BLOCK_T_BWD_FP64 = 4, 4
# The double backward holds about twice the backward's values per triplet.
BLOCK_T_BWD2, BLOCK_T_BWD2_FP64 = 8, 2


@triton.jit
def _channel_tables(dtype: tl.constexpr):
    """cos θ_z, sin θ_z and R_a (Å) for the 32 channels c = z·4 + a, each (32,)."""
    # cos and sin of z·π/4 are 0, ±1 or ±sqrt(1/2): selects instead of 64 calls to libdevice per
    # program. Built on a tensor so that the constants keep the compute dtype.
    c = tl.arange(0, NC)
    z = c // NA
    one = tl.zeros((NC,), dtype) + 1.0
    half = one * SQRT_HALF
    cz = tl.where(z % 2 == 1, half, tl.where(z % 4 == 0, one, one * 0.0))
    sz = tl.where(z % 2 == 1, half, tl.where(z % 4 == 2, one, one * 0.0))
    cz = tl.where((z >= 3) & (z <= 5), -cz, cz)
    sz = tl.where(z >= 5, -sz, sz)
    return cz, sz, (c % NA).to(dtype) * 0.65 + 0.5


@triton.jit
def _bond_vectors(coord_ptr, i, j, k, mask):
    """r_ij, r_ik (Å, three (T,) components each) and their lengths; padded lanes get length 1.
    i may be one centre (scalar) or one per triplet."""
    i = j * 0 + i
    xi = tl.load(coord_ptr + i * 3 + 0, mask=mask, other=0.0)
    yi = tl.load(coord_ptr + i * 3 + 1, mask=mask, other=0.0)
    zi = tl.load(coord_ptr + i * 3 + 2, mask=mask, other=0.0)
    ax = tl.load(coord_ptr + j * 3 + 0, mask=mask, other=0.0) - xi
    ay = tl.load(coord_ptr + j * 3 + 1, mask=mask, other=0.0) - yi
    az = tl.load(coord_ptr + j * 3 + 2, mask=mask, other=0.0) - zi
    bx = tl.load(coord_ptr + k * 3 + 0, mask=mask, other=0.0) - xi
    by = tl.load(coord_ptr + k * 3 + 1, mask=mask, other=0.0) - yi
    bz = tl.load(coord_ptr + k * 3 + 2, mask=mask, other=0.0) - zi
    d1 = tl.where(mask, tl.sqrt(ax * ax + ay * ay + az * az), 1.0)
    d2 = tl.where(mask, tl.sqrt(bx * bx + by * by + bz * bz), 1.0)
    return ax, ay, az, bx, by, bz, d1, d2


@triton.jit
def _clamp_cos(cos0):
    # tl.minimum would turn the bare constant into float32 (0.99998999): build it in cos0's dtype.
    lim = tl.zeros_like(cos0) + CLAMP
    return tl.minimum(tl.maximum(cos0, -lim), lim)


@triton.jit
def _angular_g(ax, ay, az, bx, by, bz, d1, d2, cz, sz, shift):
    """g_a (T, 32) from the bond vectors."""
    cos0 = (ax * bx + ay * by + az * bz) / (d1 * d2)
    cc = _clamp_cos(cos0)
    sn = tl.sqrt(1.0 - cc * cc)
    base = 1.0 + cc[:, None] * cz[None, :] + sn[:, None] * sz[None, :]
    b2 = base * base
    b4 = b2 * b2
    x = (d1 + d2)[:, None] * 0.5 - shift[None, :]
    rad = tl.exp((x * x) * (-ETA))
    fc = cosine_cutoff(d1, RC) * cosine_cutoff(d2, RC) * SCALE
    return (b4 * b4) * rad * fc[:, None]


@triton.jit
def _angular_vjp(ax, ay, az, bx, by, bz, d1, d2, cz, sz, shift, h):
    """Given h = dL/dg_a (T, 32), the gradients dL/dr_ij and dL/dr_ik (three (T,) each, per Å)."""
    cos0 = (ax * bx + ay * by + az * bz) / (d1 * d2)
    cc = _clamp_cos(cos0)
    sn = tl.sqrt(1.0 - cc * cc)
    base = 1.0 + cc[:, None] * cz[None, :] + sn[:, None] * sz[None, :]
    b2 = base * base
    b4 = b2 * b2
    ang = b4 * b4
    dang = (b4 * b2 * base) * 8.0 * (cz[None, :] - (cc / sn)[:, None] * sz[None, :])
    x = (d1 + d2)[:, None] * 0.5 - shift[None, :]
    rad = tl.exp((x * x) * (-ETA))
    fc1 = cosine_cutoff(d1, RC)
    fc2 = cosine_cutoff(d2, RC)
    fc = fc1 * fc2 * SCALE
    hr = h * rad
    s_ang = tl.sum(hr * ang, axis=1) * SCALE                   # dL/d(fc1·fc2)
    dl_dcos = tl.sum(hr * dang, axis=1) * fc
    dl_dcos = tl.where(cc == cos0, dl_dcos, 0.0)
    dl_dmean = tl.sum(hr * ang * x, axis=1) * fc * (-2.0 * ETA)
    dl_dd1 = s_ang * cosine_cutoff_grad(d1, RC) * fc2 + 0.5 * dl_dmean
    dl_dd2 = s_ang * fc1 * cosine_cutoff_grad(d2, RC) + 0.5 * dl_dmean
    inv12 = dl_dcos / (d1 * d2)
    u1 = dl_dd1 / d1 - dl_dcos * cos0 / (d1 * d1)
    u2 = dl_dd2 / d2 - dl_dcos * cos0 / (d2 * d2)
    return (u1 * ax + inv12 * bx, u1 * ay + inv12 * by, u1 * az + inv12 * bz,
            u2 * bx + inv12 * ax, u2 * by + inv12 * ay, u2 * bz + inv12 * az)


@triton.jit
def _store_bond_grads(dv_ptr, offs_t, mask_t, gax, gay, gaz, gbx, gby, gbz):
    """Write the gradients wrt the two bond vectors a = r_j − r_i, b = r_k − r_i to dv (T, 6) and
    return their sum per component, which the centre atom i receives with a minus sign."""
    tl.store(dv_ptr + offs_t * 6 + 0, gax, mask=mask_t)
    tl.store(dv_ptr + offs_t * 6 + 1, gay, mask=mask_t)
    tl.store(dv_ptr + offs_t * 6 + 2, gaz, mask=mask_t)
    tl.store(dv_ptr + offs_t * 6 + 3, gbx, mask=mask_t)
    tl.store(dv_ptr + offs_t * 6 + 4, gby, mask=mask_t)
    tl.store(dv_ptr + offs_t * 6 + 5, gbz, mask=mask_t)
    return (tl.where(mask_t, gax + gbx, 0.0), tl.where(mask_t, gay + gby, 0.0),
            tl.where(mask_t, gaz + gbz, 0.0))


@triton.jit
def _angular_g_tangent(ax, ay, az, bx, by, bz, tax, tay, taz, tbx, tby, tbz, d1, d2, cz, sz,
                       shift):
    """g_a (T, 32) and its directional derivative D = ∇g_a · (t_ij, t_ik) along bond-vector
    tangents t (three (T,) components each, Å)."""
    dot = ax * bx + ay * by + az * bz
    dot_t = tax * bx + tay * by + taz * bz + ax * tbx + ay * tby + az * tbz
    d1_t = (ax * tax + ay * tay + az * taz) / d1
    d2_t = (bx * tbx + by * tby + bz * tbz) / d2
    cos0 = dot / (d1 * d2)
    cos0_t = dot_t / (d1 * d2) - cos0 * (d1_t / d1 + d2_t / d2)
    cc = _clamp_cos(cos0)
    cc_t = tl.where(cc == cos0, cos0_t, 0.0)
    sn = tl.sqrt(1.0 - cc * cc)
    sn_t = -cc * cc_t / sn
    base = 1.0 + cc[:, None] * cz[None, :] + sn[:, None] * sz[None, :]
    base_t = cc_t[:, None] * cz[None, :] + sn_t[:, None] * sz[None, :]
    b2 = base * base
    b4 = b2 * b2
    ang = b4 * b4
    ang_t = (b4 * b2 * base) * base_t * 8.0
    x = (d1 + d2)[:, None] * 0.5 - shift[None, :]
    rad = tl.exp((x * x) * (-ETA))
    rad_t = rad * x * ((d1_t + d2_t) * 0.5)[:, None] * (-2.0 * ETA)
    fc1 = cosine_cutoff(d1, RC)
    fc2 = cosine_cutoff(d2, RC)
    fcp = fc1 * fc2 * SCALE
    fcp_t = (cosine_cutoff_grad(d1, RC) * d1_t * fc2 + fc1 * cosine_cutoff_grad(d2, RC) * d2_t) \
        * SCALE
    g = ang * rad * fcp[:, None]
    return g, (ang_t * rad + ang * rad_t) * fcp[:, None] + ang * rad * fcp_t[:, None]


@triton.jit
def _angular_vjp_tangent(ax, ay, az, bx, by, bz, tax, tay, taz, tbx, tby, tbz, d1, d2, cz, sz,
                         shift, h):
    """The directional derivative, along bond-vector tangents t, of _angular_vjp's result for a
    fixed h (T, 32): the Hessian of Σ_c h_c g_a[c] times t, as (dA (3), dB (3)) of (T,) each.
    Forward-mode differentiation of _angular_vjp line by line (x_t is the tangent of x)."""
    dot = ax * bx + ay * by + az * bz
    dot_t = tax * bx + tay * by + taz * bz + ax * tbx + ay * tby + az * tbz
    d1_t = (ax * tax + ay * tay + az * taz) / d1
    d2_t = (bx * tbx + by * tby + bz * tbz) / d2
    cos0 = dot / (d1 * d2)
    cos0_t = dot_t / (d1 * d2) - cos0 * (d1_t / d1 + d2_t / d2)
    cc = _clamp_cos(cos0)
    free = cc == cos0
    cc_t = tl.where(free, cos0_t, 0.0)
    sn = tl.sqrt(1.0 - cc * cc)
    sn_t = -cc * cc_t / sn
    base = 1.0 + cc[:, None] * cz[None, :] + sn[:, None] * sz[None, :]
    base_t = cc_t[:, None] * cz[None, :] + sn_t[:, None] * sz[None, :]
    b2 = base * base
    b4 = b2 * b2
    ang = b4 * b4
    p7 = b4 * b2 * base
    ang_t = p7 * base_t * 8.0
    slope = cz[None, :] - (cc / sn)[:, None] * sz[None, :]
    dang = p7 * 8.0 * slope
    # d(cc/sn) = cc_t / sn³ because sn² + cc² = 1
    dang_t = (b4 * b2) * base_t * slope * 56.0 - p7 * 8.0 * (cc_t / (sn * sn * sn))[:, None] \
        * sz[None, :]
    x = (d1 + d2)[:, None] * 0.5 - shift[None, :]
    x_t = ((d1_t + d2_t) * 0.5)[:, None]
    rad = tl.exp((x * x) * (-ETA))
    rad_t = rad * x * x_t * (-2.0 * ETA)
    fc1 = cosine_cutoff(d1, RC)
    fc2 = cosine_cutoff(d2, RC)
    dfc1 = cosine_cutoff_grad(d1, RC)
    dfc2 = cosine_cutoff_grad(d2, RC)
    fcp = fc1 * fc2 * SCALE
    fcp_t = (dfc1 * d1_t * fc2 + fc1 * dfc2 * d2_t) * SCALE
    hr = h * rad
    hr_t = h * rad_t
    s_ang = tl.sum(hr * ang, axis=1) * SCALE
    s_ang_t = tl.sum(hr_t * ang + hr * ang_t, axis=1) * SCALE
    s_cos = tl.sum(hr * dang, axis=1)
    s_cos_t = tl.sum(hr_t * dang + hr * dang_t, axis=1)
    dl_dcos = tl.where(free, s_cos * fcp, 0.0)
    dl_dcos_t = tl.where(free, s_cos_t * fcp + s_cos * fcp_t, 0.0)
    s_mean = tl.sum(hr * ang * x, axis=1)
    s_mean_t = tl.sum((hr_t * ang + hr * ang_t) * x + hr * ang * x_t, axis=1)
    dl_dmean = s_mean * fcp * (-2.0 * ETA)
    dl_dmean_t = (s_mean_t * fcp + s_mean * fcp_t) * (-2.0 * ETA)
    ddfc1 = cosine_cutoff_grad2(d1, RC)
    ddfc2 = cosine_cutoff_grad2(d2, RC)
    dl_dd1 = s_ang * dfc1 * fc2 + 0.5 * dl_dmean
    dl_dd1_t = s_ang_t * dfc1 * fc2 + s_ang * ddfc1 * d1_t * fc2 + s_ang * dfc1 * dfc2 * d2_t \
        + 0.5 * dl_dmean_t
    dl_dd2 = s_ang * fc1 * dfc2 + 0.5 * dl_dmean
    dl_dd2_t = s_ang_t * fc1 * dfc2 + s_ang * dfc1 * d1_t * dfc2 + s_ang * fc1 * ddfc2 * d2_t \
        + 0.5 * dl_dmean_t
    inv12 = dl_dcos / (d1 * d2)
    inv12_t = dl_dcos_t / (d1 * d2) - inv12 * (d1_t / d1 + d2_t / d2)
    u1 = dl_dd1 / d1 - dl_dcos * cos0 / (d1 * d1)
    u1_t = dl_dd1_t / d1 - dl_dd1 * d1_t / (d1 * d1) \
        - (dl_dcos_t * cos0 + dl_dcos * cos0_t) / (d1 * d1) \
        + 2.0 * dl_dcos * cos0 * d1_t / (d1 * d1 * d1)
    u2 = dl_dd2 / d2 - dl_dcos * cos0 / (d2 * d2)
    u2_t = dl_dd2_t / d2 - dl_dd2 * d2_t / (d2 * d2) \
        - (dl_dcos_t * cos0 + dl_dcos * cos0_t) / (d2 * d2) \
        + 2.0 * dl_dcos * cos0 * d2_t / (d2 * d2 * d2)
    return (u1_t * ax + u1 * tax + inv12_t * bx + inv12 * tbx,
            u1_t * ay + u1 * tay + inv12_t * by + inv12 * tby,
            u1_t * az + u1 * taz + inv12_t * bz + inv12 * tbz,
            u2_t * bx + u2 * tbx + inv12_t * ax + inv12 * tax,
            u2_t * by + u2 * tby + inv12_t * ay + inv12 * tay,
            u2_t * bz + u2 * tbz + inv12_t * az + inv12 * taz)


@triton.jit
def angular_fwd_kernel(coord_ptr, trip_ptr, tp_ptr, start_ptr, pf_ptr, out_ptr, T, F,
                       BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    """out[i, c, f] for one centre atom i = program 0 and one feature tile = program 1."""
    i = tl.program_id(0).to(tl.int64)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    cz, sz, shift = _channel_tables(coord_ptr.dtype.element_ty)
    t_lo = tl.load(start_ptr + i)
    t_hi = tl.load(start_ptr + i + 1)
    acc = tl.zeros((NC, BLOCK_F), dtype=out_ptr.dtype.element_ty)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_hi
        j = tl.load(trip_ptr + T + offs_t, mask=mask_t, other=0).to(tl.int64)
        k = tl.load(trip_ptr + 2 * T + offs_t, mask=mask_t, other=0).to(tl.int64)
        q = tl.load(tp_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        ax, ay, az, bx, by, bz, d1, d2 = _bond_vectors(coord_ptr, i, j, k, mask_t)
        g = _angular_g(ax, ay, az, bx, by, bz, d1, d2, cz, sz, shift)
        g = tl.where(mask_t[:, None], g, 0.0)
        p = tl.load(pf_ptr + q[:, None] * F + offs_f[None, :],
                    mask=mask_t[:, None] & mask_f[None, :], other=0.0)
        acc += tl.sum(g[:, :, None] * p[:, None, :], axis=0)
    c = tl.arange(0, NC)
    tl.store(out_ptr + i * (NC * F) + c[:, None] * F + offs_f[None, :], acc, mask=mask_f[None, :])


@triton.jit
def angular_bwd_centre_kernel(coord_ptr, trip_ptr, tp_ptr, start_ptr, pf_ptr, gout_ptr, dv_ptr,
                              gcentre_ptr, T, F, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    """For centre atom i: dL/dr_ij, dL/dr_ik of each of its triplets into dv (T, 6), and
    −Σ (dL/dr_ij + dL/dr_ik) into gcentre[i] (3,)."""
    i = tl.program_id(0).to(tl.int64)
    cz, sz, shift = _channel_tables(coord_ptr.dtype.element_ty)
    c = tl.arange(0, NC)
    t_lo = tl.load(start_ptr + i)
    t_hi = tl.load(start_ptr + i + 1)
    gx = tl.zeros((BLOCK_T,), dtype=gcentre_ptr.dtype.element_ty)
    gy = tl.zeros((BLOCK_T,), dtype=gcentre_ptr.dtype.element_ty)
    gz = tl.zeros((BLOCK_T,), dtype=gcentre_ptr.dtype.element_ty)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_hi
        j = tl.load(trip_ptr + T + offs_t, mask=mask_t, other=0).to(tl.int64)
        k = tl.load(trip_ptr + 2 * T + offs_t, mask=mask_t, other=0).to(tl.int64)
        q = tl.load(tp_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        h = tl.zeros((BLOCK_T, NC), dtype=gcentre_ptr.dtype.element_ty)
        for f0 in range(0, F, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            mask_f = offs_f < F
            p = tl.load(pf_ptr + q[:, None] * F + offs_f[None, :],
                        mask=mask_t[:, None] & mask_f[None, :], other=0.0)
            go = tl.load(gout_ptr + i * (NC * F) + c[:, None] * F + offs_f[None, :],
                         mask=mask_f[None, :], other=0.0)
            h += tl.sum(p[:, None, :] * go[None, :, :], axis=2).to(h.dtype)
        h = tl.where(mask_t[:, None], h, 0.0)
        ax, ay, az, bx, by, bz, d1, d2 = _bond_vectors(coord_ptr, i, j, k, mask_t)
        gax, gay, gaz, gbx, gby, gbz = _angular_vjp(ax, ay, az, bx, by, bz, d1, d2, cz, sz, shift,
                                                    h)
        cx, cy, cz_ = _store_bond_grads(dv_ptr, offs_t, mask_t, gax, gay, gaz, gbx, gby, gbz)
        gx -= cx
        gy -= cy
        gz -= cz_
    tl.store(gcentre_ptr + i * 3 + 0, tl.sum(gx, axis=0))
    tl.store(gcentre_ptr + i * 3 + 1, tl.sum(gy, axis=0))
    tl.store(gcentre_ptr + i * 3 + 2, tl.sum(gz, axis=0))


@triton.jit
def angular_bwd_pair_kernel(coord_ptr, trip_ptr, order_ptr, start_ptr, gout_ptr, v_ptr, gpf_ptr,
                            T, F, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
                            TANGENT: tl.constexpr):
    """grad pair_feat[q, f] = Σ_{triplets of pair q} Σ_c g_a[c] · grad_out[i, c, f], for one
    pair q = program 0 and one feature tile = program 1; the triplets of q are
    order[start[q]:start[q+1]]. With TANGENT (double backward), g_a is replaced by its
    directional derivative along the bond tangents v_j − v_i, v_k − v_i (v (N, 3))."""
    q = tl.program_id(0).to(tl.int64)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    cz, sz, shift = _channel_tables(coord_ptr.dtype.element_ty)
    c = tl.arange(0, NC)
    lo = tl.load(start_ptr + q)
    hi = tl.load(start_ptr + q + 1)
    acc = tl.zeros((BLOCK_F,), dtype=gpf_ptr.dtype.element_ty)
    for s0 in range(lo, hi, BLOCK_T):
        offs_s = s0 + tl.arange(0, BLOCK_T)
        mask_s = offs_s < hi
        t = tl.load(order_ptr + offs_s, mask=mask_s, other=0).to(tl.int64)
        i = tl.load(trip_ptr + t, mask=mask_s, other=0).to(tl.int64)
        j = tl.load(trip_ptr + T + t, mask=mask_s, other=0).to(tl.int64)
        k = tl.load(trip_ptr + 2 * T + t, mask=mask_s, other=0).to(tl.int64)
        ax, ay, az, bx, by, bz, d1, d2 = _bond_vectors(coord_ptr, i, j, k, mask_s)
        if TANGENT:
            tax, tay, taz, tbx, tby, tbz, n1, n2 = _bond_vectors(v_ptr, i, j, k, mask_s)
            _, g = _angular_g_tangent(ax, ay, az, bx, by, bz, tax, tay, taz, tbx, tby, tbz,
                                      d1, d2, cz, sz, shift)
        else:
            g = _angular_g(ax, ay, az, bx, by, bz, d1, d2, cz, sz, shift)
        g = tl.where(mask_s[:, None], g, 0.0)
        go = tl.load(gout_ptr + i[:, None, None] * (NC * F) + c[None, :, None] * F
                     + offs_f[None, None, :],
                     mask=mask_s[:, None, None] & mask_f[None, None, :], other=0.0)
        acc += tl.sum(tl.sum(g[:, :, None] * go, axis=1), axis=0)
    tl.store(gpf_ptr + q * F + offs_f, acc, mask=mask_f)


@triton.jit
def angular_bwd_gather_kernel(dv_ptr, gcentre_ptr, order_j_ptr, start_j_ptr, order_k_ptr,
                              start_k_ptr, gcoord_ptr, BLOCK_T: tl.constexpr):
    """grad coord[a] = gcentre[a] + Σ_{t: j_t = a} dL/dr_ij(t) + Σ_{t: k_t = a} dL/dr_ik(t)."""
    a = tl.program_id(0).to(tl.int64)
    gx = tl.zeros((BLOCK_T,), dtype=gcoord_ptr.dtype.element_ty)
    gy = tl.zeros((BLOCK_T,), dtype=gcoord_ptr.dtype.element_ty)
    gz = tl.zeros((BLOCK_T,), dtype=gcoord_ptr.dtype.element_ty)
    lo = tl.load(start_j_ptr + a)
    hi = tl.load(start_j_ptr + a + 1)
    for s0 in range(lo, hi, BLOCK_T):
        offs_s = s0 + tl.arange(0, BLOCK_T)
        mask_s = offs_s < hi
        t = tl.load(order_j_ptr + offs_s, mask=mask_s, other=0).to(tl.int64)
        gx += tl.load(dv_ptr + t * 6 + 0, mask=mask_s, other=0.0)
        gy += tl.load(dv_ptr + t * 6 + 1, mask=mask_s, other=0.0)
        gz += tl.load(dv_ptr + t * 6 + 2, mask=mask_s, other=0.0)
    lo = tl.load(start_k_ptr + a)
    hi = tl.load(start_k_ptr + a + 1)
    for s0 in range(lo, hi, BLOCK_T):
        offs_s = s0 + tl.arange(0, BLOCK_T)
        mask_s = offs_s < hi
        t = tl.load(order_k_ptr + offs_s, mask=mask_s, other=0).to(tl.int64)
        gx += tl.load(dv_ptr + t * 6 + 3, mask=mask_s, other=0.0)
        gy += tl.load(dv_ptr + t * 6 + 4, mask=mask_s, other=0.0)
        gz += tl.load(dv_ptr + t * 6 + 5, mask=mask_s, other=0.0)
    tl.store(gcoord_ptr + a * 3 + 0, tl.load(gcentre_ptr + a * 3 + 0) + tl.sum(gx, axis=0))
    tl.store(gcoord_ptr + a * 3 + 1, tl.load(gcentre_ptr + a * 3 + 1) + tl.sum(gy, axis=0))
    tl.store(gcoord_ptr + a * 3 + 2, tl.load(gcentre_ptr + a * 3 + 2) + tl.sum(gz, axis=0))


@triton.jit
def angular_bwd2_centre_kernel(coord_ptr, trip_ptr, tp_ptr, start_ptr, pf_ptr, u_ptr, v_ptr,
                               gout_ptr, dv_ptr, gcentre_ptr, T, F,
                               BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    """Double backward, coordinate part, for centre atom i. With S = <u, grad pair_feat> +
    <v, grad coord> (u (Q, F), v (N, 3) arrive at the first backward's results):
    S = Σ_t Σ_c [g_c k_c + D_c h_c], k_c = grad_out[i, c]·u[q], h_c = grad_out[i, c]·p[q],
    D the derivative of g along the bond tangents (v_j − v_i, v_k − v_i). Per triplet, its
    gradient wrt the two bond vectors (the vjp with k plus the Hessian-vector product with h) goes
    to dv (T, 6), and minus their sum to gcentre[i]."""
    i = tl.program_id(0).to(tl.int64)
    cz, sz, shift = _channel_tables(coord_ptr.dtype.element_ty)
    c = tl.arange(0, NC)
    t_lo = tl.load(start_ptr + i)
    t_hi = tl.load(start_ptr + i + 1)
    gx = tl.zeros((BLOCK_T,), dtype=gcentre_ptr.dtype.element_ty)
    gy = tl.zeros((BLOCK_T,), dtype=gcentre_ptr.dtype.element_ty)
    gz = tl.zeros((BLOCK_T,), dtype=gcentre_ptr.dtype.element_ty)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_hi
        j = tl.load(trip_ptr + T + offs_t, mask=mask_t, other=0).to(tl.int64)
        k = tl.load(trip_ptr + 2 * T + offs_t, mask=mask_t, other=0).to(tl.int64)
        q = tl.load(tp_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        h = tl.zeros((BLOCK_T, NC), dtype=gcentre_ptr.dtype.element_ty)
        kk = tl.zeros((BLOCK_T, NC), dtype=gcentre_ptr.dtype.element_ty)
        for f0 in range(0, F, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            mask_f = offs_f < F
            mask_tf = mask_t[:, None] & mask_f[None, :]
            p = tl.load(pf_ptr + q[:, None] * F + offs_f[None, :], mask=mask_tf, other=0.0)
            uq = tl.load(u_ptr + q[:, None] * F + offs_f[None, :], mask=mask_tf, other=0.0)
            go = tl.load(gout_ptr + i * (NC * F) + c[:, None] * F + offs_f[None, :],
                         mask=mask_f[None, :], other=0.0)
            h += tl.sum(p[:, None, :] * go[None, :, :], axis=2).to(h.dtype)
            kk += tl.sum(uq[:, None, :] * go[None, :, :], axis=2).to(kk.dtype)
        h = tl.where(mask_t[:, None], h, 0.0)
        kk = tl.where(mask_t[:, None], kk, 0.0)
        ax, ay, az, bx, by, bz, d1, d2 = _bond_vectors(coord_ptr, i, j, k, mask_t)
        tax, tay, taz, tbx, tby, tbz, n1, n2 = _bond_vectors(v_ptr, i, j, k, mask_t)
        kax, kay, kaz, kbx, kby, kbz = _angular_vjp(ax, ay, az, bx, by, bz, d1, d2, cz, sz,
                                                    shift, kk)
        hax, hay, haz, hbx, hby, hbz = _angular_vjp_tangent(ax, ay, az, bx, by, bz, tax, tay, taz,
                                                            tbx, tby, tbz, d1, d2, cz, sz, shift,
                                                            h)
        gax = kax + hax
        gay = kay + hay
        gaz = kaz + haz
        gbx = kbx + hbx
        gby = kby + hby
        gbz = kbz + hbz
        cx, cy, cz_ = _store_bond_grads(dv_ptr, offs_t, mask_t, gax, gay, gaz, gbx, gby, gbz)
        gx -= cx
        gy -= cy
        gz -= cz_
    tl.store(gcentre_ptr + i * 3 + 0, tl.sum(gx, axis=0))
    tl.store(gcentre_ptr + i * 3 + 1, tl.sum(gy, axis=0))
    tl.store(gcentre_ptr + i * 3 + 2, tl.sum(gz, axis=0))


@triton.jit
def angular_bwd2_gout_kernel(coord_ptr, trip_ptr, tp_ptr, start_ptr, pf_ptr, u_ptr, v_ptr,
                             ggout_ptr, T, F, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    """Double backward, gradient wrt grad_out[i, c, f] = Σ_t (g_c u[q_t, f] + D_c p[q_t, f]) for
    one centre atom i = program 0 and one feature tile = program 1 (shaped like the forward)."""
    i = tl.program_id(0).to(tl.int64)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    cz, sz, shift = _channel_tables(coord_ptr.dtype.element_ty)
    t_lo = tl.load(start_ptr + i)
    t_hi = tl.load(start_ptr + i + 1)
    acc = tl.zeros((NC, BLOCK_F), dtype=ggout_ptr.dtype.element_ty)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_hi
        j = tl.load(trip_ptr + T + offs_t, mask=mask_t, other=0).to(tl.int64)
        k = tl.load(trip_ptr + 2 * T + offs_t, mask=mask_t, other=0).to(tl.int64)
        q = tl.load(tp_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        ax, ay, az, bx, by, bz, d1, d2 = _bond_vectors(coord_ptr, i, j, k, mask_t)
        tax, tay, taz, tbx, tby, tbz, n1, n2 = _bond_vectors(v_ptr, i, j, k, mask_t)
        g, dg = _angular_g_tangent(ax, ay, az, bx, by, bz, tax, tay, taz, tbx, tby, tbz, d1, d2,
                                   cz, sz, shift)
        g = tl.where(mask_t[:, None], g, 0.0)
        dg = tl.where(mask_t[:, None], dg, 0.0)
        mask_tf = mask_t[:, None] & mask_f[None, :]
        p = tl.load(pf_ptr + q[:, None] * F + offs_f[None, :], mask=mask_tf, other=0.0)
        uq = tl.load(u_ptr + q[:, None] * F + offs_f[None, :], mask=mask_tf, other=0.0)
        acc += tl.sum(g[:, :, None] * uq[:, None, :] + dg[:, :, None] * p[:, None, :], axis=0)
    c = tl.arange(0, NC)
    tl.store(ggout_ptr + i * (NC * F) + c[:, None] * F + offs_f[None, :], acc,
             mask=mask_f[None, :])


# ---------------------------------------------------------------- launch functions (no policy)

def angular_forward(coord, triplets, triplet_pair, starts, pair_feat, block_t: int | None = None,
                    block_f: int = BLOCK_F):
    """Launch the forward. triplets (3, T) contiguous, starts (N + 1,) row starts of triplets[0]
    → (N, 32, F). block_t None: the default of the dtype."""
    n, f, t = coord.shape[0], pair_feat.shape[1], triplets.shape[1]
    block_t = block_t or (BLOCK_T_FP64 if pair_feat.dtype == torch.float64 else BLOCK_T)
    out = _alloc.empty((n, N_ANGULAR, f), pair_feat)
    if n and f:
        angular_fwd_kernel[(n, triton.cdiv(f, block_f))](coord, triplets, triplet_pair, starts,
                                                         pair_feat, out, t, f,
                                                         BLOCK_T=block_t, BLOCK_F=block_f)
    else:
        out.zero_()
    return out


def angular_backward(grad_out, coord, triplets, triplet_pair, pair_feat,
                     block_t: int | None = None, block_f: int = BLOCK_F, need_coord: bool = True,
                     need_pair_feat: bool = True):
    """Launch the backward kernels → (grad coord (N, 3), grad pair_feat (Q, F)); a gradient not
    needed is skipped (training on energies needs no coordinate gradient) and comes back as an
    empty (0,) tensor.

    Index preparation (stable sorts by pair, by j and by k; row starts) is done here with torch.
    """
    n, (nq, f), t = coord.shape[0], pair_feat.shape, triplets.shape[1]
    block_t = block_t or (BLOCK_T_BWD_FP64 if pair_feat.dtype == torch.float64 else BLOCK_T_BWD)
    gcoord = _alloc.empty(coord.shape if need_coord else (0,), coord)
    gpf = _alloc.empty(pair_feat.shape if need_pair_feat else (0,), pair_feat)
    if n == 0:
        return gcoord, gpf
    if need_coord:
        starts_i = csr_starts(triplets[0], n)
        order_j, starts_j = group_by(triplets[1], n)
        order_k, starts_k = group_by(triplets[2], n)
        dv = _alloc.empty((t, 6), coord)
        gcentre = _alloc.empty(coord.shape, coord)
        angular_bwd_centre_kernel[(n,)](coord, triplets, triplet_pair, starts_i, pair_feat,
                                        grad_out, dv, gcentre, t, f,
                                        BLOCK_T=block_t, BLOCK_F=block_f)
        angular_bwd_gather_kernel[(n,)](dv, gcentre, order_j, starts_j, order_k, starts_k, gcoord,
                                        BLOCK_T=block_t)
    if need_pair_feat and nq and f:
        order_q, starts_q = group_by(triplet_pair, nq)
        angular_bwd_pair_kernel[(nq, triton.cdiv(f, block_f))](coord, triplets, order_q, starts_q,
                                                               grad_out, coord, gpf, t, f,
                                                               BLOCK_T=block_t, BLOCK_F=block_f,
                                                               TANGENT=False)
    return gcoord, gpf


def angular_double_backward(grad_out, coord, triplets, triplet_pair, pair_feat, u, v,
                            block_t: int | None = None, block_f: int = BLOCK_F):
    """Launch the double backward: u (Q, F) and v (N, 3) are the gradients arriving at grad
    pair_feat and grad coord → gradients wrt (grad_out (N, 32, F), coord (N, 3),
    pair_feat (Q, F)). Deterministic, no atomics (same orderings as the backward)."""
    n, (nq, f), t = coord.shape[0], pair_feat.shape, triplets.shape[1]
    block_t = block_t or (BLOCK_T_BWD2_FP64 if pair_feat.dtype == torch.float64 else BLOCK_T_BWD2)
    ggout = _alloc.empty(grad_out.shape, grad_out)
    gcoord = _alloc.empty(coord.shape, coord)
    gpf = _alloc.empty(pair_feat.shape, pair_feat)
    if n == 0:
        return ggout, gcoord, gpf
    starts_i = csr_starts(triplets[0], n)
    order_j, starts_j = group_by(triplets[1], n)
    order_k, starts_k = group_by(triplets[2], n)
    dv = _alloc.empty((t, 6), coord)
    gcentre = _alloc.empty(coord.shape, coord)
    angular_bwd2_centre_kernel[(n,)](coord, triplets, triplet_pair, starts_i, pair_feat, u, v,
                                     grad_out, dv, gcentre, t, f,
                                     BLOCK_T=block_t, BLOCK_F=block_f)
    angular_bwd_gather_kernel[(n,)](dv, gcentre, order_j, starts_j, order_k, starts_k, gcoord,
                                    BLOCK_T=block_t)
    if f:
        angular_bwd2_gout_kernel[(n, triton.cdiv(f, block_f))](coord, triplets, triplet_pair,
                                                               starts_i, pair_feat, u, v, ggout,
                                                               t, f, BLOCK_T=block_t,
                                                               BLOCK_F=block_f)
    if nq and f:
        order_q, starts_q = group_by(triplet_pair, nq)
        angular_bwd_pair_kernel[(nq, triton.cdiv(f, block_f))](coord, triplets, order_q, starts_q,
                                                               grad_out, v, gpf, t, f,
                                                               BLOCK_T=block_t, BLOCK_F=block_f,
                                                               TANGENT=True)
    return ggout, gcoord, gpf


# ---------------------------------------------------------------- torch ops and autograd

def _forward_from_triplets(coord, triplets, pair_feat, triplet_pair):
    starts = csr_starts(triplets[0], coord.shape[0])
    return angular_forward(coord, triplets, triplet_pair, starts, pair_feat)


def _backward_from_triplets(grad_out, coord, triplets, pair_feat, triplet_pair, need_coord,
                            need_pair_feat):
    return angular_backward(grad_out, coord, triplets, triplet_pair, pair_feat,
                            need_coord=need_coord, need_pair_feat=need_pair_feat)


def _double_backward_from_triplets(grad_out, coord, triplets, pair_feat, triplet_pair, u, v):
    return angular_double_backward(grad_out, coord, triplets, triplet_pair, pair_feat, u, v)


_OPS = contraction_ops("angular_contract", ("coord", "triplets", "pair_feat", "triplet_pair"),
                       "pair_feat", _forward_from_triplets, _backward_from_triplets,
                       _double_backward_from_triplets,
                       out_shape=lambda coord, triplets, pair_feat, triplet_pair:
                       (coord.shape[0], N_ANGULAR, pair_feat.shape[1]))
_angular_op = _OPS.forward


def angular_contract(coord: torch.Tensor, triplets: torch.Tensor, pair_feat: torch.Tensor,
                     triplet_pair: torch.Tensor) -> torch.Tensor:
    """x_a[i, c, f] = Σ_{j<k} g_a(i; j, k)[c] · pair_feat[jk, f].

    coord (N, 3) Å; triplets (3, T) int64 rows i, j, k, sorted by i; pair_feat (Q, F) in coord's
    dtype; triplet_pair (T,) int64 → (N, 32, F). Differentiable twice in coord and pair_feat
    (force training). A list not sorted by i, or an index out of range, raises ValueError (checked
    once per list tensor, outside CUDA-graph capture).
    """
    check_inputs("angular_contract", coord, pair_feat)
    check_triplets("angular_contract", triplets, triplet_pair, coord.shape[0], pair_feat.shape[0])
    return _angular_op(coord.contiguous(), triplets.contiguous(), pair_feat.contiguous(),
                       triplet_pair.contiguous())
