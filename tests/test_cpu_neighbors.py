"""The cpu backend's neighbor search (``aimnet_fast.cpu_neighbors``) against the reference's:
the same five lists, element for element and in the same order, through both of its paths (every
pair inside each molecule, and the reference's cell list above the size limit), the triplets and
unique pairs by the native kernels (where there is a C compiler) and by torch."""
import pytest
import torch

from aimnet_fast import cpu_native, cpu_neighbors, ops
from aimnet_fast import neighbors as reference
from aimnet_fast.batch import Batch
from aimnet_fast.constants import RADIAL_CUTOFF_A

LISTS = ("radial", "angular", "triplets", "pairs", "triplet_pair")


def same_lists(coord, mol_idx):
    want = reference.build_neighbors(coord, mol_idx)
    got = cpu_neighbors.build_neighbors(coord, mol_idx)
    for name in LISTS:
        a, b = getattr(want, name), getattr(got, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    return want


def random_batch(sizes, box, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mols = [(torch.ones(n, dtype=torch.long),
             torch.rand(n, 3, generator=g, dtype=torch.float64) * box - box / 2) for n in sizes]
    return Batch.from_molecules(mols, dtype=dtype)


@pytest.mark.parametrize("limit", [None, 10 ** 9, 0])  # as set, every pair tested, cell list
@pytest.mark.parametrize("sizes,box", [([1], 5.0), ([2, 1, 5], 6.0), ([30, 7, 60, 1, 1], 9.0),
                                       ([200], 25.0), ([5, 5], 40.0), ([20] * 40, 8.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("native", [True, False])
def test_lists_equal_the_reference(sizes, box, limit, dtype, native, monkeypatch):
    if native and cpu_native.library() is None:
        pytest.skip("no C compiler: the native triplets are not built")
    if not native:
        monkeypatch.setattr(cpu_native, "library", lambda: None)
    calls = []
    real = cpu_native.triplets_and_pairs
    monkeypatch.setattr(cpu_native, "triplets_and_pairs", lambda *a: calls.append(1) or real(*a))
    if limit is not None:
        monkeypatch.setattr(cpu_neighbors, "BRUTE_FORCE_PAIRS_PER_ATOM", limit)
    b = random_batch(sizes, box, seed=sum(sizes), dtype=dtype)
    nb = same_lists(b.coord, b.mol_idx)
    assert nb.radial.shape[1] > 0 or box == 40.0 or b.n_atoms < 3  # 40 Å: atoms far apart
    assert len(calls) == native


def test_real_molecules_and_the_cutoff_itself(reference_molecules):
    b = Batch.from_molecules([(m["numbers"], m["coord_A"]) for m in reference_molecules])
    assert same_lists(b.coord, b.mol_idx).triplets.shape[1] > 1000
    # atoms exactly one cutoff apart (float64 |d|² equal to cutoff²) are not neighbors, in both
    coord = torch.tensor([[0.0, 0.0, 0.0], [RADIAL_CUTOFF_A, 0.0, 0.0], [RADIAL_CUTOFF_A / 2, 1.0, 0.0]],
                         dtype=torch.float64)
    nb = same_lists(coord, torch.zeros(3, dtype=torch.long))
    assert nb.radial.t().tolist() == [[0, 2], [1, 2], [2, 0], [2, 1]]


def test_empty_and_the_backend_uses_it():
    same_lists(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert ops.implementation("cpu").build_neighbors is cpu_neighbors.build_neighbors
