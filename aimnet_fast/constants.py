"""Constants of the released AIMNet (2019): elements, AEV parameters, output scales, SAE.

Units: lengths in Å, energies in Hartree, charges in e, volumes in bohr³.
"""
from __future__ import annotations

import math

#: Atomic numbers in the order of the released feature table (rows 0..6).
ELEMENTS: tuple[int, ...] = (1, 6, 7, 8, 16, 9, 17)
SYMBOLS: tuple[str, ...] = ("H", "C", "N", "O", "S", "F", "Cl")

#: Every element symbol up to Z = 118, for reading XYZ files and for error messages.
PERIODIC_TABLE: tuple[str, ...] = (
    "X", "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S",
    "Cl", "Ar", "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge",
    "As", "Se", "Br", "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd",
    "In", "Sn", "Sb", "Te", "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd",
    "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg",
    "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th", "Pa", "U", "Np", "Pu", "Am", "Cm",
    "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf", "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn",
    "Nh", "Fl", "Mc", "Lv", "Ts", "Og",
)

# Radial AEV: 16 Gaussian shells times a cosine cutoff at 4.6 Å.
RADIAL_CUTOFF_A = 4.6
RADIAL_ETA_PER_A2 = 16.0
RADIAL_SHIFTS_A = tuple(0.5 + 0.25625 * s for s in range(16))

# Angular AEV: 8 angle sectors × 4 radial shells, cosine cutoff at 3.1 Å.
ANGULAR_CUTOFF_A = 3.1
ANGULAR_ETA_PER_A2 = 6.0
ANGULAR_ZETA = 8.0
ANGULAR_SHIFTS_A = (0.5, 1.15, 1.8, 2.45)
ANGULAR_SECTORS_RAD = tuple(z * math.pi / 4 for z in range(8))
#: cos θ is clamped to ±COS_CLAMP before arccos, as in the released model (finite derivative).
COS_CLAMP = 0.99999

N_RADIAL = len(RADIAL_SHIFTS_A)                              # 16
N_ANGULAR = len(ANGULAR_SECTORS_RAD) * len(ANGULAR_SHIFTS_A)  # 32, channel c = z * 4 + a

N_FEATURE = 16  # length of an atomic feature vector (AFV)
N_PASS = 3

#: Output scales of the heads of the released model.
ENERGY_SCALE_HA = 0.0942
ELMOMENTS_SCALE = (0.376, 0.126, 0.465, 1.33)  # charge (e), |dipole|, |quadrupole|, |octupole| (a.u.)
VOLUME_SCALE_BOHR3 = 47.44

#: Self-atomic energies of the released model, Hartree, in ELEMENTS order (kept in float64).
SAE_HA = (-0.60301761, -38.09413832, -54.73224523, -75.23165724,
          -398.19005793, -99.85709063, -460.2047288)
