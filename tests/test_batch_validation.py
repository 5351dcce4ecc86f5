"""Bad input gets a clear error naming the molecule."""
import math

import pytest
import torch

from aimnet_fast.batch import Batch, InputError

WATER = ([8, 1, 1], [[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.24, 0.927, 0.0]])


def batch(*mols):
    return Batch.from_molecules(list(mols), names=[f"mol{k}" for k in range(len(mols))])


def test_good_batch_passes():
    assert batch(WATER, WATER).validate().n_mol == 2


def test_unknown_element_is_named():
    with pytest.raises(InputError, match=r"mol1: element Br \(Z=35, atom 2\)"):
        batch(WATER, ([6, 1, 35], [[0, 0, 0], [1.1, 0, 0], [0, 1.9, 0]])).validate()


def test_overlapping_atoms():
    with pytest.raises(InputError, match=r"mol0: atoms 0 and 2 are 0\.0500 Å apart"):
        batch(([8, 1, 1], [[0, 0, 0], [0.96, 0, 0], [0.05, 0, 0]])).validate()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_coordinates(bad):
    with pytest.raises(InputError, match="mol1: coordinates of atom 1 are not finite"):
        batch(WATER, ([8, 1, 1], [[0, 0, 0], [bad, 0, 0], [0, 1, 0]])).validate()


def test_empty_molecule():
    with pytest.raises(InputError, match="mol1: empty molecule"):
        batch(WATER, ([], torch.zeros(0, 3)), WATER).validate()
