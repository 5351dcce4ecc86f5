"""A batch of molecules of different sizes, flat and without padding.

Atoms of all molecules are stored one after the other, molecule by molecule:

- ``numbers``  (N,)   int64, atomic numbers
- ``coord``    (N, 3) float, Cartesian coordinates in Å
- ``mol_idx``  (N,)   int64, the molecule each atom belongs to (0..M-1, non-decreasing)
- ``offsets``  (M+1,) int64, atoms of molecule m are ``offsets[m]:offsets[m+1]``

Training batches (``aimnet_fast.data.collate``) also carry labels and their masks, by name:

- ``labels``   name -> tensor: ``energy`` (M,) float64 Ha, ``forces`` (N, 3) float32 Ha/Å,
  ``charges`` (N,) e, ``volumes`` (N,) bohr³; a missing value is 0 there
- ``masks``    name -> bool tensor, (M,) per molecule or (N,) per atom: True where the label is
  present (the whole row finite)
- ``conf_idx`` (M,) int64, the conformers of the data set (for ``PackedDataset.name``)

``validate`` checks what the model cannot check cheaply inside its forward pass, and names the
molecule in every error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from .constants import ELEMENTS, PERIODIC_TABLE
from .errors import InputError  # also importable from here, as before

#: Atoms closer than this (Å) are reported as overlapping.
MIN_DISTANCE_A = 0.1


@dataclass
class Batch:
    numbers: torch.Tensor
    coord: torch.Tensor
    mol_idx: torch.Tensor
    offsets: torch.Tensor
    names: list[str] = field(default_factory=list)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    conf_idx: Optional[torch.Tensor] = None

    @property
    def n_mol(self) -> int:
        return self.offsets.numel() - 1

    @property
    def n_atoms(self) -> int:
        """Atoms of all molecules together (``mol_sizes`` has them per molecule)."""
        return self.numbers.numel()

    @property
    def mol_sizes(self) -> torch.Tensor:
        """(M,) int64, the atom count of every molecule."""
        return self.offsets[1:] - self.offsets[:-1]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the batch with a name (``labels.<name>``, ``masks.<name>`` for those)."""
        for k in ("numbers", "coord", "mol_idx", "offsets", "conf_idx"):
            v = getattr(self, k)
            if v is not None:
                yield k, v
        for k, v in self.labels.items():
            yield f"labels.{k}", v
        for k, v in self.masks.items():
            yield f"masks.{k}", v

    def _map(self, fn, coord_fn=None) -> "Batch":
        coord_fn = coord_fn or fn
        return Batch(fn(self.numbers), coord_fn(self.coord), fn(self.mol_idx), fn(self.offsets),
                     list(self.names), {k: fn(v) for k, v in self.labels.items()},
                     {k: fn(v) for k, v in self.masks.items()},
                     None if self.conf_idx is None else fn(self.conf_idx))

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "Batch":
        """Everything moved to ``device``; only the coordinates are cast to ``dtype``. Labels keep
        their dtype (energies float64: the loss casts the residuals, not the Hartree totals)."""
        def move(t):
            return t if device is None else t.to(device, non_blocking=non_blocking)

        def coord(t):
            t = move(t)
            return t.to(dtype) if dtype is not None else t
        return self._map(move, coord)

    def pin_memory(self) -> "Batch":
        """A copy in pinned (page-locked) host memory, for asynchronous copies to the GPU."""
        return self._map(lambda t: t.pin_memory())

    @classmethod
    def from_molecules(cls, molecules: Sequence[tuple], names: Sequence[str] | None = None,
                       dtype=torch.float32) -> "Batch":
        """Build a batch from ``(numbers, coord_A)`` pairs (anything ``torch.as_tensor`` takes)."""
        nums, coords, sizes = [], [], []
        for numbers, coord in molecules:
            n = torch.as_tensor(numbers, dtype=torch.long).reshape(-1)
            c = torch.as_tensor(coord, dtype=torch.float64).reshape(-1, 3)
            nums.append(n)
            coords.append(c)
            sizes.append(n.numel())
        sizes_t = torch.tensor(sizes, dtype=torch.long)
        offsets = torch.zeros(len(sizes) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(sizes_t, 0)
        mol_idx = torch.repeat_interleave(torch.arange(len(sizes)), sizes_t)
        if names is None:
            names = [f"molecule {m}" for m in range(len(sizes))]
        numbers = torch.cat(nums) if nums else torch.zeros(0, dtype=torch.long)
        coord = torch.cat(coords).to(dtype) if coords else torch.zeros(0, 3, dtype=dtype)
        return cls(numbers, coord, mol_idx, offsets, list(names))

    def molecule(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[m]), int(self.offsets[m + 1])
        return self.numbers[a:b], self.coord[a:b]

    def name(self, m: int) -> str:
        return self.names[m] if m < len(self.names) else f"molecule {m}"

    def validate(self, elements: Sequence[int] = ELEMENTS, overlap: bool = True) -> "Batch":
        """Raise InputError for an empty molecule, an unknown element, NaN/inf coordinates or
        (``overlap``) atoms closer than MIN_DISTANCE_A; return self otherwise. A caller that builds
        the neighbor list anyway passes ``overlap=False`` and then ``check_overlap(its pairs)``."""
        if self.n_mol == 0:
            raise InputError("the batch holds no molecule")
        sizes = self.mol_sizes
        empty = torch.nonzero(sizes == 0).flatten()
        if empty.numel():
            raise InputError(f"{self.name(int(empty[0]))}: empty molecule (no atoms)")
        known = torch.zeros(max(max(elements), int(self.numbers.max())) + 1, dtype=torch.bool)
        known[list(elements)] = True
        bad = (self.numbers < 0) | ~known[self.numbers.clamp(min=0)]
        if bad.any():
            a = int(torch.nonzero(bad)[0])
            z = int(self.numbers[a])
            sym = PERIODIC_TABLE[z] if 0 <= z < len(PERIODIC_TABLE) else f"Z={z}"
            m = int(self.mol_idx[a])
            allowed = ", ".join(PERIODIC_TABLE[e] for e in elements)
            raise InputError(f"{self.name(m)}: element {sym} (Z={z}, atom {a - int(self.offsets[m])})"
                             f" is not supported; the model knows {allowed}")
        finite = torch.isfinite(self.coord).all(dim=1)
        if not finite.all():
            a = int(torch.nonzero(~finite)[0])
            m = int(self.mol_idx[a])
            raise InputError(f"{self.name(m)}: coordinates of atom {a - int(self.offsets[m])} "
                             f"are not finite: {self.coord[a].tolist()}")
        if overlap:
            self.check_overlap()
        return self

    def check_overlap(self, pairs: Optional[torch.Tensor] = None) -> "Batch":
        """Raise InputError, naming the molecule and both atoms, if two atoms are closer than
        MIN_DISTANCE_A. ``pairs`` (2, P), sorted by (i, j): a neighbor list of this batch with a
        cutoff of at least MIN_DISTANCE_A (e.g. the model's radial list), so that no second
        search is needed; without it, one is made. Coordinates must be finite (``validate``)."""
        coord = self.coord.detach()
        if pairs is None:
            from .neighbors import neighbor_pairs  # late import: neighbors imports nothing from here
            pairs = neighbor_pairs(coord, self.mol_idx, MIN_DISTANCE_A)
        else:
            pairs = pairs.to(coord.device)
            d2 = (coord.index_select(0, pairs[1]) - coord.index_select(0, pairs[0])).square().sum(1)
            pairs = pairs[:, d2 < MIN_DISTANCE_A * MIN_DISTANCE_A]
        if pairs.shape[1]:
            i, j = int(pairs[0, 0]), int(pairs[1, 0])
            m = int(self.mol_idx[i])
            o = int(self.offsets[m])
            d = float((self.coord[i] - self.coord[j]).norm())
            raise InputError(f"{self.name(m)}: atoms {i - o} and {j - o} are {d:.4f} Å apart "
                             f"(closer than {MIN_DISTANCE_A} Å: overlapping atoms)")
        return self


def species_index(numbers: torch.Tensor, elements: Sequence[int] = ELEMENTS) -> torch.Tensor:
    """Map atomic numbers to rows of the feature table (unknown elements map to -1)."""
    table = torch.full((max(max(elements), int(numbers.max()) if numbers.numel() else 0) + 1,),
                       -1, dtype=torch.long, device=numbers.device)
    table[torch.tensor(list(elements), device=numbers.device)] = torch.arange(
        len(elements), device=numbers.device)
    return table[numbers]

