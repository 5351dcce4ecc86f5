"""Splits by molecule, the (distributed) batch sampler and batch assembly (``collate``)."""
from __future__ import annotations

import numpy as np
import torch

from ..batch import Batch
from ..errors import DataError


def split(ds, val_fraction: float = 0.1, seed: int = 0, n_folds: int | None = None,
          fold: int | None = None, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx), sorted int64 conformer indices; every molecule/formula (``ds.group``)
    lies wholly on one side. ``indices``: split only these conformers (default all).

    ``n_folds``/``fold``: k-fold split, the groups dealt (in a seeded random order) to the fold with
    the fewest conformers so far; fold ``fold`` is the validation side. Otherwise about
    ``val_fraction`` of the conformers, by whole groups taken in a seeded random order while each
    brings the count closer to the target (at least one group when ``val_fraction`` > 0).
    """
    group = np.asarray(ds.group)
    if indices is None:
        return _split_groups(group, val_fraction, seed, n_folds, fold)
    indices = np.asarray(indices, np.int64)
    tr, va = _split_groups(group[indices], val_fraction, seed, n_folds, fold)
    return indices[tr], indices[va]


def _split_groups(group: np.ndarray, val_fraction: float, seed: int, n_folds: int | None,
                  fold: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``split`` of conformers whose molecule/formula ids are ``group``: positions into it."""
    n_groups = int(group.max()) + 1 if group.size else 0
    size = np.bincount(group, minlength=n_groups)
    live = np.flatnonzero(size)
    rng = np.random.default_rng(seed)
    order = live[rng.permutation(live.size)]
    if n_folds is not None:
        if fold is None or not 0 <= fold < n_folds:
            raise ValueError(f"fold must be in 0..{n_folds - 1}")
        if live.size < n_folds:
            raise DataError(f"{live.size} molecules/formulas cannot fill {n_folds} folds")
        load = np.zeros(n_folds, np.int64)
        fold_of = np.full(n_groups, -1)
        # Largest groups first (random order among equals) balances the folds' conformer counts.
        order = order[np.argsort(-size[order], kind="stable")]
        for g in order:
            f = int(np.argmin(load))
            fold_of[g] = f
            load[f] += size[g]
        is_val = fold_of[group] == fold
    else:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")
        target = val_fraction * group.size
        # Groups in seeded random order; a group goes to validation when it brings the count
        # closer to the target (a group larger than that is passed over, not taken whole).
        taken, tot = [], 0
        if val_fraction > 0:
            for g in order:
                if abs(tot + size[g] - target) < abs(tot - target):
                    taken.append(g)
                    tot += size[g]
                    if tot >= target:
                        break
            if not taken:
                taken = [order[np.argmin(size[order])]]
            if len(taken) >= live.size:
                if live.size < 2:
                    raise DataError("one molecule/formula only: cannot split it into train and val")
                taken = taken[:-1]
        val_groups = np.zeros(n_groups, bool)
        val_groups[np.asarray(taken, np.int64)] = True
        is_val = val_groups[group]
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def _deal(sizes: np.ndarray, world: int) -> np.ndarray:
    """Rank of every entry of ``sizes`` (S, G) (rows sorted largest first, G a multiple of ``world``):
    in rounds of ``world`` entries, the largest goes to the rank with the fewest atoms so far. Every
    rank gets one entry per round, so molecule counts differ by one at most (zero-size padding
    entries sit at the row ends)."""
    s, g = sizes.shape
    load = np.zeros((s, world), np.int64)
    rank = np.empty((s, g), np.int64)
    for r in range(0, g, world):
        order = np.argsort(load, axis=1, kind="stable")
        rank[:, r:r + world] = order
        np.put_along_axis(load, order, np.take_along_axis(load, order, 1) + sizes[:, r:r + world], 1)
    return rank


