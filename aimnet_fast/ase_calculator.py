"""An ASE calculator for AIMNet (needs the ``ase`` extra: ``pip install aimnet_fast[ase]``).

    from aimnet_fast.ase_calculator import AIMNetCalculator
    atoms.calc = AIMNetCalculator("model.pt")          # or an AIMNet, or a list: an ensemble
    atoms.get_potential_energy()                       # eV
    atoms.get_forces()                                 # eV/Å
    atoms.get_charges()                                # e (models with an elmoments head)

ASE works in eV and Å; the model in Hartree and Å: energies and forces are multiplied by
``units.HARTREE_TO_EV``. Positions are read in Å as ASE stores them. Periodic systems are
refused (AIMNet is a molecular model).
"""
from __future__ import annotations

import os
from typing import Sequence

try:
    from ase.calculators.calculator import (Calculator, PropertyNotImplementedError,
                                            all_changes)
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError("aimnet_fast.ase_calculator needs ASE: pip install 'aimnet_fast[ase]'") from e

import numpy as np

from .batch import Batch, InputError
from .units import HARTREE_TO_EV
from .model import AIMNet
from .cpu import flush_denormals
from .predict import check_ensemble, checked_neighbors, common_elements, load_models, predict_arrays


class AIMNetCalculator(Calculator):
    """ASE calculator: energy (eV), forces (eV/Å), charges (e).

    ``model_or_path``: an ``AIMNet``, a checkpoint path, or a sequence of them (an ensemble: the
    mean is reported; ``results["energy_std"]`` (eV) holds the spread). ``device`` and
    ``backend`` are used for models loaded from paths; a given ``AIMNet`` is used where it is.
    """

    implemented_properties = ["energy", "free_energy", "forces", "charges"]

    def __init__(self, model_or_path, device: str = "cpu", backend: str = "auto", **kwargs):
        super().__init__(**kwargs)
        items = (model_or_path if isinstance(model_or_path, (list, tuple))
                 else [model_or_path])
        self.models: list[AIMNet] = []
        for item in items:
            if isinstance(item, AIMNet):
                self.models.append(item)
            elif isinstance(item, (str, os.PathLike)):
                self.models.extend(load_models([item], device, backend))
            else:
                raise TypeError(f"expected an AIMNet or a checkpoint path, got "
                                f"{type(item).__name__}")
        check_ensemble(self.models)
        self.elements = common_elements(self.models)
        self.has_charges = all("elmoments" in m.heads for m in self.models)
        if any(next(m.parameters()).device.type == "cpu" for m in self.models):
            flush_denormals()  # as every CPU entry point: denormal AEV tails cost ~100× each

    def calculate(self, atoms=None, properties: Sequence[str] = ("energy",),
                  system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if "charges" in properties and not self.has_charges:
            raise PropertyNotImplementedError("this model has no elmoments head, so no charges")
        if self.atoms.pbc.any():
            raise InputError(f"ASE Atoms {self.atoms.get_chemical_formula()}: periodic boundary "
                             f"conditions are not supported; AIMNet is a molecular model")
        dtype = next(self.models[0].parameters()).dtype
        batch = Batch.from_molecules(
            [(self.atoms.numbers, np.asarray(self.atoms.positions, dtype=np.float64))],
            names=[f"ASE Atoms {self.atoms.get_chemical_formula()}"], dtype=dtype)
        want_forces = "forces" in properties
        # the same path as the predict command: checks sharing the model's one neighbor search
        nb = checked_neighbors(self.models, batch, self.elements)
        r = predict_arrays(self.models, batch, forces=want_forces, neighbors=nb)
        energy_eV = float(r["energy_Ha"][0]) * HARTREE_TO_EV
        self.results["energy"] = energy_eV
        self.results["free_energy"] = energy_eV
        if "energy_std_Ha" in r:
            self.results["energy_std"] = float(r["energy_std_Ha"][0]) * HARTREE_TO_EV
        if want_forces:
            self.results["forces"] = r["forces_Ha_per_A"] * HARTREE_TO_EV
        if "charges_e" in r:
            self.results["charges"] = r["charges_e"].copy()


__all__ = ["AIMNetCalculator"]
