"""The seam between the model and its backends: every operation with more than one implementation
is called through here, and this is the one module that imports the Triton kernels
(``aimnet_fast.kernels``), on their first use. It holds no math.

Backends (``BACKENDS``):

- ``"torch"``  the reference: ``aimnet_fast.aev``, ``aimnet_fast.neighbors``, ``torch.nn``
- ``"cpu"``    the fast CPU backend: ``aimnet_fast.cpu_aev``'s contractions (row-blocked matrix
  products and analytic backwards instead of the reference's per-term products, the AEV terms
  computed once for the T passes: ``aev_terms``; inside ``first_order()`` or without gradients,
  ``aimnet_fast.cpu_native``'s C kernels where a C compiler built them),
  ``aimnet_fast.cpu_mlp``'s MLPs (the ELU in place), ``aimnet_fast.cpu_neighbors``'s lists (the
  reference's, small molecules' radial pairs by testing every pair inside each molecule), and
  for a frozen model ``aimnet_fast.cpu_forces``'s energies and forces without autograd
  (``energy_forces``)
- ``"triton"`` the kernels (CUDA tensors, or any tensors under TRITON_INTERPRET=1)
- ``"auto"``   Triton for CUDA tensors where it is installed, the fast CPU backend for CPU tensors;
  decided per call from the tensors' device, because a model is often built on the CPU and moved
  after (the reference runs on any device, but only when asked for by name)

A name is checked once, by ``resolve_backend`` (``AIMNet`` calls it when built and whenever its
``backend`` is set); the operations themselves only look it up. Another backend is one more entry
of ``IMPLEMENTATIONS``: a ``Backend`` tuple, e.g. ``TORCH._replace(build_neighbors=...)`` for one
that replaces a single operation.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, NamedTuple

import torch
from torch import nn

from . import aev, cpu_aev, cpu_forces, cpu_mlp, cpu_neighbors
from . import neighbors as reference_neighbors
from .errors import ConfigError


class Backend(NamedTuple):
    """One implementation of every operation of the seam, with the signatures of the reference."""
    radial_contract: Callable      # (coord, pairs, afv) -> (N, 16, F)
    angular_contract: Callable     # (coord, triplets, pair_feat, triplet_pair) -> (N, 32, F)
    elu_mlp: Callable              # (x, layers, precision) -> (M, out)
    elu_mlp_cat: Callable          # (x1, x2, layers, precision) -> (M, out)
    build_neighbors: Callable      # (coord, mol_idx) -> Neighbors
    #: (coord, nb) -> the AEV terms that the T passes share, passed back to the contractions as
    #: ``terms=``; None for a backend that computes them inside its contractions (the kernels)
    aev_terms: Callable | None = None
    #: (model, numbers, coord, mol_idx, n_mol, nb) -> the model's outputs with ``forces``, or None
    #: where the backend has no such path for these inputs: energies and forces of a frozen model
    #: without autograd (``energy_forces``); None for a backend without one
    energy_forces: Callable | None = None


def _sequential(x: torch.Tensor, layers: nn.Sequential, precision: str) -> torch.Tensor:
    return layers(x)


def _sequential_cat(x1: torch.Tensor, x2: torch.Tensor, layers: nn.Sequential,
                    precision: str) -> torch.Tensor:
    return layers(torch.cat([x1, x2], dim=1))


TORCH = Backend(aev.radial_contract, aev.angular_contract, _sequential, _sequential_cat,
                reference_neighbors.build_neighbors)
CPU = TORCH._replace(radial_contract=cpu_aev.radial_contract,
                     angular_contract=cpu_aev.angular_contract,
                     elu_mlp=cpu_mlp.elu_mlp, elu_mlp_cat=cpu_mlp.elu_mlp_cat,
                     build_neighbors=cpu_neighbors.build_neighbors,
                     aev_terms=cpu_aev.aev_terms, energy_forces=cpu_forces.energy_forces)

#: Stands for the Triton backend until its first use: importing Triton and compiling nothing
#: still costs ~0.3 s, which every CPU-only command (predict, evaluate, a CPU training run) paid.
_LAZY = object()


def _triton_backend() -> Backend:
    from .kernels import angular, mlp, radial
    from .kernels import neighbors as kernel_neighbors
    return Backend(radial.radial_contract, angular.angular_contract, mlp.elu_mlp, mlp.elu_mlp_cat,
                   kernel_neighbors.build_neighbors)


#: name → implementation (``_LAZY`` until first asked for); None where the backend's package is
#: not installed (the reason is in ``_UNAVAILABLE``), so that asking for it says so instead of
#: "unknown backend".
IMPLEMENTATIONS: dict[str, Backend | object | None] = {
    "torch": TORCH,
    "cpu": CPU,
    "triton": _LAZY if importlib.util.find_spec("triton") else None,
}
_UNAVAILABLE = {"triton": "Triton is not installed (No module named 'triton')"}
BACKENDS = ("auto", *IMPLEMENTATIONS)


def implementation(name: str) -> Backend | None:
    """The ``Backend`` of ``name`` (imported on first use), or None if it cannot run here."""
    impl = IMPLEMENTATIONS.get(name)
    if impl is _LAZY:
        try:
            impl = _triton_backend()
        except ModuleNotFoundError as err:
            # Only Triton itself may be missing or broken (e.g. on macOS, where it has no wheel);
            # a kernel module that fails to import for any other reason is a bug: fail loudly.
            if err.name != "triton" and not (err.name or "").startswith("triton."):
                raise
            impl = None
            _UNAVAILABLE[name] = f"Triton is not installed ({err})"
        IMPLEMENTATIONS[name] = impl
    return impl


def resolve_backend(name: str) -> str:
    """``name`` if it is a backend that can run here; ConfigError (a ValueError) otherwise."""
    if name == "auto":
        return name
    if name not in IMPLEMENTATIONS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if implementation(name) is None:
        raise ConfigError(f"backend {name!r} cannot run here: {_UNAVAILABLE[name]}; use 'torch' "
                          f"or 'auto'")
    return name


def _impl(backend: str, x: torch.Tensor) -> Backend:
    if backend == "auto":
        if x.is_cuda:
            backend = "torch" if implementation("triton") is None else "triton"
        else:
            backend = "cpu"
    impl = implementation(backend)
    if impl is None:  # a name that bypassed resolve_backend: raise its explanation
        resolve_backend(backend)
    return impl


def aev_terms(coord: torch.Tensor, nb: reference_neighbors.Neighbors, backend: str = "auto"):
    """The AEV terms of ``nb`` at ``coord`` where the backend shares them between the passes'
    contractions (give them back as ``terms=``), else None."""
    make = _impl(backend, coord).aev_terms
    return None if make is None else make(coord, nb)


def radial_contract(coord, pairs, afv, backend: str = "auto", terms=None):
    impl = _impl(backend, coord)
    if terms is None:
        return impl.radial_contract(coord, pairs, afv)
    return impl.radial_contract(coord, pairs, afv, terms=terms)


def angular_contract(coord, triplets, pair_feat, triplet_pair, backend: str = "auto", terms=None):
    impl = _impl(backend, coord)
    if terms is None:
        return impl.angular_contract(coord, triplets, pair_feat, triplet_pair)
    return impl.angular_contract(coord, triplets, pair_feat, triplet_pair, terms=terms)


def elu_mlp(x: torch.Tensor, layers: nn.Sequential, backend: str = "auto",
            precision: str = "ieee") -> torch.Tensor:
    """Run the Linear–ELU stack ``layers`` on x. ``precision`` ("ieee", "tf32", "bf16") applies
    to the Triton kernels; the reference computes in the tensors' own dtype."""
    return _impl(backend, x).elu_mlp(x, layers, precision)


