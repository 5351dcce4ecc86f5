"""Every unit of aimnet_fast: conversion factors, unit names, and element symbols, in one place.

Inside the project everything is in the released model's units: lengths Å, energies Hartree,
forces Hartree/Å, charges e, volumes bohr³. Conversions happen at the edges (readers, output
writers, the ASE calculator) through this module and nowhere else.
"""
from __future__ import annotations

from .constants import PERIODIC_TABLE

# CODATA 2018.
HARTREE_TO_KCALMOL = 627.509474
HARTREE_TO_EV = 27.211386245988
BOHR_TO_A = 0.529177210903
#: 1 kcal/mol in Hartree.
KCALMOL_HA = 1.0 / HARTREE_TO_KCALMOL

#: The internal unit of each dimension.
INTERNAL = {"length": "angstrom", "energy": "hartree", "force": "hartree/angstrom", "charge": "e",
            "volume": "bohr3"}

#: Unit name (lower case) -> (dimension, factor that takes a value in it to the internal unit).
FACTORS: dict[str, tuple[str, float]] = {
    "hartree": ("energy", 1.0), "ha": ("energy", 1.0),
    "ev": ("energy", 1.0 / HARTREE_TO_EV),
    "kcal/mol": ("energy", 1.0 / HARTREE_TO_KCALMOL),
    "hartree/angstrom": ("force", 1.0), "ha/a": ("force", 1.0),
    "hartree/bohr": ("force", 1.0 / BOHR_TO_A), "ha/bohr": ("force", 1.0 / BOHR_TO_A),
    "ev/angstrom": ("force", 1.0 / HARTREE_TO_EV), "ev/a": ("force", 1.0 / HARTREE_TO_EV),
    "kcal/mol/angstrom": ("force", 1.0 / HARTREE_TO_KCALMOL),
    "e": ("charge", 1.0),
    "bohr3": ("volume", 1.0), "angstrom3": ("volume", 1.0 / BOHR_TO_A ** 3),
    "angstrom": ("length", 1.0), "a": ("length", 1.0), "bohr": ("length", BOHR_TO_A),
    "1": ("any", 1.0), "none": ("any", 1.0),
}

#: What a checkpoint's model takes and gives (stored in every checkpoint).
MODEL_UNITS = {"coord": "angstrom", "energy": "hartree", "forces": "hartree/angstrom",
               "charges": "e", "volumes": "bohr^3", "elmoments": "atomic units"}

#: Unit of every per-molecule key of the prediction output (JSON and friends).
OUTPUT_UNITS = {
    "coord": "angstrom",
    "energy_Ha": "hartree",
    "energy_std_Ha": "hartree",
    "forces_Ha_per_A": "hartree/angstrom",
    "forces_std_Ha_per_A": "hartree/angstrom",
    "charges_e": "e (elementary charge)",
    "elmoments": "atomic units: [charge (e), |dipole| (e*bohr), |quadrupole| (e*bohr^2), "
                 "|octupole| (e*bohr^3)]",
    "volumes_bohr3": "bohr^3",
}

#: Training target -> (unit its errors are reported in, factor from the internal unit).
#: Energy errors are per molecule; volumes in Å³ (the model's bohr³ × BOHR_TO_A³).
REPORT_UNITS = {"energy": ("kcal/mol", HARTREE_TO_KCALMOL), "charges": ("e", 1.0),
                "volumes": ("A3", BOHR_TO_A ** 3), "forces": ("kcal/mol/A", HARTREE_TO_KCALMOL)}


def factor(unit: str, dimension: str | None = None) -> float:
    """The factor that takes a value in ``unit`` to the internal unit; KeyError naming the known
    units if ``unit`` is unknown, ValueError if it is not of ``dimension``."""
    key = str(unit).strip().lower()
    if key not in FACTORS:
        raise KeyError(f"unknown unit {unit!r} (known: {', '.join(sorted(FACTORS))})")
    dim, f = FACTORS[key]
    if dimension is not None and dim not in (dimension, "any"):
        raise ValueError(f"unit {unit!r} is a {dim} unit, not a {dimension} unit")
    return f


_SYMBOL_TO_Z = {s.lower(): z for z, s in enumerate(PERIODIC_TABLE) if z > 0}


def element_number(symbol: str | bytes) -> int | None:
    """Atomic number of an element symbol (any case, surrounding blanks ignored) or of a decimal
    atomic number; None if it names no element. "X" (a dummy atom, Z = 0) names no element."""
    s = (symbol.decode() if isinstance(symbol, bytes) else str(symbol)).strip()
    if s.isdigit():
        z = int(s)
        return z if 0 < z < len(PERIODIC_TABLE) else None
    return _SYMBOL_TO_Z.get(s.lower())


def element_symbol(z: int) -> str:
    """The symbol of atomic number ``z``, or ``Z=<z>`` where there is none."""
    return PERIODIC_TABLE[z] if 0 < z < len(PERIODIC_TABLE) else f"Z={z}"
