"""The fast CPU backend's ELU MLPs: the reference's ``nn.Sequential`` (Linear–ELU–…) run layer by
layer with the ELU in place on each matrix product's fresh output.

In place, the ELU writes over the product instead of allocating a second activation, and autograd
keeps only its output, from which the ELU's derivative follows (out + 1 where out ≤ 0): a
molecule's saved activations shrink by the ELU inputs (in the pair MLP 400 of ~860 floats per
unique pair and pass), which a large molecule otherwise pays for in fresh pages (bench/RESULTS.md).
Autograd differentiates every step, twice for force training, exactly as the reference's.

Shapes: x (M, in) → (M, out); ``elu_mlp_cat`` takes the first layer's input in two parts.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _run(h: torch.Tensor, layers: nn.Sequential) -> torch.Tensor:
    for layer in layers._modules.values():
        if isinstance(layer, nn.Linear):
            h = torch.addmm(layer.bias, h, layer.weight.t())
        elif isinstance(layer, nn.ELU):
            # The product's output is fresh and nothing else saved it: safe to overwrite.
            h = F.elu(h, layer.alpha, inplace=True)
        else:  # pragma: no cover - the model builds Linear and ELU only
            h = layer(h)
    return h


def elu_mlp(x: torch.Tensor, layers: nn.Sequential, precision: str = "ieee") -> torch.Tensor:
    """``layers(x)``; ``precision`` is the Triton kernels' and has no meaning here."""
    return _run(x, layers)


def elu_mlp_cat(x1: torch.Tensor, x2: torch.Tensor, layers: nn.Sequential,
                precision: str = "ieee") -> torch.Tensor:
    """``layers(torch.cat([x1, x2], 1))``."""
    return _run(torch.cat([x1, x2], dim=1), layers)