def elu_mlp_cat(x1: torch.Tensor, x2: torch.Tensor, layers: nn.Sequential, backend: str = "auto",
                precision: str = "ieee") -> torch.Tensor:
    """``elu_mlp`` of [x1 ‖ x2]; the kernels read both parts in place instead of concatenating."""
    return _impl(backend, x1).elu_mlp_cat(x1, x2, layers, precision)


def first_order():
    """A ``with`` block in which gradients are taken once and never differentiated again (the
    forces of prediction): the cpu backend's MLPs with frozen weights then use a backward that
    needs less memory (``cpu_mlp.first_order``); the other backends are unchanged. A double
    backward through those MLPs inside the block raises an error."""
    return cpu_mlp.first_order()


def energy_forces(model: nn.Module, numbers: torch.Tensor, coord: torch.Tensor,
                  mol_idx: torch.Tensor, n_mol: int, nb: reference_neighbors.Neighbors):
    """The outputs of ``model(numbers, coord, mol_idx, n_mol, neighbors=nb, all_passes=False)``
    with ``forces`` (N, 3) Hartree/Å = −d energy.sum() / d coord, where the model's backend
    computes them without autograd for these inputs (the cpu backend: ``cpu_forces``, a frozen
    model); None elsewhere: then take ``autograd.grad`` of the energy inside ``first_order()``."""
    make = _impl(model.backend, coord).energy_forces
    return None if make is None else make(model, numbers, coord, mol_idx, n_mol, nb)


def build_neighbors(coord: torch.Tensor, mol_idx: torch.Tensor,
                    backend: str = "auto") -> reference_neighbors.Neighbors:
    """Pairs, angular subset and triplets at the model's cutoffs; every backend returns the
    reference's ``Neighbors``, field for field."""
    return _impl(backend, coord).build_neighbors(coord, mol_idx)
