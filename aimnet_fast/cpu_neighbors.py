"""The fast CPU backend's neighbor search: the reference's lists (``aimnet_fast.neighbors``), with
the radial pairs of small molecules found by testing every pair inside each molecule.

The reference's cell list sorts the atoms into cubes and probes 27 cubes per atom, in ~130
operations whatever the batch. A batch of molecules of ~20 atoms has only Σ n² ≈ 20 N candidate
pairs, which a dozen operations enumerate and test: the radial pairs of a 7,082-atom batch of
S66x8 dimers took 8 ms instead of 15-20 ms, a 21-atom droplet's whole search 0.29 ms instead of
0.46 ms (bench/RESULTS.md). Above ``BRUTE_FORCE_PAIRS_PER_ATOM`` candidates per atom (molecules
of a few hundred atoms) the cell list is cheaper and is used. The angular subset is the
reference's on these pairs; the triplets and the unique pairs are the native kernels'
(``cpu_native.triplets_and_pairs``, the reference's lists exactly) where they are built, else the
reference's (``reference.lists_from_radial``).

The distances are decided as the reference decides them (float64, |r_j − r_i|² < cutoff²), so
the lists are the reference's exactly, in the same order (by i, then j).

Shapes: ``coord`` (N, 3) in Å, ``mol_idx`` (N,) int64 non-decreasing (a molecule's atoms together).
"""
from __future__ import annotations

import torch

from . import cpu_native
from . import neighbors as reference
from .constants import ANGULAR_CUTOFF_A, RADIAL_CUTOFF_A

#: Candidates per atom (Σ n² / N, n the molecules' sizes) up to which every pair inside each
#: molecule is tested; the cell list looks at ~27 cells' worth of atoms per atom instead.
BRUTE_FORCE_PAIRS_PER_ATOM = 256


def molecule_pairs(coord: torch.Tensor, mol_idx: torch.Tensor, cutoff_A: float,
                   sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Ordered pairs (i, j), i ≠ j, same molecule, |r_j − r_i| < cutoff_A, from every pair inside
    each molecule: (2, P) int64, sorted by i then j (``reference.neighbor_pairs``'s list).
    ``sizes``: ``torch.bincount(mol_idx)``, if the caller has it."""
    device = coord.device
    n = coord.shape[0]
    if n == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=device)
    if sizes is None:
        sizes = torch.bincount(mol_idx)
    start = torch.cumsum(sizes, 0) - sizes
    per_atom = sizes[mol_idx]                               # candidates of each atom i
    total = int(per_atom.sum())
    i = torch.repeat_interleave(torch.arange(n, device=device), per_atom, output_size=total)
    first = torch.cumsum(per_atom, 0) - per_atom
    j = torch.arange(total, device=device) - first[i] + start[mol_idx[i]]
    x = coord.detach().to(torch.float64)
    keep = (i != j) & ((x[j] - x[i]).square().sum(1) < cutoff_A * cutoff_A)
    return torch.stack([i[keep], j[keep]])


def radial_pairs(coord: torch.Tensor, mol_idx: torch.Tensor, cutoff_A: float) -> torch.Tensor:
    """``molecule_pairs`` for small molecules, ``reference.neighbor_pairs`` (the cell list) for
    large ones: the same (2, P) list either way."""
    n = coord.shape[0]
    if n:
        sizes = torch.bincount(mol_idx)
        if int(sizes.square().sum()) <= BRUTE_FORCE_PAIRS_PER_ATOM * n:
            return molecule_pairs(coord, mol_idx, cutoff_A, sizes)
    return reference.neighbor_pairs(coord, mol_idx, cutoff_A)


def build_neighbors(coord: torch.Tensor, mol_idx: torch.Tensor,
                    radial_cutoff_A: float = RADIAL_CUTOFF_A,
                    angular_cutoff_A: float = ANGULAR_CUTOFF_A) -> reference.Neighbors:
    """``reference.build_neighbors``'s lists, the radial pairs by ``radial_pairs``; the triplets
    and their unique pairs by the native kernels where they are available (one pass each instead
    of ~40 dispatched operations, ``cpu_native.triplets_and_pairs``)."""
    radial = radial_pairs(coord, mol_idx, radial_cutoff_A)
    if coord.device.type != "cpu" or cpu_native.library() is None:
        return reference.lists_from_radial(coord, radial, angular_cutoff_A)
    angular = reference.angular_subset(coord, radial, angular_cutoff_A)
    triplets, pairs, triplet_pair = cpu_native.triplets_and_pairs(angular, coord.shape[0])
    return reference.Neighbors(radial, angular, triplets, pairs, triplet_pair)
