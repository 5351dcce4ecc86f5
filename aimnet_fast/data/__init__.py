"""The data layer: readers for public HDF5 layouts, the packed (memory-mapped) dataset, SAE fit,
splits by molecule, the distributed batch sampler and ``collate``.

Contract (used by the trainer)::

    ds = load_dataset(sources, cache_dir=...)      # PackedDataset
    sae = fit_sae(ds)                              # (7,) float64 Ha
    train, val = split(ds, val_fraction=0.1, seed=0)
    sampler = BatchSampler(ds, train, mols_per_batch=380, rank=r, world_size=w)
    for idx in sampler: batch = collate(ds, idx)   # aimnet_fast.batch.Batch with labels and masks
"""
from .dataset import (PackedDataset, default_dataset_path, default_sources, load_dataset,
                      load_source)
from ..errors import DataError
from .readers import LAYOUTS, UNITS, detect_layout, normalize_source
from .sae import element_counts, fit_sae, relative_energy
from .sampling import BatchSampler, collate, split

__all__ = ["PackedDataset", "load_dataset", "load_source", "default_dataset_path",
           "default_sources", "DataError", "LAYOUTS", "UNITS", "detect_layout", "normalize_source",
           "fit_sae", "element_counts", "relative_energy", "split", "BatchSampler", "collate"]
