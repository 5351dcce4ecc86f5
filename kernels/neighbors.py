"""Tiled per-molecule neighbor search in Triton: ordered pairs (i, j), i ≠ j, |r_j − r_i| < cutoff.

Atoms are flat and sorted by molecule; molecule m holds atoms offsets[m] .. offsets[m+1]−1. One
program per (molecule, tile of BLOCK_I centre atoms) loops over tiles of BLOCK_J atoms *of the same
molecule*: candidates never cross molecules, and the work per molecule is n_m², which is small
for the molecules AIMNet sees (tens of atoms).

Two passes, no atomics, deterministic:
1. ``_count_kernel`` writes the number of neighbors of every atom, counts (N,) int32;
2. a prefix sum (torch.cumsum) gives each atom's first slot; ``_write_kernel`` runs the same loop
   and writes i and j at start[i] + (rank of j among i's neighbors), so the list comes out sorted
   by i then j without a sort. Slots at or past ``capacity`` are not written.

``neighbor_pairs_padded`` keeps a fixed ``capacity`` and returns the true count and an overflow
flag on the device (no host sync: usable inside a CUDA graph; the caller checks the flag lazily
and reruns with more room). ``neighbor_pairs`` reads the count, grows the buffer if it overflowed,
and returns exactly (2, P): it never truncates silently.

Distances are computed in float64 whatever the coordinates' dtype, like the reference
``aimnet_fast.neighbors.neighbor_pairs``, so both return the same set even for pairs at the cutoff.
Coordinates in Å.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from aimnet_fast.constants import ANGULAR_CUTOFF_A, RADIAL_CUTOFF_A
from aimnet_fast.neighbors import Neighbors, angular_subset, unique_pairs

from . import _alloc

# Tests shrink these so that small molecules straddle the tile boundaries.
BLOCKS = {"BLOCK_I": 32, "BLOCK_J": 32}
NUM_WARPS = 4


@triton.jit
def _tile_mask(coord_ptr, cut2_bits, ii, mask_i, xi, yi, zi, j0, end, BLOCK_J: tl.constexpr):
    """(BLOCK_I, BLOCK_J) mask of neighbors j in [j0, j0 + BLOCK_J) ∩ [.., end) of atoms ii."""
    jj = j0 + tl.arange(0, BLOCK_J)
    mask_j = jj < end
    base = coord_ptr + jj.to(tl.int64) * 3
    xj = tl.load(base, mask=mask_j, other=0.0).to(tl.float64)
    yj = tl.load(base + 1, mask=mask_j, other=0.0).to(tl.float64)
    zj = tl.load(base + 2, mask=mask_j, other=0.0).to(tl.float64)
    dx = xj[None, :] - xi[:, None]
    dy = yj[None, :] - yi[:, None]
    dz = zj[None, :] - zi[:, None]
    d2 = dx * dx + dy * dy + dz * dz
    # The squared cutoff arrives as the int64 bit pattern of a float64: a Python float argument
    # would be rounded to float32, and a tensor would cost a host-to-device copy per call.
    cut2 = cut2_bits.to(tl.float64, bitcast=True)
    return (d2 < cut2) & mask_i[:, None] & mask_j[None, :] & (ii[:, None] != jj[None, :]), jj


@triton.jit
def _centre_tile(coord_ptr, offsets_ptr, BLOCK_I: tl.constexpr):
    mol = tl.program_id(0)
    tile = tl.program_id(1)
    start = tl.load(offsets_ptr + mol)
    end = tl.load(offsets_ptr + mol + 1)
    ii = start + tile * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = ii < end
    base = coord_ptr + ii.to(tl.int64) * 3
    xi = tl.load(base, mask=mask_i, other=0.0).to(tl.float64)
    yi = tl.load(base + 1, mask=mask_i, other=0.0).to(tl.float64)
    zi = tl.load(base + 2, mask=mask_i, other=0.0).to(tl.float64)
    # A tile past the molecule's last atom loops over nothing.
    j_end = tl.where(start + tile * BLOCK_I < end, end, start)
    return start, j_end, ii, mask_i, xi, yi, zi


@triton.jit
def _count_kernel(coord_ptr, offsets_ptr, cut2_bits, counts_ptr,
                  BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    start, end, ii, mask_i, xi, yi, zi = _centre_tile(coord_ptr, offsets_ptr, BLOCK_I)
    count = tl.zeros((BLOCK_I,), dtype=tl.int32)
    for j0 in range(start, end, BLOCK_J):
        m, jj = _tile_mask(coord_ptr, cut2_bits, ii, mask_i, xi, yi, zi, j0, end, BLOCK_J)
        count += tl.sum(m.to(tl.int32), axis=1)
    tl.store(counts_ptr + ii, count, mask=mask_i)


@triton.jit
def _write_kernel(coord_ptr, offsets_ptr, cut2_bits, first_ptr, pairs_ptr, capacity,
                  BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """pairs_ptr: (2, capacity) int64, row 0 = i, row 1 = j; first_ptr: (N,) int64 first slots."""
    start, end, ii, mask_i, xi, yi, zi = _centre_tile(coord_ptr, offsets_ptr, BLOCK_I)
    slot = tl.load(first_ptr + ii, mask=mask_i, other=0)
    for j0 in range(start, end, BLOCK_J):
        m, jj = _tile_mask(coord_ptr, cut2_bits, ii, mask_i, xi, yi, zi, j0, end, BLOCK_J)
        hits = m.to(tl.int64)
        # Inclusive scan along j: the k-th neighbor of i in this tile goes to slot + k − 1.
        pos = slot[:, None] + tl.cumsum(hits, axis=1) - 1
        # pos < 0 only after a too-small max_atoms (flagged by the host wrapper): never write there.
        ok = m & (pos < capacity) & (pos >= 0)
        i_full = ii[:, None] + tl.zeros_like(jj)[None, :]
        j_full = jj[None, :] + tl.zeros_like(ii)[:, None]
        tl.store(pairs_ptr + pos, i_full.to(tl.int64), mask=ok)
        tl.store(pairs_ptr + capacity + pos, j_full.to(tl.int64), mask=ok)
        slot += tl.sum(hits, axis=1)


def _inputs(coord: torch.Tensor, offsets: torch.Tensor, cutoff_A: float):
    if coord.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"coord must be float32 or float64, got {coord.dtype}")
    coord = coord.detach().contiguous()
    offsets = offsets.to(device=coord.device, dtype=torch.int32).contiguous()
    cut2 = struct.unpack("<q", struct.pack("<d", float(cutoff_A) ** 2))[0]
    return coord, offsets, cut2


def _grid(offsets: torch.Tensor, max_atoms: int | None):
    n_mol = offsets.numel() - 1
    if max_atoms is None:
        # One host read of the largest molecule; pass max_atoms to avoid it (CUDA graphs).
        max_atoms = int((offsets[1:] - offsets[:-1]).max()) if n_mol > 0 else 0
    return (n_mol, max(triton.cdiv(max_atoms, BLOCKS["BLOCK_I"]), 1))


def neighbor_counts(coord: torch.Tensor, offsets: torch.Tensor, cutoff_A: float,
                    max_atoms: int | None = None) -> torch.Tensor:
    """Number of neighbors within ``cutoff_A`` (Å) of every atom, (N,) int32."""
    coord, offsets, cut2 = _inputs(coord, offsets, cutoff_A)
    n = coord.shape[0]
    counts = torch.full((n,), -1, dtype=torch.int32, device=coord.device)
    if n and offsets.numel() > 1:
        _count_kernel[_grid(offsets, max_atoms)](coord, offsets, cut2, counts,
                                                 num_warps=NUM_WARPS, **BLOCKS)
    return counts


@torch.library.custom_op("aimnet_fast::neighbor_pairs_padded", mutates_args=())
def neighbor_pairs_padded(coord: torch.Tensor, offsets: torch.Tensor, cutoff_A: float,
                          capacity: int, max_atoms: int = -1
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs into a fixed buffer, without a host sync.

    coord (N, 3) Å, offsets (M+1,) atom ranges of the molecules, ``max_atoms`` an upper bound on
    the atoms of one molecule (−1: read it from offsets, one host sync).
    Returns ``pairs`` (2, capacity) int64 sorted by i then j, slots past the count filled with −1;
    ``n_pairs`` () int64 the true number of pairs; ``overflow`` () bool: n_pairs > capacity (then
    only the first ``capacity`` pairs are in ``pairs``: rerun with capacity ≥ n_pairs), or
    ``max_atoms`` below the largest molecule (then the result is wrong: rerun with a larger one).
    """
    counts = neighbor_counts(coord, offsets, cutoff_A, None if max_atoms < 0 else max_atoms)
    coord, offsets32, cut2 = _inputs(coord, offsets, cutoff_A)
    last = torch.cumsum(counts, 0, dtype=torch.int64)
    first = last - counts
    n_pairs = last[-1].clone() if counts.numel() else torch.zeros((), dtype=torch.int64,
                                                                  device=coord.device)
    pairs = torch.full((2, capacity), -1, dtype=torch.int64, device=coord.device)
    if counts.numel() and offsets32.numel() > 1 and capacity > 0:
        _write_kernel[_grid(offsets32, None if max_atoms < 0 else max_atoms)](
            coord, offsets32, cut2, first, pairs, capacity, num_warps=NUM_WARPS, **BLOCKS)
    # An atom left at −1 was in no program's tile: max_atoms was below the largest molecule.
    overflow = (n_pairs > capacity) | (counts < 0).any()
    return pairs, n_pairs, overflow


