"""Fixed-shape batches and neighbor lists, built without a host sync: the capturable training step.

A CUDA graph replays fixed shapes, and every host read of a device value (``.item()``, ``int(t)``,
a boolean mask, ``torch.unique``, ``bincount``) stalls the GPU and cannot be captured. The reference
neighbor search (``aimnet_fast.neighbors``) sizes its outputs on the host; here every size is a
capacity chosen on the host beforehand (``Capacity``), and the true counts and an overflow flag stay
on the device, to be read once after the step (``NeighborCounts``). When the flag trips, the step is
redone with larger capacities (``Capacity.grown``); nothing is truncated silently.

Padding never changes a result. A padded batch (``pad_batch``) appends *ghost* atoms after the real
ones, in ghost molecules of their own, 10 Å and more apart, with every label masked, so the loss
ignores them. List slots past a list's true count hold pairs and triplets of ghosts: farther apart
than either cutoff, their AEV terms and all their derivatives are exactly zero (the cosine cutoff),
and they come after every real entry, so lists stay sorted by centre and (the radial list) hold
both directions of every pair. Real entries are in the reference's order; sums with exact zeros
added are exact. The model and every backend therefore run unchanged on padded lists, and the real
atoms' energies, forces and gradients equal the unpadded batch's (``tests/test_padded.py``).

Shapes: ``coord`` (N_cap, 3) Å; lists as ``aimnet_fast.neighbors.Neighbors`` with the capacities'
widths. The radial search enumerates, for each atom, the first ``max_atoms`` atoms of its molecule
(N_cap × max_atoms candidates): made for training batches of small molecules, not for a 20,000-atom
prediction.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .batch import Batch
from .constants import ANGULAR_CUTOFF_A, RADIAL_CUTOFF_A
from .neighbors import Neighbors

#: Spacing of the ghost atoms, Å: above both cutoffs, so that no two ghosts are neighbors.
GHOST_SPACING_A = 10.0
#: Ghost atoms a padded batch needs at least: the padding pair (g1, g2) and triplet (g1; g2, g3).
MIN_GHOSTS = 3
#: Labels with one value per molecule; every other label has one per atom.
PER_MOLECULE_LABELS = ("energy",)


@dataclass(frozen=True)
class Capacity:
    """Host-side sizes of a padded batch and its lists (everything a captured step's shapes
    depend on). ``max_atoms``: an upper bound on the atoms of one real molecule."""
    atoms: int
    molecules: int
    max_atoms: int
    pairs: int
    angular: int
    triplets: int
    unique_pairs: int

    @classmethod
    def for_batch(cls, batch: Batch, pairs_per_atom: int = 24, angular_per_atom: int = 10,
                  triplets_per_atom: int = 28, unique_per_atom: int = 14,
                  atoms_round: int = 256, molecules_round: int = 16) -> "Capacity":
        """Capacities for ``batch`` (host values only, no device read): atoms and molecules
        rounded up, with room for the ghosts, so that most batches of a run share one set (one
        graph); list widths per atom from the densities of organic molecules at 4.6 / 3.1 Å,
        grown where a batch overflows them."""
        n_atoms, n_mol = batch.n_atoms, batch.n_mol
        max_atoms = int(batch.mol_sizes.max()) if n_mol else 1
        molecules = _round_up(n_mol + 1, molecules_round)
        atoms = _round_up(n_atoms + max(MIN_GHOSTS, molecules - n_mol), atoms_round)
        return cls(atoms=atoms, molecules=molecules,
                   max_atoms=_round_up(max_atoms, 8), pairs=_even(pairs_per_atom * atoms),
                   angular=_even(angular_per_atom * atoms), triplets=triplets_per_atom * atoms,
                   unique_pairs=unique_per_atom * atoms)

    def fits(self, batch: Batch) -> bool:
        """Whether ``batch`` can be padded to these atoms and molecules (host values only): at
        least MIN_GHOSTS ghost atoms, one ghost molecule, and no ghost molecule without an atom
        (its energy per atom would be 0/0, and NaN times a zero weight is still NaN)."""
        n_mol = batch.n_mol
        biggest = int(batch.mol_sizes.max()) if n_mol else 0
        ghosts, ghost_mols = self.atoms - batch.n_atoms, self.molecules - n_mol
        return ghosts >= max(MIN_GHOSTS, ghost_mols) and ghost_mols >= 1 and biggest <= self.max_atoms

    def grown(self, counts: "NeighborCounts") -> "Capacity":
        """Capacities that hold the lists of ``counts`` (read on the host after an overflow),
        with a quarter to spare."""
        c = counts.host()
        return replace(self, pairs=max(self.pairs, _even(c["pairs"] * 5 // 4 + 2)),
                       angular=max(self.angular, _even(c["angular"] * 5 // 4 + 2)),
                       triplets=max(self.triplets, c["triplets"] * 5 // 4 + 1),
                       unique_pairs=max(self.unique_pairs, c["unique_pairs"] * 5 // 4 + 2))


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _even(n: int) -> int:
    # Real radial and angular counts are even (both directions of every pair), so an even
    # capacity leaves an even number of padding slots: half (g1, g2), half (g2, g1).
    return n + (n % 2)


@dataclass(frozen=True)
class Padding:
    """How ``pad_batch`` padded a batch: the capacities, the three ghost atoms that pad the lists
    (``build_neighbors_padded``), and the real molecules (the real atoms are those before the
    first ghost)."""
    cap: Capacity
    ghosts: tuple[int, int, int]
    n_mol: int

    @property
    def n_atoms(self) -> int:
        return self.ghosts[0]


def pad_batch(batch: Batch, cap: Capacity, element: int = 1) -> tuple[Batch, Padding]:
    """``batch`` with ghost atoms of ``element`` (an element the model knows) appended up to
    ``cap.atoms`` atoms, in ghost molecules up to ``cap.molecules``; every label masked for them
    (labels without a mask get one). Raises ValueError if the batch does not fit ``cap``. Returns
    the padded batch and its ``Padding``. Made on the host, before the batch goes to the GPU."""
    if not cap.fits(batch):
        raise ValueError(f"batch of {batch.n_atoms} atoms and {batch.n_mol} molecules does not fit "
                         f"{cap} (need {MIN_GHOSTS} ghost atoms and one ghost molecule)")
    dev = batch.coord.device
    n, m = batch.n_atoms, batch.n_mol
    g, h = cap.atoms - n, cap.molecules - m
    k = torch.arange(g, device=dev)
    ghost_mol = m + (k * h) // g                          # non-decreasing, no ghost molecule empty
    ghost_xyz = torch.stack([k * GHOST_SPACING_A, (k % 2) * (GHOST_SPACING_A / 2),
                             torch.zeros_like(k)], 1).to(batch.coord.dtype)
    counts = torch.bincount(ghost_mol - m, minlength=h)
    offsets = torch.cat([batch.offsets, batch.offsets[-1] + torch.cumsum(counts, 0)])
    labels, masks = {}, {}
    for name, lab in batch.labels.items():
        extra = h if name in PER_MOLECULE_LABELS else g
        labels[name] = torch.cat([lab, lab.new_zeros((extra, *lab.shape[1:]))])
        mask = batch.masks.get(name)
        if mask is None:
            mask = torch.ones(lab.shape[0], dtype=torch.bool, device=dev)
        masks[name] = torch.cat([mask, mask.new_zeros(extra)])
    conf = None if batch.conf_idx is None else torch.cat(
        [batch.conf_idx, batch.conf_idx.new_full((h,), -1)])
    padded = Batch(torch.cat([batch.numbers, batch.numbers.new_full((g,), element)]),
                   torch.cat([batch.coord, ghost_xyz]), torch.cat([batch.mol_idx, ghost_mol]),
                   offsets, list(batch.names), labels, masks, conf)
    return padded, Padding(cap, (n, n + 1, n + 2), m)


@dataclass
class NeighborCounts:
    """True list lengths (device int64 scalars) and whether any capacity was too small."""
    pairs: torch.Tensor
    angular: torch.Tensor
    triplets: torch.Tensor
    unique_pairs: torch.Tensor
    overflow: torch.Tensor

    def host(self) -> dict:
        """The counts and the flag on the host: one device-to-host copy, after the step."""
        v = torch.stack([self.pairs, self.angular, self.triplets, self.unique_pairs,
                         self.overflow.to(torch.int64)]).tolist()
        return {"pairs": v[0], "angular": v[1], "triplets": v[2], "unique_pairs": v[3],
                "overflow": bool(v[4])}


def _compact(keep: torch.Tensor, values: torch.Tensor, capacity: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of ``values`` (R, L) where ``keep`` (L,), in order, in the first slots of an
    (R, capacity) tensor (the slots past the count hold other columns: the caller pads them), and
    the count. A stable sort, not a scatter: deterministic on the GPU, and kept entries past the
    capacity simply fall off (the caller flags the overflow)."""
    count = keep.sum()
    if values.shape[1] < capacity:
        short = capacity - values.shape[1]
        values = torch.cat([values, values.new_zeros(values.shape[0], short)], 1)
        keep = torch.cat([keep, keep.new_zeros(short)])
    order = torch.sort((~keep).to(torch.uint8), stable=True).indices[:capacity]
    return values[:, order], count


