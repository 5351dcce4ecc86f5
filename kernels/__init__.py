"""Triton kernels of aimnet_fast, installed as ``aimnet_fast.kernels`` (see pyproject.toml).

One operation = one kernel module (Triton code, no policy) + its autograd wrapper (no math):

- ``radial``    radial AEV fused with the contraction over neighbor features
- ``angular``   angular AEV fused with the contraction over pair features
- ``mlp``       linear + bias + ELU layers with the activation in the matmul epilogue
- ``neighbors`` tiled per-molecule neighbor search

The reference for each is in ``aimnet_fast.aev`` / ``aimnet_fast.neighbors`` / ``torch.nn``.
Modules load lazily so that importing the package never needs Triton.
"""
import importlib

_EXPORTS = {
    "radial_contract": "radial",
    "angular_contract": "angular",
    "elu_mlp": "mlp",
    "elu_mlp_cat": "mlp",
    "neighbor_pairs": "neighbors",
}


def __getattr__(name):
    if name in _EXPORTS:
        try:
            module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        except ModuleNotFoundError as err:
            if err.name and err.name.endswith(_EXPORTS[name]):
                raise NotImplementedError(f"the Triton kernel for {name} is not written yet; "
                                          f"use backend='torch'") from err
            raise
        return getattr(module, name)
    raise AttributeError(name)