@neighbor_pairs_padded.register_fake
def _(coord, offsets, cutoff_A, capacity, max_atoms=-1):
    return (coord.new_empty((2, capacity), dtype=torch.int64),
            coord.new_empty((), dtype=torch.int64), coord.new_empty((), dtype=torch.bool))


def _no_grad_setup(ctx, inputs, output):
    pass


def _no_grad_backward(ctx, *grads):
    # Index outputs: nothing flows back to the coordinates through the choice of neighbors.
    return None, None, None, None, None


neighbor_pairs_padded.register_autograd(_no_grad_backward, setup_context=_no_grad_setup)


def neighbor_pairs(coord: torch.Tensor, mol_idx: torch.Tensor, offsets: torch.Tensor | None,
                   cutoff_A: float, capacity: int | None = None) -> torch.Tensor:
    """Ordered pairs (i, j), i ≠ j, same molecule, |r_j − r_i| < cutoff_A (Å) → (2, P) int64
    sorted by i then j: the same set and order as ``aimnet_fast.neighbors.neighbor_pairs``.

    coord (N, 3) Å; mol_idx (N,) non-decreasing; offsets (M+1,) the molecules' atom ranges (None:
    derived from mol_idx). ``capacity``: the first buffer's size in pairs (default 64 per atom);
    if it overflows, the search reruns with a buffer of the exact count.
    """
    n = coord.shape[0]
    if offsets is None:
        offsets = offsets_from_mol_idx(mol_idx)
    if n == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=coord.device)
    if capacity is None:
        capacity = 64 * n
    pairs, n_pairs, overflow = neighbor_pairs_padded(coord, offsets, cutoff_A, capacity)
    total = int(n_pairs)
    if bool(overflow):
        pairs, n_pairs, overflow = neighbor_pairs_padded(coord, offsets, cutoff_A, total)
        if bool(overflow) or int(n_pairs) != total:  # pragma: no cover - would be a kernel bug
            raise RuntimeError("neighbor list overflowed after growing to the counted size")
    return pairs[:, :total].contiguous()  # (2, P) rows, not a view into the larger buffer


