"""Linear + bias + ELU layers as Triton matrix products, and the ELU MLP stack built from them.

One kernel, ``_matmul_kernel``, computes C (M, N) = op(A) (M, K) · B (K, N) with optional
- epilogue: + bias (N,), then ELU (α = 1), written as the layer's *output* y;
- prologue: A ← A ⊙ ELU′ where ELU′ = 1 for y > 0 and y + 1 otherwise, read from the saved output
  y laid out like A (the backward of an ELU layer without its pre-activation);
- bias gradient: the row sums of op(A) over the reduction, written by the first column of programs.

Forward of a layer (x (M, K), W (N, K) as in ``nn.Linear``, b (N,)):
  y = ELU(x · Wᵀ + b)                              one launch, epilogue fused
Backward (grad_y (M, N), saved y): grad_pre = grad_y ⊙ ELU′(y) is fused into the *prologue* of both
products that follow, never written to memory:
  grad_x = grad_pre · W                            A = grad_y (M, N),   B = W (N, K)
  grad_W = grad_preᵀ · x,  grad_b = Σ_rows grad_pre A = grad_yᵀ (N, M), B = x (M, K)
Both read grad_y and y in place (grad_yᵀ is a strided view), so a layer's backward is two launches.
The weight gradient has few output tiles and a long reduction over rows: on CUDA it is split over
the rows into enough programs for two per SM, and the partial products are summed afterwards
(deterministic; ``WEIGHT_GRAD_SPLIT_K`` overrides the choice).

``linear_elu_cat`` / ``elu_mlp_cat`` take [x1 ‖ x2] (e.g. [e ‖ a]) without building it: the K loop
reads columns < K1 from x1 and the rest from x2; the backward writes grad_W's two column blocks in
place and reads the weight's two column blocks in place.

Gradients of gradients (create_graph=True then backward again, e.g. a force loss) work: the
backward ops have an autograd formula in PyTorch ops (``_double_backward``), off the hot path.

Precision (``precision``): "ieee" (full float32 products), "tf32" (tensor-core TF32 inputs) or
"bf16" (inputs rounded to bfloat16); the accumulator is always float32 (float64 for float64
tensors, which allow only "ieee"). Under TRITON_INTERPRET=1 the product runs in numpy, so "tf32"
behaves like "ieee" there; "bf16" rounds the inputs in the interpreter as well.

Units: none (features). Shapes as above; M is the number of rows (atoms, pairs, …).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import nn

from . import _alloc

PRECISIONS = ("ieee", "tf32", "bf16")

# Tile sizes. Tests shrink them (to the tl.dot minimum of 16) so that small inputs straddle every
# tile boundary; the AOT report compiles the defaults. 64×64×32 with 4 warps spilled (up to 148 B)
# on sm_80 (ieee forward, ieee input gradient, every weight gradient) and on sm_90 (tf32 weight
# gradient: prologue + transposed A); with 8 warps no configuration spills (≤ 224 registers;
# bench/KERNELS.md).
BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
NUM_WARPS = 8
# The interpreter's bf16 tl.dot is unusable (see _round_bf16): emulate it there.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Slices of the row reduction in the weight-gradient kernel; None: enough programs for two per SM
# on CUDA, 1 elsewhere. Tests set it to exercise the split.
WEIGHT_GRAD_SPLIT_K: int | None = None


@triton.jit
def _round_bf16(x):
    """float32 → nearest bfloat16 (ties to even), kept in float32. Products of two such values are
    exact in float32, so a float32 product of rounded inputs equals the bf16 tensor-core result
    with float32 accumulation (up to summation order). Used under the interpreter, whose bf16
    tl.dot returns garbage in triton 3.9 and whose bf16 cast does not round to nearest."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, y_ptr, dbias_ptr, a2_ptr,
                   M, N, K, K1, K_SPLIT,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   stride_ym, stride_yk, stride_a2m, stride_a2k, stride_cs, stride_dbs,
                   SPLIT_A: tl.constexpr,
                   HAS_BIAS: tl.constexpr, EPILOGUE_ELU: tl.constexpr,
                   PROLOGUE_ELU_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
                   PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Split-K: program (.., .., s) reduces over [s·K_SPLIT, (s+1)·K_SPLIT) ∩ [0, K) and writes its
    # partial result at c_ptr + s·stride_cs (the host sums the partials; deterministic).
    pid_s = tl.program_id(2)
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    # int64 offsets: rows × stride can pass 2³¹ for large batches of wide layers.
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    y_rows = y_ptr + rm.to(tl.int64)[:, None] * stride_ym
    a2_rows = a2_ptr + rm.to(tl.int64)[:, None] * stride_a2m
    b_cols = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty)
    if BIAS_GRAD:
        dsum = tl.zeros((BLOCK_M,), dtype=c_ptr.dtype.element_ty)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < k_hi
        a_mask = mask_m[:, None] & mask_k[None, :]
        if SPLIT_A:
            # A = [A1 ‖ A2] read in place: columns < K1 from a_ptr, the rest from a2_ptr.
            a = tl.load(a_rows + kk.to(tl.int64)[None, :] * stride_ak,
                        mask=a_mask & (kk < K1)[None, :], other=0.0)
            a += tl.load(a2_rows + (kk - K1).to(tl.int64)[None, :] * stride_a2k,
                         mask=a_mask & (kk >= K1)[None, :], other=0.0)
        else:
            a = tl.load(a_rows + kk.to(tl.int64)[None, :] * stride_ak, mask=a_mask, other=0.0)
        if PROLOGUE_ELU_GRAD:
            y = tl.load(y_rows + kk.to(tl.int64)[None, :] * stride_yk, mask=a_mask, other=0.0)
            a = tl.where(y > 0, a, a * (y + 1.0))
        if BIAS_GRAD:
            dsum += tl.sum(a, axis=1)
        b = tl.load(b_cols + kk.to(tl.int64)[:, None] * stride_bk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if PRECISION == "bf16":
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=tl.float32)
        elif PRECISION == "bf16_emulated":
            acc = tl.dot(_round_bf16(a), _round_bf16(b), acc, input_precision="ieee")
        else:
            # out_dtype stated: triton 3.6 defaults it to float32 and rejects a float64 acc.
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0)[None, :]
    if EPILOGUE_ELU:
        # exp of the positive side is discarded; clamp it so it never overflows to inf. The clamp
        # must keep NaN (tl.minimum drops it by default), or a NaN input leaves as a finite 0.
        acc = tl.where(acc > 0, acc,
                       tl.exp(tl.minimum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)) - 1.0)
    c = c_ptr + pid_s.to(tl.int64) * stride_cs \
        + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
    tl.store(c, acc, mask=mask_m[:, None] & mask_n[None, :])
    if BIAS_GRAD:
        if pid_n == 0:
            tl.store(dbias_ptr + pid_s.to(tl.int64) * stride_dbs + rm, dsum, mask=mask_m)


