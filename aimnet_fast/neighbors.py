"""Reference neighbor search (pure PyTorch): pairs, the angular subset and triplets.

A cell list inside each molecule: atoms are binned into cubes of the cutoff's edge, and each atom
looks only at the 27 cubes around its own, in its own molecule. Candidates, time and memory grow
with the number of neighbors, never with N² of the largest molecule, and never cross molecules.

Shapes: ``coord`` (N, 3) in Å, ``mol_idx`` (N,) int64 non-decreasing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .constants import ANGULAR_CUTOFF_A, RADIAL_CUTOFF_A

_OFFSETS_27 = torch.tensor([(x, y, z) for x in (-1, 0, 1) for y in (-1, 0, 1) for z in (-1, 0, 1)],
                           dtype=torch.long)


def neighbor_pairs(coord: torch.Tensor, mol_idx: torch.Tensor, cutoff_A: float) -> torch.Tensor:
    """Ordered pairs (i, j), i ≠ j, same molecule, |r_j − r_i| < cutoff_A.

    Returns (2, P) int64, both directions of every pair, sorted by i then j.
    """
    device = coord.device
    n = coord.shape[0]
    if n == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=device)
    x = coord.detach().to(torch.float64)
    n_mol = int(mol_idx[-1]) + 1
    lo = torch.full((n_mol, 3), float("inf"), dtype=x.dtype, device=device)
    lo = lo.scatter_reduce(0, mol_idx[:, None].expand(-1, 3), x, reduce="amin")
    # +1 keeps the cells of the 27-neighborhood at non-negative indices.
    cell = torch.floor((x - lo[mol_idx]) / cutoff_A).long() + 1
    side = int(cell.max()) + 2
    if n_mol * side ** 3 >= 2 ** 62:
        raise ValueError(f"molecule extent too large for the cell list ({side} cells per side)")
    key = ((mol_idx * side + cell[:, 0]) * side + cell[:, 1]) * side + cell[:, 2]
    order = torch.argsort(key)
    cell_keys, cell_count = torch.unique_consecutive(key[order], return_counts=True)
    cell_start = torch.cumsum(cell_count, 0) - cell_count

    steps = _OFFSETS_27.to(device)
    shift = (steps[:, 0] * side + steps[:, 1]) * side + steps[:, 2]      # (27,)
    probe = key[:, None] + shift[None, :]                                  # (N, 27)
    pos = torch.searchsorted(cell_keys, probe).clamp(max=cell_keys.numel() - 1)
    hit = cell_keys[pos] == probe
    count = torch.where(hit, cell_count[pos], 0).flatten()                 # (N*27,)
    first = cell_start[pos].flatten()
    owner = torch.arange(n, device=device).repeat_interleave(27)

    total = int(count.sum())
    seg = torch.repeat_interleave(torch.arange(count.numel(), device=device), count, output_size=total)
    local = torch.arange(total, device=device) - (torch.cumsum(count, 0) - count)[seg]
    i = owner[seg]
    j = order[first[seg] + local]
    keep = i != j
    i, j = i[keep], j[keep]
    d2 = (x[j] - x[i]).square().sum(1)
    keep = d2 < cutoff_A * cutoff_A
    i, j = i[keep], j[keep]
    srt = torch.argsort(i * n + j)
    return torch.stack([i[srt], j[srt]])


def angular_subset(coord: torch.Tensor, radial: torch.Tensor, angular_cutoff_A: float) -> torch.Tensor:
    """The pairs of ``radial`` (2, P) closer than ``angular_cutoff_A``, in order, (2, P_a).

    Decided in the coordinates' dtype (not float64 as the radial search): every backend's
    ``build_neighbors`` takes its subset from here so that they all agree at the cutoff."""
    x = coord.detach()
    d2 = (x[radial[1]] - x[radial[0]]).square().sum(1)
    return radial[:, d2 < angular_cutoff_A * angular_cutoff_A]


def triplets_from_pairs(pairs: torch.Tensor, n_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Angular triplets (i; j<k) from ordered pairs sorted by i (as neighbor_pairs returns).

    Returns ``triplets`` (3, T) int64 rows i, j, k and ``pair_of`` (2, T): for each triplet the
    indices into ``pairs`` of (i, j) and (i, k).
    """
    device = pairs.device
    i = pairs[0]
    per_atom = torch.bincount(i, minlength=n_atoms)
    start = torch.cumsum(per_atom, 0) - per_atom
    rank = torch.arange(i.numel(), device=device) - start[i]   # position of the pair in i's list
    # Pairs are sorted by (i, j), so the partner at a higher rank has the larger j.
    more = per_atom[i] - 1 - rank
    total = int(more.sum())
    p1 = torch.repeat_interleave(torch.arange(i.numel(), device=device), more, output_size=total)
    step = torch.arange(total, device=device) - (torch.cumsum(more, 0) - more)[p1]
    p2 = p1 + 1 + step
    triplets = torch.stack([i[p1], pairs[1, p1], pairs[1, p2]])
    return triplets, torch.stack([p1, p2])


def unique_pairs(triplets: torch.Tensor, n_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unordered atom pairs (j, k), j<k, that occur in some triplet, and each triplet's pair.

    Returns ``pairs`` (2, Q) and ``triplet_pair`` (T,) indices into them.
    """
    key = triplets[1] * n_atoms + triplets[2]
    uniq, inverse = torch.unique(key, return_inverse=True)
    return torch.stack([uniq // n_atoms, uniq % n_atoms]), inverse


@dataclass
class Neighbors:
    """Everything the AEV needs about who sees whom. Index tensors only: no gradients flow here.

    - ``radial``      (2, P) ordered pairs within 4.6 Å, sorted by centre atom
    - ``angular``     (2, P_a) the subset within 3.1 Å
    - ``triplets``    (3, T) centre i and neighbors j<k, both within 3.1 Å of i
    - ``pairs``       (2, Q) unique (j, k) of the triplets; ``triplet_pair`` (T,) maps into it
    """
    radial: torch.Tensor
    angular: torch.Tensor
    triplets: torch.Tensor
    pairs: torch.Tensor
    triplet_pair: torch.Tensor


def lists_from_radial(coord: torch.Tensor, radial: torch.Tensor,
                      angular_cutoff_A: float = ANGULAR_CUTOFF_A) -> Neighbors:
    """The ``Neighbors`` of the radial pairs ``radial`` (2, P), sorted by i then j."""
    n = coord.shape[0]
    angular = angular_subset(coord, radial, angular_cutoff_A)
    triplets, _ = triplets_from_pairs(angular, n)
    pairs, triplet_pair = unique_pairs(triplets, n)
    return Neighbors(radial, angular, triplets, pairs, triplet_pair)


def build_neighbors(coord: torch.Tensor, mol_idx: torch.Tensor,
                    radial_cutoff_A: float = RADIAL_CUTOFF_A,
                    angular_cutoff_A: float = ANGULAR_CUTOFF_A) -> Neighbors:
    return lists_from_radial(coord, neighbor_pairs(coord, mol_idx, radial_cutoff_A),
                             angular_cutoff_A)