def neighbor_pairs_like_reference(coord: torch.Tensor, mol_idx: torch.Tensor,
                                  cutoff_A: float) -> torch.Tensor:
    """Same signature as ``aimnet_fast.neighbors.neighbor_pairs``."""
    return neighbor_pairs(coord, mol_idx, None, cutoff_A)


def offsets_from_mol_idx(mol_idx: torch.Tensor) -> torch.Tensor:
    """(M+1,) int64 atom ranges of the molecules from a non-decreasing mol_idx (N,)."""
    if mol_idx.numel() == 0:
        return torch.zeros(1, dtype=torch.long, device=mol_idx.device)
    if bool((mol_idx[1:] < mol_idx[:-1]).any()):
        raise ValueError("mol_idx must be non-decreasing (atoms sorted by molecule)")
    n_mol = int(mol_idx[-1]) + 1
    counts = torch.bincount(mol_idx, minlength=n_mol)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


# -- angular triplets (i; j < k) from the angular pairs ---------------------------------------------
TRIPLET_BLOCK = 32  # partners k written per step; tests shrink it


@triton.jit
def _triplet_kernel(pairs_ptr, n_pairs_cap, first_ptr, counts_ptr, tfirst_ptr, trip_ptr, pair_of_ptr,
                    n_trip_cap, BLOCK: tl.constexpr):
    """One program per centre atom i with c neighbors at pair slots first[i] .. first[i] + c − 1
    (sorted by j): writes the c(c−1)/2 triplets (i, j_a, j_b), a < b, in the order a then b, at
    slots tfirst[i] + a·c − a(a+1)/2 + (b − a − 1); pair_of holds the pair slots (p_a, p_b).
    ``trip_ptr`` / ``pair_of_ptr``: (3, n_trip_cap) / (2, n_trip_cap) int64."""
    i = tl.program_id(0)
    c = tl.load(counts_ptr + i).to(tl.int64)
    p0 = tl.load(first_ptr + i)
    t0 = tl.load(tfirst_ptr + i)
    for a in range(0, c - 1):
        pa = p0 + a
        ja = tl.load(pairs_ptr + n_pairs_cap + pa)
        row = t0 + a * c - (a * (a + 1)) // 2 - a - 1
        for b0 in range(a + 1, c, BLOCK):
            b = b0 + tl.arange(0, BLOCK)
            mask = b < c
            pb = p0 + b
            jb = tl.load(pairs_ptr + n_pairs_cap + pb, mask=mask, other=0)
            slot = row + b
            tl.store(trip_ptr + slot, i + tl.zeros_like(b), mask=mask)
            tl.store(trip_ptr + n_trip_cap + slot, ja + tl.zeros_like(b), mask=mask)
            tl.store(trip_ptr + 2 * n_trip_cap + slot, jb, mask=mask)
            tl.store(pair_of_ptr + slot, pa + tl.zeros_like(b), mask=mask)
            tl.store(pair_of_ptr + n_trip_cap + slot, pb, mask=mask)


