"""Our checkpoint format: round trip, recorded metadata, and refusals."""
import pytest
import torch

from aimnet_fast.batch import Batch
from aimnet_fast.checkpoint import (FORMAT_VERSION, CheckpointError, convert_released, load_model,
                                    save_model)


def test_round_trip_records_units_elements_constants(tmp_path, released_models, reference_molecules):
    path = tmp_path / "cv0.pt"
    save_model(released_models[0], path)
    ck = torch.load(path, weights_only=False)
    assert ck["format_version"] == FORMAT_VERSION
    assert ck["units"]["energy"] == "hartree" and ck["units"]["coord"] == "angstrom"
    assert ck["model"]["elements"] == [1, 6, 7, 8, 16, 9, 17]
    assert ck["constants"]["radial_cutoff_A"] == 4.6
    m = load_model(path, backend="torch")
    mol = reference_molecules[0]
    b = Batch.from_molecules([(mol["numbers"], mol["coord_A"])])
    e = m(b.numbers, b.coord, b.mol_idx, 1)["energy"]
    assert abs(e.item() - mol["models"][0]["energy_Ha"]) < 1e-4


def test_solvent_head_only(shared, reference_molecules):
    d = shared / "aimnet_pretrained"
    m = convert_released(d / "aimnet_cv0.pt", d / "aimnet_smd_cv0.pt")
    assert list(m.heads.keys()) == ["energy"]
    mol = reference_molecules[0]
    b = Batch.from_molecules([(mol["numbers"], mol["coord_A"])])
    out = m(b.numbers, b.coord, b.mol_idx, 1)
    assert "charges" not in out and torch.isfinite(out["energy"]).all()
    # The solvent head gives a different (solvated) energy, within a few tens of kcal/mol.
    assert 1e-4 < abs(out["energy"].item() - mol["models"][0]["energy_Ha"]) < 0.1


def test_refuses_released_file_and_foreign_constants(tmp_path, shared, released_models):
    with pytest.raises(CheckpointError, match="not an aimnet_fast checkpoint"):
        load_model(shared / "aimnet_pretrained" / "aimnet_cv0.pt")
    path = tmp_path / "m.pt"
    save_model(released_models[0], path)
    ck = torch.load(path, weights_only=False)
    ck["constants"]["radial_cutoff_A"] = 5.2
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="radial_cutoff_A"):
        load_model(path)