def _check_dtypes(*tensors) -> None:
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) > 1:
        raise TypeError(f"elu_mlp kernels need one dtype for inputs, weights and biases, got "
                        f"{sorted(str(d) for d in dtypes)}")


def _check_precision(precision: str, dtype: torch.dtype) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"elu_mlp kernels take float32 or float64, got {dtype}")
    if dtype == torch.float64 and precision != "ieee":
        raise ValueError(f"precision {precision!r} is for float32 tensors; float64 runs 'ieee'")


def _split_k(tiles: int, K: int, device: torch.device) -> int:
    """How many slices of the reduction to give separate programs. The weight gradient has few
    output tiles (a 256×256 layer: 16 of 64×64) and a long reduction over the rows (thousands of
    atoms): without a split, most of the GPU's SMs would idle."""
    if WEIGHT_GRAD_SPLIT_K is not None:
        return max(1, min(WEIGHT_GRAD_SPLIT_K, triton.cdiv(K, BLOCKS["BLOCK_K"])))
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(target // max(tiles, 1), triton.cdiv(K, 8 * BLOCKS["BLOCK_K"])))


def _tiles(M: int, N: int) -> int:
    return triton.cdiv(M, BLOCKS["BLOCK_M"]) * triton.cdiv(N, BLOCKS["BLOCK_N"])


def _launch(a, a_strides, b, b_strides, c, M, N, K, *, bias=None, epilogue_elu=False,
            y=None, y_strides=(0, 0), dbias=None, precision="ieee", a2=None, k1=0, split=1):
    """C (M, N) = op(A) · B on views given by (row, reduction) strides of A and (reduction, col) of B.

    With ``a2`` (M, K − k1) row-major-like (its own strides), A = [a (M, k1) ‖ a2]. With
    ``split`` > 1 the reduction is cut into that many slices whose partial products (and partial
    bias gradients) are summed after the launch."""
    bm, bn, bk = BLOCKS["BLOCK_M"], BLOCKS["BLOCK_N"], BLOCKS["BLOCK_K"]
    if M == 0 or (N == 0 and dbias is None):
        return
    k_split = triton.cdiv(triton.cdiv(max(K, 1), split), bk) * bk
    split = max(1, triton.cdiv(K, k_split))
    out, out_b = c, dbias
    if split > 1:
        out = _alloc.empty((split, M, N), c)
        out_b = _alloc.empty((split, M), c) if dbias is not None else None
    # At least one column of programs even when N = 0, so a bias gradient is still written.
    grid = (triton.cdiv(M, bm), max(triton.cdiv(N, bn), 1), split)
    _matmul_kernel[grid](
        a, b, out, bias if bias is not None else out, y if y is not None else a,
        out_b if out_b is not None else out, a2 if a2 is not None else a,
        M, N, K, k1 if a2 is not None else K, k_split,
        a_strides[0], a_strides[1], b_strides[0], b_strides[1],
        out.stride(-2), out.stride(-1), y_strides[0], y_strides[1],
        a2.stride(0) if a2 is not None else 0, a2.stride(1) if a2 is not None else 0,
        out.stride(0) if split > 1 else 0, out_b.stride(0) if split > 1 and out_b is not None else 0,
        SPLIT_A=a2 is not None, HAS_BIAS=bias is not None, EPILOGUE_ELU=epilogue_elu,
        PROLOGUE_ELU_GRAD=y is not None, BIAS_GRAD=dbias is not None,
        PRECISION="bf16_emulated" if precision == "bf16" and _INTERPRET else precision,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=NUM_WARPS)
    if split > 1:
        c.copy_(out.sum(0))
        if dbias is not None:
            dbias.copy_(out_b.sum(0))


# -- one layer as a custom op ---------------------------------------------------------------------
@torch.library.custom_op("aimnet_fast::linear_elu", mutates_args=())
def linear_elu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], elu: bool,
               precision: str = "ieee") -> torch.Tensor:
    """y = ELU(x · weightᵀ + bias) (ELU only if ``elu``): x (M, K), weight (N, K), bias (N,) → (M, N)."""
    _check_precision(precision, x.dtype)
    _check_dtypes(x, weight, bias)
    x = x.contiguous()
    weight = weight.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    out = _alloc.empty((M, N), x)
    _launch(x, (x.stride(0), x.stride(1)), weight, (weight.stride(1), weight.stride(0)), out,
            M, N, K, bias=bias.contiguous() if bias is not None else None, epilogue_elu=elu,
            precision=precision)
    return out


