"""Triton neighbor search (kernels/neighbors.py) against the reference cell list
(aimnet_fast.neighbors.neighbor_pairs): the same pairs in the same order.

Runs under TRITON_INTERPRET=1 without a GPU. Tiles are shrunk (4 centre atoms × 8 candidates) so
that molecules of 1–19 atoms straddle both tile boundaries. The pair buffer and the counts are
filled with −1 before the kernels run (part of their contract), the triplet buffers are poisoned
(``poisoned_buffers``), so unwritten slots fail the comparison.
"""
import json

import pytest
import torch

from aimnet_fast.kernels import neighbors as nb
from aimnet_fast.neighbors import neighbor_pairs as reference_pairs

pytestmark = pytest.mark.usefixtures("poisoned_buffers", "kernel_device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setitem(nb.BLOCKS, "BLOCK_I", 4)
    monkeypatch.setitem(nb.BLOCKS, "BLOCK_J", 8)


def mixed_batch(dtype, seed=0):
    """Molecules of 1, 2, 13, 5, 9 atoms in a 6 Å box, plus 3 atoms 10 Å apart (no neighbors)."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    sizes = [1, 2, 13, 5, 9]
    parts = [torch.rand(n, 3, generator=g, dtype=torch.float64) * 6 for n in sizes]
    parts.append(torch.tensor([[0.0, 0, 0], [10.0, 0, 0], [0, 10.0, 0]], dtype=torch.float64))
    sizes.append(3)
    coord = torch.cat(parts).to(dtype)
    mol_idx = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return coord, mol_idx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cutoff", [4.6, 3.1])
def test_mixed_batch_matches_reference(dtype, cutoff):
    coord, mol_idx = mixed_batch(dtype, seed=int(cutoff * 10))
    got = nb.neighbor_pairs(coord, mol_idx, None, cutoff)
    want = reference_pairs(coord, mol_idx, cutoff)
    assert want.shape[1] > 0
    assert got.dtype == torch.int64
    assert torch.equal(got, want)
    # the molecule of isolated atoms (the last three) has no pairs; symmetry holds
    assert not (got[0] >= coord.shape[0] - 3).any()
    fwd = set(map(tuple, got.T.tolist()))
    assert fwd == {(j, i) for i, j in fwd}


def test_counts_match_reference_and_isolated_atoms_have_none():
    coord, mol_idx = mixed_batch(torch.float64, seed=1)
    offsets = nb.offsets_from_mol_idx(mol_idx)
    counts = nb.neighbor_counts(coord, offsets, 4.6)
    want = torch.bincount(reference_pairs(coord, mol_idx, 4.6)[0], minlength=coord.shape[0])
    assert torch.equal(counts.long(), want)
    assert counts[0] == 0            # the 1-atom molecule
    assert (counts[-3:] == 0).all()  # the molecule with no neighbor inside the cutoff


def test_single_atom_molecules_only():
    coord = torch.zeros(3, 3, dtype=torch.float64)  # same point, but three different molecules
    mol_idx = torch.arange(3)
    got = nb.neighbor_pairs(coord, mol_idx, None, 4.6)
    assert got.shape == (2, 0)


def test_no_pairs_across_molecules():
    g = torch.Generator(DEVICE).manual_seed(2)
    x = torch.rand(6, 3, generator=g, dtype=torch.float64) * 2
    coord = torch.cat([x, x])            # two copies on top of each other
    mol_idx = torch.tensor([0] * 6 + [1] * 6)
    got = nb.neighbor_pairs(coord, mol_idx, None, 4.6)
    assert torch.equal(got, reference_pairs(coord, mol_idx, 4.6))
    assert ((got[0] < 6) == (got[1] < 6)).all()
    assert got.shape[1] == 2 * 30


def test_pairs_at_the_cutoff_follow_the_reference():
    """Strict inequality, decided in float64 like the reference, even for float32 coordinates."""
    eps = 1e-9
    coord = torch.tensor([[0.0, 0, 0], [4.6 - eps, 0, 0], [0, 4.6 + eps, 0], [0, 0, 4.6]],
                         dtype=torch.float64)
    mol_idx = torch.zeros(4, dtype=torch.long)
    for c in (coord, coord.float()):
        got = nb.neighbor_pairs(c, mol_idx, None, 4.6)
        assert torch.equal(got, reference_pairs(c, mol_idx, 4.6))
    assert {(0, 1), (1, 0)} <= set(map(tuple, nb.neighbor_pairs(coord, mol_idx, None, 4.6).T.tolist()))


def test_real_molecules_in_one_batch(shared):
    ref = json.loads((shared / "reference" / "aimnet_original_outputs.json").read_text())
    mols = ref["molecules"][:6] + ref["molecules"][8:11]
    coord = torch.cat([torch.tensor(m["coord_A"], dtype=torch.float32) for m in mols])
    mol_idx = torch.repeat_interleave(torch.arange(len(mols)),
                                      torch.tensor([len(m["numbers"]) for m in mols]))
    offsets = nb.offsets_from_mol_idx(mol_idx)
    for cutoff in (4.6, 3.1):
        got = nb.neighbor_pairs(coord, mol_idx, offsets, cutoff)
        assert torch.equal(got, reference_pairs(coord, mol_idx, cutoff))


def test_overflow_flag_and_grow_path():
    coord, mol_idx = mixed_batch(torch.float64, seed=3)
    offsets = nb.offsets_from_mol_idx(mol_idx)
    want = reference_pairs(coord, mol_idx, 4.6)
    cap = 5
    pairs, n_pairs, overflow = nb.neighbor_pairs_padded(coord, offsets, 4.6, cap)
    assert bool(overflow) and int(n_pairs) == want.shape[1]
    assert torch.equal(pairs, want[:, :cap])                    # the first slots, never garbage
    pairs, n_pairs, overflow = nb.neighbor_pairs_padded(coord, offsets, 4.6, want.shape[1] + 7)
    assert not bool(overflow)
    assert torch.equal(pairs[:, :want.shape[1]], want)
    assert (pairs[:, want.shape[1]:] == -1).all()                # nothing written past the count
    # the host wrapper grows a tiny buffer to the counted size and reruns
    assert torch.equal(nb.neighbor_pairs(coord, mol_idx, offsets, 4.6, capacity=1), want)
    # an explicit per-molecule bound gives the same result without reading offsets on the host
    pairs, n_pairs, overflow = nb.neighbor_pairs_padded(coord, offsets, 4.6, want.shape[1],
                                                        max_atoms=13)
    assert torch.equal(pairs, want) and not bool(overflow)
    # a bound below the largest molecule (13 atoms) leaves atoms uncounted: flagged, not silent
    _, _, overflow = nb.neighbor_pairs_padded(coord, offsets, 4.6, want.shape[1], max_atoms=4)
    assert bool(overflow)


def test_same_signature_as_reference_and_input_checks():
    coord, mol_idx = mixed_batch(torch.float32, seed=4)
    assert torch.equal(nb.neighbor_pairs_like_reference(coord, mol_idx, 3.1),
                       reference_pairs(coord, mol_idx, 3.1))
    with pytest.raises(ValueError):
        nb.offsets_from_mol_idx(torch.tensor([0, 1, 0]))
    assert nb.neighbor_pairs(coord[:0], mol_idx[:0], None, 4.6).shape == (2, 0)


def test_opcheck_fake_registration():
    coord, mol_idx = mixed_batch(torch.float32, seed=5)
    offsets = nb.offsets_from_mol_idx(mol_idx)
    torch.library.opcheck(nb.neighbor_pairs_padded, (coord, offsets, 4.6, 300),
                          test_utils=("test_schema", "test_faketensor"))


def _same_neighbors(got, want):
    for field in ("radial", "angular", "triplets", "pairs", "triplet_pair"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_build_neighbors_matches_reference_mixed_batch(monkeypatch):
    """Radial and angular pairs, triplets (i; j<k) and unique pairs; BLOCK of 4 partners so
    atoms with up to 12 angular neighbors straddle it. Coordinates in a 4 Å box: many triplets."""
    from aimnet_fast.neighbors import build_neighbors
    monkeypatch.setattr(nb, "TRIPLET_BLOCK", 4)
    g = torch.Generator(DEVICE).manual_seed(11)
    sizes = [1, 2, 13, 5, 3]
    coord = torch.rand(sum(sizes), 3, generator=g, dtype=torch.float64) * 4
    coord[-3:] = torch.tensor([[0.0, 0, 0], [10.0, 0, 0], [0, 10.0, 0]])  # no neighbors
    mol_idx = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    want = build_neighbors(coord, mol_idx)
    assert want.triplets.shape[1] > 100
    _same_neighbors(nb.build_neighbors(coord, mol_idx), want)


def test_triplets_pair_slots_match_reference():
    from aimnet_fast.neighbors import neighbor_pairs, triplets_from_pairs
    coord, mol_idx = mixed_batch(torch.float64, seed=12)
    angular = neighbor_pairs(coord, mol_idx, 3.1)
    counts = torch.bincount(angular[0], minlength=coord.shape[0])
    got_t, got_p = nb.triplets_from_pairs(angular, counts)
    want_t, want_p = triplets_from_pairs(angular, coord.shape[0])
    assert torch.equal(got_t, want_t) and torch.equal(got_p, want_p)


def test_build_neighbors_real_molecules(shared):
    from aimnet_fast.neighbors import build_neighbors
    ref = json.loads((shared / "reference" / "aimnet_original_outputs.json").read_text())
    mols = [ref["molecules"][i] for i in (0, 8, 9)]
    coord = torch.cat([torch.tensor(m["coord_A"], dtype=torch.float64) for m in mols])
    mol_idx = torch.repeat_interleave(torch.arange(len(mols)),
                                      torch.tensor([len(m["numbers"]) for m in mols]))
    _same_neighbors(nb.build_neighbors(coord, mol_idx), build_neighbors(coord, mol_idx))