def triplets_from_pairs(pairs: torch.Tensor, counts: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Angular triplets from ordered pairs (2, P) sorted by i, with per-atom counts (N,).

    Returns ``triplets`` (3, T) rows i, j, k (j < k) and ``pair_of`` (2, T) the slots in ``pairs``
    of (i, j) and (i, k): the same as ``aimnet_fast.neighbors.triplets_from_pairs``. One host sync
    (T, to allocate).
    """
    counts = counts.to(torch.int64)
    per_atom = counts * (counts - 1) // 2
    tlast = torch.cumsum(per_atom, 0)
    n_trip = int(tlast[-1]) if counts.numel() else 0
    triplets = _alloc.empty((3, n_trip), pairs, torch.int64)
    pair_of = _alloc.empty((2, n_trip), pairs, torch.int64)
    if n_trip:
        pairs = pairs.contiguous()
        first = (torch.cumsum(counts, 0) - counts).contiguous()
        _triplet_kernel[(counts.numel(),)](pairs, pairs.shape[1], first, counts.contiguous(),
                                           (tlast - per_atom).contiguous(), triplets, pair_of,
                                           n_trip, BLOCK=TRIPLET_BLOCK)
    return triplets, pair_of


def build_neighbors(coord: torch.Tensor, mol_idx: torch.Tensor,
                    radial_cutoff_A: float = RADIAL_CUTOFF_A,
                    angular_cutoff_A: float = ANGULAR_CUTOFF_A, *,
                    offsets: torch.Tensor | None = None) -> Neighbors:
    """``aimnet_fast.neighbors.build_neighbors`` with the radial search and the triplets on the
    kernels; same signature and the same ``Neighbors``, field for field.

    The angular subset and the unique (j, k) pairs come from the reference's own functions: the
    subset is decided in the coordinates' dtype there, and a float64 search at 3.1 Å would classify
    float32 pairs within ~1e-6 Å of the cutoff differently. ``offsets`` (M+1,) saves deriving the
    molecules' atom ranges from mol_idx.
    """
    if offsets is None:
        offsets = offsets_from_mol_idx(mol_idx)
    n = coord.shape[0]
    radial = neighbor_pairs(coord, mol_idx, offsets, radial_cutoff_A)
    angular = angular_subset(coord, radial, angular_cutoff_A)
    counts = torch.bincount(angular[0], minlength=n) if n else angular.new_zeros(0)
    triplets, _ = triplets_from_pairs(angular, counts)
    pairs, triplet_pair = unique_pairs(triplets, n)
    return Neighbors(radial, angular, triplets, pairs, triplet_pair)