@linear_elu.register_fake
def _(x, weight, bias, elu, precision="ieee"):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("aimnet_fast::linear_elu_backward", mutates_args=())
def linear_elu_backward(grad: torch.Tensor, out: torch.Tensor, x: torch.Tensor,
                        weight: torch.Tensor, elu: bool, need_input_grad: bool,
                        precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``linear_elu`` from grad (M, N) and the saved output ``out`` (M, N).

    Returns grad_x (M, K) (empty (0,) if not ``need_input_grad``), grad_weight (N, K), grad_bias (N,).
    """
    grad = grad.contiguous()
    x = x.contiguous()
    weight = weight.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    y = out if elu else None
    ys = (out.stride(0), out.stride(1))
    ys_t = (out.stride(1), out.stride(0))
    grad_w = _alloc.empty((N, K), x)
    grad_b = _alloc.empty((N,), x)
    # grad_W (N, K) = grad_preᵀ (N, M) · x (M, K); the same launch writes grad_b. An empty
    # reduction (M = 0) runs zero loop iterations and writes zeros. With K = 0, grad_W is empty
    # but grad_b is not: _launch keeps one column of programs so grad_b is still written.
    _launch(grad, (grad.stride(1), grad.stride(0)), x, (x.stride(0), x.stride(1)), grad_w,
            N, K, M, y=y, y_strides=ys_t, dbias=grad_b, precision=precision,
            split=_split_k(_tiles(N, K), M, x.device))
    if not need_input_grad:
        return x.new_empty(0), grad_w, grad_b
    grad_x = _alloc.empty((M, K), x)
    # grad_x (M, K) = grad_pre (M, N) · W (N, K)
    _launch(grad, (grad.stride(0), grad.stride(1)), weight, (weight.stride(0), weight.stride(1)),
            grad_x, M, K, N, y=y, y_strides=ys, precision=precision)
    return grad_x, grad_w, grad_b


@linear_elu_backward.register_fake
def _(grad, out, x, weight, elu, need_input_grad, precision="ieee"):
    grad_x = x.new_empty(x.shape) if need_input_grad else x.new_empty(0)
    return grad_x, weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, elu, precision = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.elu = elu
    ctx.precision = precision
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    grad_x, grad_w, grad_b = linear_elu_backward(grad, out, x, weight, ctx.elu, need_x,
                                                 ctx.precision)
    return (grad_x if need_x else None,
            grad_w if ctx.needs_input_grad[1] else None,
            grad_b if ctx.has_bias and ctx.needs_input_grad[2] else None, None, None)


linear_elu.register_autograd(_backward, setup_context=_setup_context)


# -- gradients of the backward (double backward, e.g. a force loss) -------------------------------
def _double_backward(grad, out, x, weight, elu, gg_x, gg_w, gg_b):
    """Gradients of (grad_x, grad_W, grad_b) = backward(grad, out, x, W) with respect to grad, out,
    x and W, given their upstream gradients gg_x (M, K) or None, gg_w (N, K), gg_b (N,).

    In PyTorch ops (differentiable again), not kernels: second order is off the hot path.
    With pre = grad ⊙ ELU′(out) and ELU′(out) = 1 (out > 0) or out + 1:
      G = gg_x · Wᵀ + x · gg_wᵀ + gg_b         (M, N), the gradient of pre
      d grad = G ⊙ ELU′(out),   d out = G ⊙ grad ⊙ [out ≤ 0],
      d x = pre · gg_w,         d W = preᵀ · gg_x.
    """
    d = torch.where(out > 0, torch.ones_like(out), out + 1.0) if elu else None
    pre = grad * d if elu else grad
    g = x.new_zeros(out.shape)
    if gg_w is not None:
        g = g + x @ gg_w.T
    if gg_b is not None:
        g = g + gg_b
    if gg_x is not None:
        g = g + gg_x @ weight.T
    d_grad = g * d if elu else g
    d_out = g * grad * (out <= 0).to(out.dtype) if elu else None
    d_x = pre @ gg_w if gg_w is not None else None
    d_w = pre.T @ gg_x if gg_x is not None else None
    return d_grad, d_out, d_x, d_w


def _setup_context_bwd(ctx, inputs, output):
    grad, out, x, weight, elu, need_input_grad, precision = inputs
    ctx.save_for_backward(grad, out, x, weight)
    ctx.elu = elu


def _backward_bwd(ctx, gg_x, gg_w, gg_b):
    grad, out, x, weight = ctx.saved_tensors
    gg_x = gg_x if gg_x is not None and gg_x.numel() == x.numel() and x.numel() else None
    d_grad, d_out, d_x, d_w = _double_backward(grad, out, x, weight, ctx.elu, gg_x, gg_w, gg_b)
    return d_grad, d_out, d_x, d_w, None, None, None


linear_elu_backward.register_autograd(_backward_bwd, setup_context=_setup_context_bwd)


# -- a layer on a concatenation [x1 ‖ x2], never materialized ----------------------------------------
@torch.library.custom_op("aimnet_fast::linear_elu_cat", mutates_args=())
def linear_elu_cat(x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], elu: bool, precision: str = "ieee") -> torch.Tensor:
    """``linear_elu(torch.cat([x1, x2], 1), ...)``: x1 (M, K1), x2 (M, K2), weight (N, K1 + K2)
    → (M, N). The kernel reads x1 and x2 in place (one product, the K loop switches source)."""
    _check_precision(precision, x1.dtype)
    _check_dtypes(x1, x2, weight, bias)
    x1, x2, weight = x1.contiguous(), x2.contiguous(), weight.contiguous()
    M, K1 = x1.shape
    K = K1 + x2.shape[1]
    if weight.shape[1] != K or x2.shape[0] != M:
        raise ValueError(f"shapes {tuple(x1.shape)} ‖ {tuple(x2.shape)} do not fit weight "
                         f"{tuple(weight.shape)}")
    N = weight.shape[0]
    out = _alloc.empty((M, N), x1)
    _launch(x1, (x1.stride(0), x1.stride(1)), weight, (weight.stride(1), weight.stride(0)), out,
            M, N, K, bias=bias.contiguous() if bias is not None else None, epilogue_elu=elu,
            precision=precision, a2=x2, k1=K1)
    return out


@linear_elu_cat.register_fake
def _(x1, x2, weight, bias, elu, precision="ieee"):
    return x1.new_empty(x1.shape[0], weight.shape[0])


@torch.library.custom_op("aimnet_fast::linear_elu_cat_backward", mutates_args=())
def linear_elu_cat_backward(grad: torch.Tensor, out: torch.Tensor, x1: torch.Tensor,
                            x2: torch.Tensor, weight: torch.Tensor, elu: bool,
                            need_input_grad: bool, precision: str = "ieee"
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_x1 (M, K1), grad_x2 (M, K2) (both empty (0,) unless ``need_input_grad``),
    grad_weight (N, K1 + K2), grad_bias (N,). Each column block of grad_weight is one launch of
    the weight-gradient kernel writing into its slice; grad_x1 and grad_x2 read the matching
    column blocks of the weight in place."""
    grad, x1, x2, weight = grad.contiguous(), x1.contiguous(), x2.contiguous(), weight.contiguous()
    M, K1 = x1.shape
    K2 = x2.shape[1]
    N = weight.shape[0]
    y = out if elu else None
    ys = (out.stride(0), out.stride(1))
    ys_t = (out.stride(1), out.stride(0))
    grad_w = _alloc.empty((N, K1 + K2), x1)
    grad_b = _alloc.empty((N,), x1)
    gw1, gw2 = grad_w[:, :K1], grad_w[:, K1:]
    _launch(grad, (grad.stride(1), grad.stride(0)), x1, (x1.stride(0), x1.stride(1)), gw1,
            N, K1, M, y=y, y_strides=ys_t, dbias=grad_b, precision=precision,
            split=_split_k(_tiles(N, K1), M, x1.device))
    _launch(grad, (grad.stride(1), grad.stride(0)), x2, (x2.stride(0), x2.stride(1)), gw2,
            N, K2, M, y=y, y_strides=ys_t, precision=precision,
            split=_split_k(_tiles(N, K2), M, x1.device))
    if not need_input_grad:
        return x1.new_empty(0), x1.new_empty(0), grad_w, grad_b
    grads = []
    for xi, wi in ((x1, weight[:, :K1]), (x2, weight[:, K1:])):
        gx = _alloc.empty(tuple(xi.shape), xi)
        _launch(grad, (grad.stride(0), grad.stride(1)), wi, (wi.stride(0), wi.stride(1)),
                gx, M, xi.shape[1], N, y=y, y_strides=ys, precision=precision)
        grads.append(gx)
    return grads[0], grads[1], grad_w, grad_b


@linear_elu_cat_backward.register_fake
def _(grad, out, x1, x2, weight, elu, need_input_grad, precision="ieee"):
    g1 = x1.new_empty(x1.shape) if need_input_grad else x1.new_empty(0)
    g2 = x2.new_empty(x2.shape) if need_input_grad else x2.new_empty(0)
    return g1, g2, weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _setup_context_cat(ctx, inputs, output):
    x1, x2, weight, bias, elu, precision = inputs
    ctx.save_for_backward(x1, x2, weight, output)
    ctx.elu = elu
    ctx.precision = precision
    ctx.has_bias = bias is not None


def _backward_cat(ctx, grad):
    x1, x2, weight, out = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    g1, g2, grad_w, grad_b = linear_elu_cat_backward(grad, out, x1, x2, weight, ctx.elu, need_x,
                                                     ctx.precision)
    return (g1 if ctx.needs_input_grad[0] else None, g2 if ctx.needs_input_grad[1] else None,
            grad_w if ctx.needs_input_grad[2] else None,
            grad_b if ctx.has_bias and ctx.needs_input_grad[3] else None, None, None)


linear_elu_cat.register_autograd(_backward_cat, setup_context=_setup_context_cat)


def _setup_context_cat_bwd(ctx, inputs, output):
    grad, out, x1, x2, weight, elu, need_input_grad, precision = inputs
    ctx.save_for_backward(grad, out, x1, x2, weight)
    ctx.elu = elu


def _backward_cat_bwd(ctx, gg_x1, gg_x2, gg_w, gg_b):
    grad, out, x1, x2, weight = ctx.saved_tensors
    k1 = x1.shape[1]
    x = torch.cat([x1, x2], 1)
    gg_x = None
    if (gg_x1 is not None and gg_x1.numel()) or (gg_x2 is not None and gg_x2.numel()):
        z1 = gg_x1 if gg_x1 is not None and gg_x1.numel() else torch.zeros_like(x1)
        z2 = gg_x2 if gg_x2 is not None and gg_x2.numel() else torch.zeros_like(x2)
        gg_x = torch.cat([z1, z2], 1)
    d_grad, d_out, d_x, d_w = _double_backward(grad, out, x, weight, ctx.elu, gg_x, gg_w, gg_b)
    d_x1, d_x2 = (d_x[:, :k1], d_x[:, k1:]) if d_x is not None else (None, None)
    return d_grad, d_out, d_x1, d_x2, d_w, None, None, None


linear_elu_cat_backward.register_autograd(_backward_cat_bwd, setup_context=_setup_context_cat_bwd)


# -- the stack ------------------------------------------------------------------------------------
def mlp_layers(layers: nn.Sequential) -> list[tuple[nn.Linear, bool]]:
    """(linear, followed_by_elu) for each linear layer of an ``aimnet_fast.model.build_elu_mlp`` stack."""
    mods = list(layers)
    plan: list[tuple[nn.Linear, bool]] = []
    i = 0
    while i < len(mods):
        lin = mods[i]
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"elu_mlp expects Linear at index {i}, got {type(lin).__name__}")
        act = i + 1 < len(mods) and isinstance(mods[i + 1], nn.ELU)
        if act and mods[i + 1].alpha != 1.0:
            raise ValueError(f"ELU at index {i + 1} has alpha {mods[i + 1].alpha}; the kernel uses 1")
        plan.append((lin, act))
        i += 2 if act else 1
    return plan


def elu_mlp(x: torch.Tensor, layers: nn.Sequential, precision: str = "ieee") -> torch.Tensor:
    """Run ``layers`` (Linear, ELU, Linear, …) on x (M, K) with one fused kernel per layer → (M, out).

    Gradients reach x and every weight and bias as ordinary autograd gradients.
    """
    for lin, act in mlp_layers(layers):
        x = linear_elu(x, lin.weight, lin.bias, act, precision)
    return x


def elu_mlp_cat(x1: torch.Tensor, x2: torch.Tensor, layers: nn.Sequential,
                precision: str = "ieee") -> torch.Tensor:
    """``elu_mlp(torch.cat([x1, x2], 1), layers)`` without the concatenation, e.g. [e ‖ a] of
    update_mlp / interact_mlp: x1 (M, K1), x2 (M, K2) → (M, out)."""
    plan = mlp_layers(layers)
    lin, act = plan[0]
    h = linear_elu_cat(x1, x2, lin.weight, lin.bias, act, precision)
    for lin, act in plan[1:]:
        h = linear_elu(h, lin.weight, lin.bias, act, precision)
    return h
