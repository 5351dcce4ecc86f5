"""The fast CPU backend's ELU MLPs: the reference's ``nn.Sequential`` (Linear–ELU–…) run layer by
layer with the ELU in place on each matrix product's fresh output.

In place, the ELU writes over the product instead of allocating a second activation, and autograd
keeps only its output, from which the ELU's derivative follows (out + 1 where out ≤ 0): a
molecule's saved activations shrink by the ELU inputs (in the pair MLP 400 of ~860 floats per
unique pair and pass), which a large molecule otherwise pays for in fresh pages (bench/RESULTS.md).
Autograd differentiates every step, twice for force training, exactly as the reference's.

Inside ``first_order()`` (prediction: forces by one backward, frozen weights), an MLP whose input
needs a gradient and whose weights do not is one autograd Function instead (``FirstOrderMLP``):
it keeps the same ELU outputs, and its backward writes each ELU's derivative over the gradient its
own matrix product has just made, where autograd would allocate another activation-sized tensor;
a large molecule's backward then takes a third less memory. Its backward cannot be differentiated
again (it would need the input, which it does not keep): a double backward inside ``first_order``
raises an error instead.

Shapes: x (M, in) → (M, out); ``elu_mlp_cat`` takes the first layer's input in two parts.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

_FIRST_ORDER = contextvars.ContextVar("aimnet_fast_first_order", default=False)


@contextlib.contextmanager
def first_order() -> Iterator[None]:
    """Within this block, gradients of the MLPs are taken once and never differentiated again
    (``torch.autograd.grad`` without ``create_graph``), e.g. forces for prediction."""
    token = _FIRST_ORDER.set(True)
    try:
        yield
    finally:
        _FIRST_ORDER.reset(token)


class FirstOrderMLP(torch.autograd.Function):
    """The MLP ``layers`` on x with frozen weights; backward gives the input's gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layers: nn.Sequential) -> torch.Tensor:
        modules = list(layers._modules.values())
        kept: list[torch.Tensor] = []
        h = _layer_by_layer(x, modules, kept)
        ctx.save_for_backward(*kept)
        ctx.modules = modules
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError("a double backward through the cpu backend's MLPs inside "
                               "aimnet_fast.cpu_mlp.first_order(): take create_graph gradients "
                               "outside that block")
        kept = list(ctx.saved_tensors)
        own = False  # whether grad is a tensor this backward made (then safe to overwrite)
        for layer in reversed(ctx.modules):
            if isinstance(layer, nn.Linear):
                grad = grad.mm(layer.weight)
                own = True
            else:
                out = kept.pop()
                if own:
                    torch.ops.aten.elu_backward.grad_input(grad, layer.alpha, 1, 1, True, out,
                                                          grad_input=grad)
                else:
                    grad = torch.ops.aten.elu_backward(grad, layer.alpha, 1, 1, True, out)
        return grad, None


def _layer_by_layer(h: torch.Tensor, modules, kept: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The layers on h, each ELU in place on its product; ``kept`` collects the ELU outputs."""
    for layer in modules:
        if isinstance(layer, nn.Linear):
            h = torch.addmm(layer.bias, h, layer.weight.t())
        elif isinstance(layer, nn.ELU):
            # The product's output is fresh and nothing else saved it: safe to overwrite.
            h = F.elu(h, layer.alpha, inplace=True)
            if kept is not None:
                kept.append(h)
        else:  # pragma: no cover - the model builds Linear and ELU only
            h = layer(h)
    return h


def _run(h: torch.Tensor, layers: nn.Sequential) -> torch.Tensor:
    if (_FIRST_ORDER.get() and h.requires_grad and torch.is_grad_enabled()
            and not any(p.requires_grad for p in layers.parameters())
            and all(isinstance(m, (nn.Linear, nn.ELU)) for m in layers._modules.values())):
        return FirstOrderMLP.apply(h, layers)
    return _layer_by_layer(h, layers._modules.values())


def elu_mlp(x: torch.Tensor, layers: nn.Sequential, precision: str = "ieee") -> torch.Tensor:
    """``layers(x)``; ``precision`` is the Triton kernels' and has no meaning here."""
    return _run(x, layers)


def elu_mlp_cat(x1: torch.Tensor, x2: torch.Tensor, layers: nn.Sequential,
                precision: str = "ieee") -> torch.Tensor:
    """``layers(torch.cat([x1, x2], 1))``."""
    return _run(torch.cat([x1, x2], dim=1), layers)
