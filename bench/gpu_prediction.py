"""Print the counted work per molecule of an ANI-1x-like training step and the ceilings it implies on
an H100 (datasheet limits): the prediction written in bench/RESULTS.md before any GPU run.

    python bench/gpu_prediction.py [path/to/ani1x_sample.h5]
"""
import sys
from pathlib import Path

import h5py

from aimnet_fast.batch import Batch
from aimnet_fast.flops import count
from aimnet_fast.model import AIMNet
from aimnet_fast.neighbors import build_neighbors

LIMITS = {"FP32 67 TFLOP/s": ("flop", 67e12), "TF32 495 TFLOP/s": ("flop", 495e12),
          "HBM3 3.3 TB/s": ("bytes", 3.3e12)}


def main(path):
    mols = []
    with h5py.File(path, "r") as f:
        for g in f:
            for xyz in f[g]["coordinates"][:]:
                mols.append((f[g]["atomic_numbers"][:], xyz))
    b = Batch.from_molecules(mols)
    nb = build_neighbors(b.coord, b.mol_idx)
    m = len(mols)
    c = count(AIMNet(), b.n_atoms, nb.radial.shape[1], nb.triplets.shape[1], nb.pairs.shape[1])
    print(f"{m} molecules: {b.n_atoms / m:.1f} atoms, {nb.radial.shape[1] / m:.0f} radial pairs, "
          f"{nb.triplets.shape[1] / m:.0f} triplets, {nb.pairs.shape[1] / m:.0f} unique pairs each")
    flop, byte = c.train_flop / m, c.activation_bytes / m
    print(f"per molecule: forward {c.forward_flop / m / 1e6:.0f} MFLOP, training step "
          f"{flop / 1e6:.0f} MFLOP, {byte / 1e6:.2f} MB of activations")
    for name, (kind, rate) in LIMITS.items():
        t = (flop if kind == "flop" else byte) / rate
        print(f"{name:>18s}: {t * 1e6:5.2f} µs/molecule, ceiling {1 / t / 1e3:6.0f}k molecules/s, "
              f"120k/s uses {120e3 * t * 100:4.1f} %")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1].parent / "shared/data/ani1x_sample.h5"
    main(sys.argv[1] if len(sys.argv) > 1 else default)
