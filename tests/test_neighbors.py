"""Reference neighbor search against brute force: same pairs, never across molecules, triplets."""
import itertools

import pytest
import torch

from aimnet_fast.batch import Batch
from aimnet_fast.neighbors import build_neighbors, neighbor_pairs


def brute_pairs(coord, mol_idx, cutoff):
    d = torch.cdist(coord.double(), coord.double())
    same = mol_idx[:, None] == mol_idx[None, :]
    ok = same & (d < cutoff) & ~torch.eye(len(coord), dtype=torch.bool)
    return set(map(tuple, torch.nonzero(ok).tolist()))


def random_batch(sizes, box, seed):
    g = torch.Generator().manual_seed(seed)
    mols = [(torch.ones(n, dtype=torch.long), torch.rand(n, 3, generator=g, dtype=torch.float64) * box
             - box / 2) for n in sizes]
    return Batch.from_molecules(mols, dtype=torch.float64)


@pytest.mark.parametrize("sizes,box", [([1], 5.0), ([2], 3.0), ([2, 1, 5], 6.0),
                                       ([30, 7, 60], 9.0), ([200], 25.0), ([5, 5], 40.0)])
@pytest.mark.parametrize("cutoff", [3.1, 4.6])
def test_pairs_match_brute_force(sizes, box, cutoff):
    b = random_batch(sizes, box, seed=sum(sizes))
    # Molecules on top of each other: a search that crossed molecules would find extra pairs.
    pairs = neighbor_pairs(b.coord, b.mol_idx, cutoff)
    got = list(map(tuple, pairs.t().tolist()))
    assert got == sorted(got), "pairs must be sorted by i then j"
    assert set(got) == brute_pairs(b.coord, b.mol_idx, cutoff)
    assert len(got) == len(set(got))


def test_triplets_and_unique_pairs():
    b = random_batch([12, 9, 1, 2], 5.0, seed=3)
    nb = build_neighbors(b.coord, b.mol_idx)
    ang = brute_pairs(b.coord, b.mol_idx, 3.1)
    assert set(map(tuple, nb.angular.t().tolist())) == ang
    expect = set()
    for i in range(b.n_atoms):
        js = sorted(j for (a, j) in ang if a == i)
        expect |= {(i, j, k) for j, k in itertools.combinations(js, 2)}
    got = list(map(tuple, nb.triplets.t().tolist()))
    assert len(got) == len(expect) and set(got) == expect
    # Each triplet points at its own (j, k) pair; each pair appears once.
    jk = nb.pairs[:, nb.triplet_pair]
    assert torch.equal(jk, nb.triplets[1:])
    assert len(set(map(tuple, nb.pairs.t().tolist()))) == nb.pairs.shape[1]


def test_no_neighbors():
    b = random_batch([3], 1.0, seed=0)
    b.coord = b.coord * 100.0   # atoms ~100 Å apart
    nb = build_neighbors(b.coord, b.mol_idx)
    assert nb.radial.shape == (2, 0) and nb.triplets.shape == (3, 0) and nb.pairs.shape == (2, 0)
