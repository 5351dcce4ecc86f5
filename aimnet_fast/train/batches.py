"""The training data: the packed data set and its train/validation split, this rank's share of
the validation set, and batches on the device (assembled ahead by a thread where that helps)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .. import data as D
from ..batch import Batch
from ..errors import ConfigError, DataError
from ..padded import Padding
from . import config as C
from .dist import Dist


@dataclass
class TrainData:
    """The packed data set of every source of the run (``data.sources`` first, then
    ``data.val_sources``, then ``data.test_sources``) and its conformer indices per role."""
    ds: D.PackedDataset
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray

    def __iter__(self):   # ds, train_idx, val_idx = load_data(...)
        return iter((self.ds, self.train_idx, self.val_idx))


def load_data(cfg: C.TrainConfig, dist: Dist, log: Callable[[str], None]) -> TrainData:
    """The packed data set and the train / validation / test conformer indices (same on every
    rank). Validation: ``data.val_sources`` where given, else a split of ``data.sources``."""
    train_srcs = C.source_dicts(cfg.data)
    val_srcs = C.source_dicts(cfg.data, "val_sources")
    test_srcs = C.source_dicts(cfg.data, "test_sources")
    for name, held in (("val_sources", val_srcs), ("test_sources", test_srcs)):
        for n, s in enumerate(held):
            if s in train_srcs:
                raise ConfigError(f"data.{name}.{n}: {s.get('path')} is also in data.sources; "
                                  f"held-out data must not be trained on")
    # Rank 0 builds any cache first so ranks never write the same file at once.
    if not dist.is_main:
        dist.barrier()
    ds = D.load_dataset(train_srcs + val_srcs + test_srcs, cache_dir=cfg.data.cache_dir)
    if dist.is_main:
        dist.barrier()
        log(ds.summary())       # per source and label: read, used, masked, skipped
    source = np.asarray(ds.source, np.int64)
    n_tr, n_va = len(train_srcs), len(val_srcs)
    trainable = np.flatnonzero(source < n_tr)
    test_idx = np.flatnonzero(source >= n_tr + n_va)
    if val_srcs:
        train_idx, val_idx = trainable, np.flatnonzero((source >= n_tr) & (source < n_tr + n_va))
    elif cfg.data.split == "group":
        train_idx, val_idx = D.split(ds, val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed,
                                     indices=trainable)
    else:
        rng = np.random.default_rng(cfg.data.split_seed)
        perm = rng.permutation(trainable)
        n_val = max(1, int(round(cfg.data.val_fraction * len(perm))))
        train_idx, val_idx = np.sort(perm[n_val:]), np.sort(perm[:n_val])
    train_idx, val_idx = np.asarray(train_idx, np.int64), np.asarray(val_idx, np.int64)
    if cfg.data.max_conformers is not None and len(train_idx) + len(val_idx) > cfg.data.max_conformers:
        rng = np.random.default_rng(cfg.data.split_seed + 1)
        frac = cfg.data.max_conformers / (len(train_idx) + len(val_idx))
        n_tr = max(1, int(round(frac * len(train_idx))))
        n_va = max(1, int(round(frac * len(val_idx))))
        train_idx = np.sort(rng.choice(train_idx, n_tr, replace=False))
        val_idx = np.sort(rng.choice(val_idx, n_va, replace=False))
    for role, idx in (("training", train_idx), ("validation", val_idx)):
        if len(idx) == 0:
            raise DataError(f"no {role} conformers: check data.sources"
                            f"{', data.val_sources' if val_srcs else ' and data.val_fraction'}")
    return TrainData(ds, train_idx, val_idx, np.asarray(test_idx, np.int64))


def split_digest(train_idx: np.ndarray, val_idx: np.ndarray) -> str:
    """A fingerprint of the split, kept in checkpoints (the indices follow from data and config)."""
    h = hashlib.sha256(np.ascontiguousarray(train_idx, np.int64).tobytes())
    h.update(b"|" + np.ascontiguousarray(val_idx, np.int64).tobytes())
    return h.hexdigest()


def val_batches(val_idx: np.ndarray, dist: Dist, mols: int):
    """This rank's share of the validation set, in batches of ``mols`` conformers (no padding,
    so every conformer is counted once over all ranks)."""
    mine = val_idx[dist.rank::dist.world_size]
    return [mine[i:i + mols] for i in range(0, len(mine), mols)]


def device_batches(ds, index_batches: Iterator[np.ndarray], n: int, device: torch.device,
                   dtype: torch.dtype, prefetch: Optional[bool] = None,
                   pad: Optional[Callable[[Batch], tuple[Batch, Padding]]] = None) -> Iterator:
    """The batches of the next ``n`` index arrays of ``index_batches``, on ``device`` with
    coordinates in ``dtype``. With ``prefetch`` (default: on CUDA) a background thread assembles the
    next batch (in pinned memory on CUDA) while the current step runs; it then reads one index
    array ahead of the batches yielded. With ``pad`` (``CapacityPlan.pad``), each batch is padded
    on the host and yielded as (padded batch on ``device``, its ``Padding``, the unpadded batch on
    the host, for a redo with larger capacities)."""
    cuda = device.type == "cuda"

    def assemble(idx, pin: bool = False):
        b = D.collate(ds, idx)
        if pad is None:
            return b.pin_memory() if pin else b
        padded, padding = pad(b)
        return (padded.pin_memory() if pin else padded), padding, b

    def to_device(item):
        if pad is None:
            return item.to(device, dtype, non_blocking=True)
        return item[0].to(device, dtype, non_blocking=True), item[1], item[2]

    if not (cuda if prefetch is None else prefetch):
        for _ in range(n):
            yield to_device(assemble(next(index_batches)))
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(assemble, next(index_batches), cuda) if n else None
        for k in range(n):
            batch = pending.result()
            if k + 1 < n:
                pending = pool.submit(assemble, next(index_batches), cuda)
            yield to_device(batch)
