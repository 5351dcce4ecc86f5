"""AIMNet in plain PyTorch: the reference path every kernel is checked against.

Inputs are a flat batch (see ``aimnet_fast.batch``): ``numbers`` (N,), ``coord`` (N, 3) in Å,
``mol_idx`` (N,). Outputs, per molecule or per atom, in Hartree, e and bohr³:

- ``energy``    (M,)   float64 molecular energy, Hartree (network in the model's dtype, SAE in float64)
- ``charges``   (N,)   atomic charges, e (first component of ``elmoments``)
- ``elmoments`` (N, 4) [charge, |dipole|, |quadrupole|, |octupole|], atomic units
- ``volumes``   (N,)   atomic volumes, bohr³
- ``passes``    the same keys with a leading pass dimension (T, ...), for training on every pass

Network sizes, constants and pass structure follow ``shared/docs/aimnet-architecture.md``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from . import ops
from .constants import (ELEMENTS, ELMOMENTS_SCALE, ENERGY_SCALE_HA, N_ANGULAR, N_FEATURE, N_PASS,
                        N_RADIAL, SAE_HA, VOLUME_SCALE_BOHR3)
from .neighbors import Neighbors

HEAD_SIZES = {"energy": 1, "elmoments": 4, "volume": 1}


def build_elu_mlp(sizes: Sequence[int], last_activation: bool) -> nn.Sequential:
    """Linear–ELU–…–Linear[–ELU]; linear layers sit at even indices, as in the released files."""
    layers: list[nn.Module] = []
    for n, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or n < len(sizes) - 2:
            layers.append(nn.ELU())
    return nn.Sequential(*layers)


class AIMNet(nn.Module):
    def __init__(self, heads: Iterable[str] = ("energy", "elmoments", "volume"),
                 n_pass: int = N_PASS, elements: Sequence[int] = ELEMENTS,
                 sae_Ha: Sequence[float] = SAE_HA, backend: str = "auto",
                 precision: str = "ieee"):
        super().__init__()
        self.elements = tuple(int(z) for z in elements)
        self.n_pass = n_pass
        self.backend = backend  # validated by the property's setter
        #: matrix-unit precision of the Triton MLP kernels: "ieee" (float32), "tf32" or "bf16"
        self.precision = precision
        n_el = len(self.elements)
        self.afv_table = nn.Parameter(torch.empty(n_el, N_FEATURE))
        nn.init.orthogonal_(self.afv_table)
        self.combine_mlp = build_elu_mlp([2 * N_FEATURE, 256, 128, N_FEATURE], last_activation=True)
        aev_size = (N_RADIAL + N_ANGULAR) * N_FEATURE
        self.embedding_mlp = build_elu_mlp([aev_size, 512, 256, 256], last_activation=True)
        self.update_mlp = build_elu_mlp([256 + N_FEATURE, 256, 256, N_FEATURE], last_activation=False)
        self.interact_mlp = build_elu_mlp([256 + N_FEATURE, 256, 256, 128], last_activation=True)
        self.heads = nn.ModuleDict({h: build_elu_mlp([128, 128, 128, HEAD_SIZES[h]],
                                                     last_activation=False) for h in heads})
        self.register_buffer("sae_Ha", torch.tensor(list(sae_Ha), dtype=torch.float64))
        species = torch.full((max(self.elements) + 1,), -1, dtype=torch.long)
        species[list(self.elements)] = torch.arange(n_el)
        self.register_buffer("species_table", species, persistent=False)
        self.register_buffer("elmoments_scale", torch.tensor(ELMOMENTS_SCALE), persistent=False)

    # -- backend and dtype -----------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend of the operations (``aimnet_fast.ops.BACKENDS``). Checked when set, in the
        constructor or later (``m.backend = ...``), so that the operations need not check it on
        every call."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = ops.resolve_backend(name)

    def _apply(self, fn, recurse=True):
        # .float(), .half() and .to(dtype) all come through here. The SAE (up to ~460 Ha per atom)
        # must stay float64: rounded to float32 it would be off by up to 1.5e-5 Ha per atom, more
        # than the network's own float32 error. Device moves still apply to it.
        sae = self.sae_Ha
        out = super()._apply(fn, recurse)
        moved = self.sae_Ha
        if moved.dtype != torch.float64:
            self._buffers["sae_Ha"] = sae.to(device=moved.device, dtype=torch.float64)
        return out

    # -- pieces ----------------------------------------------------------------------------------
    def mlp(self, layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        return ops.elu_mlp(x, layers, self.backend, self.precision)

    def mlp_cat(self, layers: nn.Sequential, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return ops.elu_mlp_cat(x1, x2, layers, self.backend, self.precision)

    def pair_features(self, afv_j: torch.Tensor, afv_k: torch.Tensor) -> torch.Tensor:
        """p_jk = combine_mlp([a_j + a_k, a_j ⊙ a_k]) → (Q, 16)."""
        return self.mlp(self.combine_mlp, torch.cat([afv_j + afv_k, afv_j * afv_k], dim=1))

    def embed(self, coord: torch.Tensor, nb: Neighbors, afv: torch.Tensor,
              pair_feat: torch.Tensor, terms=None) -> torch.Tensor:
        """Embedded AEV e_i (N, 256) from the features of every atom and every triplet pair;
        ``terms`` from ``ops.aev_terms`` (None: the backend computes them)."""
        x_r = ops.radial_contract(coord, nb.radial, afv, self.backend, terms=terms)
        x_a = ops.angular_contract(coord, nb.triplets, pair_feat, nb.triplet_pair, self.backend,
                                   terms=terms)
        return self.mlp_cat(self.embedding_mlp, x_r.flatten(1), x_a.flatten(1))

    def species(self, numbers: torch.Tensor) -> torch.Tensor:
        return self.species_table[numbers]

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, numbers: torch.Tensor, coord: torch.Tensor, mol_idx: torch.Tensor,
                n_mol: int | None = None, neighbors: Neighbors | None = None,
                n_pass: int | None = None, all_passes: bool = True) -> dict:
        n_pass = self.n_pass if n_pass is None else n_pass
        if n_mol is None:
            n_mol = int(mol_idx[-1]) + 1 if mol_idx.numel() else 0
        nb = ops.build_neighbors(coord, mol_idx, self.backend) if neighbors is None else neighbors
        terms = ops.aev_terms(coord, nb, self.backend)
        species = self.species(numbers)
        afv = self.afv_table[species]

        # Pass 1: a pair's features depend only on its two elements, so use a small table.
        n_el = self.afv_table.shape[0]
        t = self.afv_table
        table = self.pair_features(t.repeat_interleave(n_el, 0), t.repeat(n_el, 1))
        pair_feat = table[species[nb.pairs[0]] * n_el + species[nb.pairs[1]]]
        e = self.embed(coord, nb, afv, pair_feat, terms)

        aims = []
        for p in range(n_pass):
            if p > 0:
                afv = afv + self.mlp_cat(self.update_mlp, e, afv)
                # index_select: its backward is an index_add, not advanced indexing's
                # accumulating index_put (several times slower on the CPU)
                pair_feat = self.pair_features(afv.index_select(0, nb.pairs[0]),
                                               afv.index_select(0, nb.pairs[1]))
                e = self.embed(coord, nb, afv, pair_feat, terms)
            if all_passes or p == n_pass - 1:
                aims.append(self.mlp_cat(self.interact_mlp, e, afv))
        return self.heads_output(torch.stack(aims), species, mol_idx, n_mol)

    def heads_output(self, aim: torch.Tensor, species: torch.Tensor, mol_idx: torch.Tensor,
                     n_mol: int) -> dict:
        """Apply the heads to AIM vectors of T passes (T, N, 128)."""
        T, N, _ = aim.shape
        flat = aim.reshape(T * N, -1)
        passes: dict[str, torch.Tensor] = {}
        if "energy" in self.heads:
            e_atom = ENERGY_SCALE_HA * self.mlp(self.heads["energy"], flat).reshape(T, N)
            e_atom = e_atom.to(torch.float64) + self.sae_Ha[species]
            energy = e_atom.new_zeros(T, n_mol).index_add_(1, mol_idx, e_atom)
            passes["energy"] = energy
            passes["atomic_energies"] = e_atom
        if "elmoments" in self.heads:
            el = self.mlp(self.heads["elmoments"], flat).reshape(T, N, 4) \
                * self.elmoments_scale.to(flat.dtype)
            passes["elmoments"] = el
            passes["charges"] = el[..., 0]
        if "volume" in self.heads:
            passes["volumes"] = VOLUME_SCALE_BOHR3 * self.mlp(self.heads["volume"], flat).reshape(T, N)
        out = {k: v[-1] for k, v in passes.items()}
        out["passes"] = passes
        return out