class BatchSampler:
    """Batches of conformer indices for one rank of ``world_size``.

    Each step takes the next ``world_size × mols_per_batch`` conformers (or conformers up to
    ``world_size × atoms_per_batch`` atoms) of the epoch's seeded permutation and deals them to the
    ranks largest first, each to the rank with the fewest atoms so far (one per rank and round), so
    ranks get the same number of molecules (±1) and close atom counts. Every rank computes the same
    plan, so ``len`` is the same on every rank. The last step is smaller; where it has fewer
    conformers than ranks it is padded with conformers from the start of the epoch, so that no rank
    gets an empty batch.

    ``set_epoch(e)`` reshuffles (seed and epoch give the order); ``state_dict``/``load_state_dict``
    hold the epoch and the steps already taken, to resume mid-epoch. The plan depends on the world
    size: a state saved with another one resumes by dealing the conformers the epoch has not used
    yet to the new ranks (``segments`` records the parts trained with earlier world sizes).
    """

    def __init__(self, ds, indices=None, mols_per_batch: int = 380, atoms_per_batch: int | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.indices = np.arange(ds.n_conf, dtype=np.int64) if indices is None \
            else np.asarray(indices, np.int64)
        if self.indices.size == 0:
            raise DataError("BatchSampler: no conformers")
        self.sizes = np.asarray(ds.n_atoms[self.indices], np.int64)
        self.mols_per_batch, self.atoms_per_batch = int(mols_per_batch), atoms_per_batch
        if atoms_per_batch is not None and atoms_per_batch < self.sizes.max():
            raise ValueError(f"atoms_per_batch {atoms_per_batch} is below the largest conformer "
                             f"({self.sizes.max()} atoms)")
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, int(seed), rank, world_size
        self.epoch, self.position, self.segments = 0, 0, []
        self._batches = self._plan(0)

    def _perm(self, epoch: int) -> np.ndarray:
        """The epoch's order: positions into ``indices``."""
        n = self.indices.size
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _deal_steps(self, perm: np.ndarray, world: int) -> np.ndarray:
        """Steps of ``perm`` (positions into ``indices``) for ``world`` ranks: an array (steps,
        ranks, width) of positions, -1 where a rank's batch is shorter."""
        n, w = perm.size, world
        if n == 0:
            return np.zeros((0, w, 0), np.int64)
        if self.atoms_per_batch is None:
            g = w * self.mols_per_batch
            bounds = list(range(0, n, g)) + [n]
        else:
            cum = np.cumsum(self.sizes[perm])
            step = (cum - 1) // (w * int(self.atoms_per_batch))
            bounds = [0] + list(np.flatnonzero(np.diff(step)) + 1) + [n]
        segs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            seg = perm[a:b]
            if seg.size < w:  # no rank may get an empty batch
                seg = np.concatenate([seg, np.resize(perm, w - seg.size)])
            segs.append(seg)
        width = -(-max(x.size for x in segs) // w) * w
        pos = np.full((len(segs), width), -1, np.int64)
        for i, x in enumerate(segs):
            pos[i, : x.size] = x
        size = np.where(pos >= 0, self.sizes[np.maximum(pos, 0)], 0)
        order = np.argsort(-size, axis=1, kind="stable")
        pos = np.take_along_axis(pos, order, 1)
        rank = _deal(np.take_along_axis(size, order, 1), w)
        out = np.full((len(segs), w, width), -1, np.int64)
        for r in range(w):
            out[:, r, :] = np.where(rank == r, pos, -1)
        return out

    def _plan(self, epoch: int, segments=()) -> list[np.ndarray | None]:
        """This rank's batches of ``epoch``. ``segments``: [world size, steps] of the parts of the
        epoch already trained with other world sizes (a resume on another number of ranks): the
        conformers those steps used, on all their ranks, are taken out and the rest is dealt to
        this run's ranks; the steps already taken are ``None``."""
        remaining, done = self._perm(epoch), 0
        for world, steps in segments:
            used = self._deal_steps(remaining, int(world))[: int(steps)]
            remaining = remaining[~np.isin(remaining, used[used >= 0])]
            done += int(steps)
        steps = self._deal_steps(remaining, self.world_size)
        mine = [np.sort(self.indices[row[row >= 0]]) for row in steps[:, self.rank, :]]
        return [None] * done + mine

    def set_epoch(self, epoch: int):
        self.epoch, self.position, self.segments = int(epoch), 0, []
        self._batches = self._plan(self.epoch)

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        while self.position < len(self._batches):
            b = self._batches[self.position]
            self.position += 1
            yield b
        self.position = 0

    def state_dict(self, position: int | None = None) -> dict:
        """Epoch and position (batches of the epoch used so far; default: those yielded). A loader
        that reads batches ahead of the steps passes the number of steps it has taken.
        ``segments``: the parts of this epoch trained before with another world size."""
        return {"epoch": self.epoch, "position": self.position if position is None else int(position),
                "seed": self.seed, "world_size": self.world_size, "n_indices": int(self.indices.size),
                "segments": [list(x) for x in self.segments]}

    def load_state_dict(self, state: dict, source: str = "-"):
        """Continue where ``state`` left off; ``source`` names where the state came from (a
        checkpoint file) in a DataError. Saved with another world size, the rest of the epoch is
        dealt again: every conformer of the epoch is still trained once (the new number of ranks
        makes the steps' batch larger or smaller)."""
        if state["n_indices"] != self.indices.size:
            raise DataError(f"the batch sampler state is for {state['n_indices']} conformers, this "
                            f"run samples {self.indices.size}", file=source)
        self.seed = int(state["seed"])
        epoch, position = int(state["epoch"]), int(state["position"])
        segments = [list(x) for x in state.get("segments", [])]
        if int(state["world_size"]) != self.world_size:
            segments.append([int(state["world_size"]), position - sum(s for _, s in segments)])
        batches = self._plan(epoch, segments)
        if not 0 <= position <= len(batches):
            raise DataError(f"batch sampler position {position} outside the epoch", file=source)
        self.epoch, self.position, self.segments, self._batches = epoch, position, segments, batches


def collate(ds, conf_idx) -> Batch:
    """A training ``Batch`` (CPU tensors) of the conformers ``conf_idx`` of ``ds``.

    numbers (N,) int64; coord (N, 3) float32 Å; mol_idx (N,) int64; offsets (M+1,) int64;
    conf_idx (M,) int64 (indices into ``ds``, for ``ds.name``); ``labels[name]`` for each label of
    the data set (energy (M,) float64 Ha, forces (N, 3) float32 Ha/Å, charges (N,) e, volumes (N,)
    bohr³) and ``masks[name]`` (bool, (M,) per conformer, (N,) per atom: the whole row finite);
    masked values are 0.
    """
    idx = np.asarray(conf_idx, np.int64)
    start = np.asarray(ds.conf_offsets[idx])
    n = np.asarray(ds.n_atoms[idx])
    offsets = np.zeros(idx.size + 1, np.int64)
    np.cumsum(n, out=offsets[1:])
    tot = int(offsets[-1])
    atom = np.repeat(start - offsets[:-1], n) + np.arange(tot)
    labels, masks = {}, {}
    for name, arr in ds.labels.items():
        v = np.array(arr[atom] if ds.label_per.get(name) == "atom" else arr[idx])
        fin = np.isfinite(v)
        mask = fin.reshape(v.shape[0], -1).all(axis=1)
        if not fin.all():
            v[~mask] = 0.0
            v[~fin] = 0.0
        labels[name] = torch.from_numpy(v)
        masks[name] = torch.from_numpy(mask)
    return Batch(numbers=torch.from_numpy(np.asarray(ds.numbers[atom], np.int64)),
                 coord=torch.from_numpy(np.ascontiguousarray(ds.coord[atom], np.float32)),
                 mol_idx=torch.from_numpy(np.repeat(np.arange(idx.size), n)),
                 offsets=torch.from_numpy(offsets), labels=labels, masks=masks,
                 conf_idx=torch.from_numpy(idx.copy()))