def _pad_pairs(capacity: int, count: torch.Tensor, g1: int, g2: int, device) -> torch.Tensor:
    """(2, capacity) padding: slots past ``count`` hold (g1, g2) in their first half and (g2, g1)
    in their second (sorted by centre, both directions)."""
    s = torch.arange(capacity, device=device)
    second = (s - count) * 2 >= capacity - count
    return torch.stack([torch.where(second, g2, g1), torch.where(second, g1, g2)])


def build_neighbors_padded(coord: torch.Tensor, mol_idx: torch.Tensor, offsets: torch.Tensor,
                           cap: Capacity, ghosts: tuple[int, int, int],
                           radial_cutoff_A: float = RADIAL_CUTOFF_A,
                           angular_cutoff_A: float = ANGULAR_CUTOFF_A
                           ) -> tuple[Neighbors, NeighborCounts]:
    """``aimnet_fast.neighbors.build_neighbors`` into fixed capacities, with no host sync.

    coord (N, 3) Å of a padded batch (``pad_batch``), mol_idx (N,), offsets (M+1,) on the same
    device; ``ghosts`` three ghost atom indices, above every real atom's. Returns ``Neighbors``
    whose ``radial`` is (2, cap.pairs), ``angular`` (2, cap.angular), ``triplets`` (3,
    cap.triplets), ``pairs`` (2, cap.unique_pairs) and ``triplet_pair`` (cap.triplets,): the
    reference's lists in their first ``counts`` entries, ghost padding after; and the counts."""
    dev = coord.device
    n = coord.shape[0]
    g1, g2, g3 = ghosts
    x = coord.detach()

    # Radial: each atom against the first max_atoms atoms of its molecule, in float64 as the
    # reference decides the cutoff; row-major order is sorted by (i, j).
    k = torch.arange(cap.max_atoms, device=dev)
    start = offsets[mol_idx]
    end = offsets[mol_idx + 1]
    i = torch.arange(n, device=dev)[:, None].expand(n, cap.max_atoms)
    j = start[:, None] + k[None, :]
    ok = (j < end[:, None]) & (j != i)
    j = torch.where(ok, j, i)
    x64 = x.to(torch.float64)
    d2 = (x64[j] - x64[i]).square().sum(-1)
    keep = (ok & (d2 < radial_cutoff_A ** 2)).flatten()
    cand = torch.stack([i.flatten(), j.flatten()])
    # The padding pattern depends on the count, known only after compaction: fill in two steps.
    radial, n_pairs = _compact(keep, cand, cap.pairs)
    pad = torch.arange(cap.pairs, device=dev) >= n_pairs
    radial = torch.where(pad, _pad_pairs(cap.pairs, n_pairs, g1, g2, dev), radial)

    # Angular subset, decided in the coordinates' dtype as the reference's angular_subset.
    d2a = (x[radial[1]] - x[radial[0]]).square().sum(1)
    keep_a = ~pad & (d2a < angular_cutoff_A * angular_cutoff_A)
    angular, n_ang = _compact(keep_a, radial, cap.angular)
    valid_a = torch.arange(cap.angular, device=dev) < n_ang
    angular = torch.where(valid_a, angular, _pad_pairs(cap.angular, n_ang, g1, g2, dev))

    # Triplets (i; j < k) from the angular pairs sorted by (i, j), in the reference's order:
    # pair p1 of centre i with each later pair p2 of the same centre.
    ci = angular[0]
    # Per-centre counts by binary search on the sorted centres (padding moved past every atom):
    # no bincount (a host sync) and no atomics (deterministic).
    ci_sorted = torch.where(valid_a, ci, n)
    bounds = torch.searchsorted(ci_sorted, torch.arange(n + 1, device=dev))
    per_atom = bounds[1:] - bounds[:-1]
    first = bounds[:-1]
    rank = torch.arange(cap.angular, device=dev) - first[ci]
    more = torch.where(valid_a, per_atom[ci] - 1 - rank, 0)
    last = torch.cumsum(more, 0)
    n_trip = last[-1] if cap.angular else torch.zeros((), dtype=torch.int64, device=dev)
    t = torch.arange(cap.triplets, device=dev)
    p1 = torch.searchsorted(last, t, right=True).clamp(max=max(cap.angular - 1, 0))
    p2 = (p1 + 1 + t - (last[p1] - more[p1])).clamp(max=max(cap.angular - 1, 0))
    valid_t = t < n_trip
    triplets = torch.stack([torch.where(valid_t, ci[p1], g1),
                            torch.where(valid_t, angular[1, p1], g2),
                            torch.where(valid_t, angular[1, p2], g3)])

    # Unique (j, k) pairs in sorted order, as torch.unique gives them: the padding triplets'
    # (g2, g3) sorts after every real pair and becomes the last unique pair.
    key = triplets[1] * n + triplets[2]
    sorted_key, order = torch.sort(key, stable=True)
    new = torch.ones_like(sorted_key, dtype=torch.bool)
    new[1:] = sorted_key[1:] != sorted_key[:-1]
    uid = torch.cumsum(new, 0) - 1
    # Back to the triplets' order; clamped so that an overflowed list still indexes in range
    # (its step's results are thrown away, but it must not crash before the flag is read).
    triplet_pair = uid[torch.argsort(order)].clamp(max=max(cap.unique_pairs - 1, 0))
    n_unique = (new & (sorted_key < g2 * n + g3)).sum()
    pairs, _ = _compact(new, torch.stack([sorted_key // n, sorted_key % n]), cap.unique_pairs)
    # Fills, not torch.tensor([[g2], [g3]]): a host-to-device copy cannot be captured.
    ghost_pair = torch.stack([torch.full_like(pairs[0], g2), torch.full_like(pairs[1], g3)])
    pairs = torch.where(torch.arange(cap.unique_pairs, device=dev) < n_unique, pairs, ghost_pair)

    overflow = ((n_pairs > cap.pairs) | (n_ang > cap.angular) | (n_trip > cap.triplets)
                | (n_unique >= cap.unique_pairs))
    nb = Neighbors(radial, angular, triplets, pairs, triplet_pair)
    return nb, NeighborCounts(n_pairs, n_ang, n_trip, n_unique, overflow)


class CapacityPlan:
    """The capacities of a run's padded batches: one set while the batches fit it, grown (never
    shrunk) when a batch is bigger or its lists overflow, so that a run sees few distinct shapes
    (few CUDA graphs, few allocator sizes). ``element``: the ghosts' element, one the model knows."""

    def __init__(self, element: int = 1):
        self.cap: Capacity | None = None
        self.element = element

    def pad(self, batch: Batch) -> tuple[Batch, Padding]:
        """``pad_batch`` with the plan's capacities, grown first if the batch does not fit."""
        if self.cap is None or not self.cap.fits(batch):
            new = Capacity.for_batch(batch)
            if self.cap is not None:
                new = Capacity(*(max(a, b) for a, b in zip(self.cap.__dict__.values(),
                                                           new.__dict__.values())))
            self.cap = new
        return pad_batch(batch, self.cap, self.element)

    def grow(self, counts: NeighborCounts) -> None:
        """Room for the lists of ``counts`` (after an overflow)."""
        self.cap = self.cap.grown(counts)
