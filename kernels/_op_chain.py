"""The custom-op chain shared by the AEV contractions (radial, angular): three torch ops that make a
Triton forward differentiable twice, as force training needs, and refuse a third derivative.

Each contraction takes ``(coord, <index tensors>..., feat, <index tensors>...)``: coordinates first,
one feature tensor somewhere after them, every other input an index tensor that gets no gradient.
Its kernel module supplies three launch functions,

- ``forward(*inputs) -> out``
- ``backward(grad_out, *inputs, need_coord, need_feat) -> (grad coord, grad feat)``; a gradient
  not needed may come back as an empty (0,) tensor (training on energies skips the coordinates)
- ``double_backward(grad_out, *inputs, u, v) -> (grad grad_out, grad coord, grad feat)`` of
  S = <u, grad feat> + <v, grad coord>

and ``contraction_ops`` registers them as ``aimnet_fast::<name>``, ``<name>_backward`` and
``<name>_double_backward``, each with a fake (meta) implementation for torch.compile, and wires
their autograd: forward → backward → double backward → error.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch


class ContractionOps(NamedTuple):
    forward: object
    backward: object
    double_backward: object


def contraction_ops(name: str, arg_names: Sequence[str], feat: str, forward: Callable,
                    backward: Callable, double_backward: Callable,
                    out_shape: Callable[..., tuple]) -> ContractionOps:
    """Register the chain for a contraction whose inputs are ``arg_names`` (coordinates first) and
    whose differentiable features are the input named ``feat``. ``out_shape(*inputs)`` gives the
    forward's shape; its dtype is the features'. Call the result's ``forward`` with the inputs."""
    n = len(arg_names)
    fi = list(arg_names).index(feat)
    if fi == 0:
        raise ValueError("the first input must be the coordinates")
    args = ", ".join(f"Tensor {a}" for a in arg_names)
    # Explicit schemas: the launch functions keep their own signatures, and one schema string per
    # op is what would otherwise be inferred from annotations repeated in every kernel module.
    fwd = torch.library.custom_op(f"aimnet_fast::{name}", forward, mutates_args=(),
                                  schema=f"({args}) -> Tensor")
    bwd = torch.library.custom_op(f"aimnet_fast::{name}_backward", backward, mutates_args=(),
                                  schema=f"(Tensor grad_out, {args}, bool need_coord, "
                                         f"bool need_{feat}) -> (Tensor, Tensor)")
    bwd2 = torch.library.custom_op(f"aimnet_fast::{name}_double_backward", double_backward,
                                   mutates_args=(),
                                   schema=f"(Tensor grad_out, {args}, Tensor u, Tensor v) "
                                          f"-> (Tensor, Tensor, Tensor)")

    @fwd.register_fake
    def _(*inputs):
        return inputs[fi].new_empty(out_shape(*inputs))

    @bwd.register_fake
    def _(grad_out, *rest):
        inputs, (need_coord, need_feat) = rest[:n], rest[n:]
        coord, f = inputs[0], inputs[fi]
        return (coord.new_empty(coord.shape if need_coord else (0,)),
                f.new_empty(f.shape if need_feat else (0,)))

    @bwd2.register_fake
    def _(grad_out, *rest):
        return torch.empty_like(grad_out), torch.empty_like(rest[0]), torch.empty_like(rest[fi])

    def setup_forward(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_of_forward(ctx, grad_out):
        inputs = ctx.saved_tensors
        need_coord, need_feat = ctx.needs_input_grad[0], ctx.needs_input_grad[fi]
        gcoord, gfeat = bwd(grad_out.contiguous(), *inputs, need_coord, need_feat)
        grads = [None] * n
        grads[0] = gcoord if need_coord else None
        grads[fi] = gfeat if need_feat else None
        return tuple(grads)

    def setup_backward(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n + 1])
        ctx.need = inputs[n + 1:]

    def backward_of_backward(ctx, g_gcoord, g_gfeat):
        grad_out, *inputs = ctx.saved_tensors
        need_coord, need_feat = ctx.need
        # A first-order result that was not computed, or that gets no gradient, contributes
        # nothing to S: a zero direction.
        u = g_gfeat if need_feat and g_gfeat is not None else torch.zeros_like(inputs[fi])
        v = g_gcoord if need_coord and g_gcoord is not None else torch.zeros_like(inputs[0])
        g_go, g_coord, g_feat = bwd2(grad_out, *inputs, u.contiguous(), v.contiguous())
        grads = [g_go] + [None] * (n + 2)
        grads[1] = g_coord
        grads[1 + fi] = g_feat
        return tuple(grads)

    def no_third_derivative(ctx, *grads):
        raise RuntimeError(f"{name}: the Triton kernels stop at the second derivative (force "
                           f"training); for higher ones use backend='torch'")

    fwd.register_autograd(backward_of_forward, setup_context=setup_forward)
    bwd.register_autograd(backward_of_backward, setup_context=setup_backward)
    bwd2.register_autograd(no_third_derivative, setup_context=lambda ctx, inputs, output: None)
    return ContractionOps(fwd, bwd, bwd2)
