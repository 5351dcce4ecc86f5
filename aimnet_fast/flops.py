"""Counted work of an AIMNet step, for predictions against a device's limits and for printing the
model-FLOPs utilisation next to the loss.

Counts are multiply-adds of the network's matrix products and contractions for the actual atom,
pair and triplet counts of a batch (1 multiply-add = 2 FLOP). Element-wise work (ELU, the AEV terms,
gathers) is left out of the FLOPs and shows in the bytes instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from .constants import N_ANGULAR, N_FEATURE, N_RADIAL


def _mlp_macs(sizes) -> int:
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


EMBED_MACS = _mlp_macs([(N_RADIAL + N_ANGULAR) * N_FEATURE, 512, 256, 256])
UPDATE_MACS = _mlp_macs([256 + N_FEATURE, 256, 256, N_FEATURE])
INTERACT_MACS = _mlp_macs([256 + N_FEATURE, 256, 256, 128])
HEADS_MACS = sum(_mlp_macs([128, 128, 128, k]) for k in (1, 4, 1))
COMBINE_MACS = _mlp_macs([2 * N_FEATURE, 256, 128, N_FEATURE])


@dataclass
class StepCount:
    forward_flop: float
    train_flop: float          # forward + backward ≈ 3 × forward (two products per product)
    activation_bytes: float    # float32 activations written forward and read backward


def count(n_atoms: int, n_radial_pairs: int, n_triplets: int, n_unique_pairs: int,
          n_pass: int = 3, all_passes: bool = True) -> StepCount:
    """Work of one step on a batch with these counts (ordered radial pairs, triplets, unique
    (j, k) pairs of the triplets)."""
    heads_passes = n_pass if all_passes else 1
    macs = n_atoms * (n_pass * EMBED_MACS + (n_pass - 1) * UPDATE_MACS
                      + heads_passes * (INTERACT_MACS + HEADS_MACS))
    macs += (n_pass - 1) * n_unique_pairs * COMBINE_MACS      # pass 1 uses a 7×7 table
    macs += n_pass * (n_radial_pairs * N_RADIAL * N_FEATURE + n_triplets * N_ANGULAR * N_FEATURE)
    fwd = 2.0 * macs
    # Activations per atom and pass: contraction outputs (768), embedding layers (512+256+256),
    # update/interact layers (256+256+16 + 256+256+128) and heads (3 × 256 + 6); per unique
    # pair, combine layers (256+128+16). Each float is written once and read once in backward.
    per_atom = 768 + 1024 + 528 + 640 + 774
    floats = n_pass * n_atoms * per_atom + (n_pass - 1) * n_unique_pairs * 400
    return StepCount(fwd, 3.0 * fwd, 2 * 4.0 * floats)
