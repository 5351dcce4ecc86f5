"""Checks of training data at read time, and the energy unit check after the SAE fit.

Read time (``readers.iter_blocks`` calls these on every chunk; a failed check is a ``DataError``
naming file, group and conformer, or, with the source's ``skip_bad_conformers: true``, a skipped
conformer counted in the summary):

- **Close atoms**: two atoms of one conformer closer than ``MIN_DISTANCE_A`` (0.1 Å, the bound
  prediction refuses too, ``aimnet_fast.batch``). Counted as ``skipped_close_atoms``.
- **Label ranges** (after unit conversion; counted per label as ``skipped`` and per source as
  ``skipped_bad_label``). Infinite values are always bad (NaN means "missing" and is masked):

  ========  ==================================================================================
  energy    ``1.3 · Σ E_atom(Z) − 1 Ha · n_atoms  ≤  E  ≤  +10 Ha · n_atoms``. ``E_atom(Z) =
            −(0.7687 Z^7/3 − 0.5 Z² + 0.2699 Z^5/3)`` Ha is the Thomas–Fermi energy of the atom
            with the Scott and Schwinger corrections: within 1 % of the all-electron
            (Hartree–Fock limit) energy for C…Ar (C −37.63, Cl −457.1; H −0.539, 8 %) and
            within ~8 % of relativistic energies up to Rn. No method gives a molecule a total energy below
            its all-electron atoms' by 30 % (binding is < 0.5 Ha per atom), so a value below the
            bound is in a unit that is too small (eV, kcal/mol, kJ/mol, Rydberg read as
            hartree): the message names the most likely unit. Valence-only methods (xTB, ECPs)
            and atomization / relative energies lie well above the bound. The upper bound: no
            total, atomization or relative energy is +10 Ha per atom (6,300 kcal/mol).
  forces    ``|component| ≤ 100 Ha/Å``: the largest in the shared data sets is 8.6 Ha/Å (ethane
            normal-mode sampling with C–C bond breaking); ANI-1x's is ~1.5 Ha/Å. Forces in
            kcal/mol/Å read as Ha/Å exceed it as soon as one real force is above 0.16 Ha/Å.
  charges   ``|q| ≤ 10 e`` per atom (partial charges of real molecules are within ±3 e).
  volumes   ``|v| ≤ 10⁴ bohr³`` per atom (MBIS volumes of H…Cl are 1–200 bohr³). Not ``v ≥ 0``:
            ``bench/synthetic.py`` adds N(0, 0.5) bohr³ noise to H volumes of ~1.2 bohr³.
  others    finite (no ±inf, and within float32, as they are stored); no range.
  ========  ==================================================================================

After the SAE fit, ``check_sae_plausible`` fits the self-atomic energies of every source on its own
and checks the SAE of H, the one element whose SAE is ≈ −0.5 Ha whatever the method (one electron:
all-electron, valence-only and ECP methods agree); see its docstring.
"""
from __future__ import annotations

import difflib
import math
import warnings

import numpy as np

from ..batch import MIN_DISTANCE_A
from ..constants import ELEMENTS, PERIODIC_TABLE
from ..errors import DataError
from .. import units

#: Bounds of the label ranges, in the stored units (see the module docstring).
ENERGY_MAX_PER_ATOM_HA = 10.0
ENERGY_LOW_FACTOR = 1.3
ENERGY_LOW_MARGIN_PER_ATOM_HA = 1.0
FORCE_MAX_HA_PER_A = 100.0
CHARGE_MAX_E = 10.0
VOLUME_MAX_BOHR3 = 1.0e4

#: Energy units a value might really be in, with the factor that takes it to Hartree. kJ/mol and
#: Rydberg are not units the readers take (convert first), but they are named when data look so.
ENERGY_UNIT_GUESSES = {
    "hartree": 1.0,
    "ev": units.FACTORS["ev"][1],
    "kcal/mol": units.FACTORS["kcal/mol"][1],
    "kj/mol": units.FACTORS["kcal/mol"][1] / 4.184,
    "rydberg": 0.5,
    "mev": units.FACTORS["ev"][1] / 1000.0,
}


def atom_energy_estimate(z) -> np.ndarray:
    """Estimated all-electron energy (Hartree, negative) of neutral atoms of atomic number ``z``:
    Thomas–Fermi with the Scott and Schwinger corrections (see the module docstring)."""
    z = np.asarray(z, np.float64)
    return -(0.7687 * z ** (7.0 / 3.0) - 0.5 * z ** 2 + 0.2699 * z ** (5.0 / 3.0))


_F32_MAX = float(np.finfo(np.float32).max)
_ZMAX = 256
_E_ATOM = atom_energy_estimate(np.arange(_ZMAX))
_E_LOW = ENERGY_LOW_FACTOR * _E_ATOM - ENERGY_LOW_MARGIN_PER_ATOM_HA


def _formula(zs) -> str:
    """Hill formula (C, H, then alphabetical): "CH4", "C2H6O"."""
    zs, cnt = np.unique(np.asarray(zs), return_counts=True)
    sym = {str(PERIODIC_TABLE[z]) if z < len(PERIODIC_TABLE) else str(z): int(c) for z, c in zip(zs, cnt)}
    order = ([s for s in ("C", "H") if s in sym] if "C" in sym else []) + sorted(
        s for s in sym if not ("C" in sym and s in ("C", "H")))
    return "".join(f"{s}{sym[s] if sym[s] > 1 else ''}" for s in order)


# -- keys ------------------------------------------------------------------------------------------

def check_keys(given, known, what: str, path: str = "-") -> None:
    """DataError for keys of ``given`` that are not in ``known``, naming them, the known ones and
    the closest known one (a typo such as ``units`` for ``unit``)."""
    unknown = [k for k in given if k not in known]
    if not unknown:
        return
    k = unknown[0]
    close = difflib.get_close_matches(str(k), [str(x) for x in known], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    more = f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else ""
    raise DataError(f"unknown key {k!r}{more} in {what}{hint}; known: {', '.join(sorted(known))}",
                    path)


# -- close atoms -----------------------------------------------------------------------------------

def close_atoms(coord: np.ndarray, check: np.ndarray, min_dist: float = MIN_DISTANCE_A):
    """Conformers with two atoms closer than ``min_dist`` Å.

    coord (n, na, 3) Å (finite where ``check``); check (n,) bool: the conformers to look at.
    Returns (bad (n,) bool, first) where first is None or (conformer, atom i, atom j, distance Å)
    of the first bad conformer (its closest pair). Vectorized in slices of about 4M pair entries:
    a float32 Gram-matrix filter, then the exact float64 distances of the candidates.
    """
    n, na = coord.shape[:2]
    bad = np.zeros(n, bool)
    if na < 2 or not check.any():
        return bad, None
    lim2 = min_dist * min_dist
    ar = np.arange(na)
    step = max(1, (1 << 22) // (na * na))
    idx = np.flatnonzero(check)
    for s in range(0, idx.size, step):
        sub = idx[s:s + step]
        x = coord[sub]
        x = x - x.mean(axis=1, keepdims=True)
        y = x.astype(np.float32)
        g = np.matmul(y, y.transpose(0, 2, 1))
        sq = np.einsum("nii->ni", g).copy()
        g *= -2.0
        g += sq[:, :, None]
        g += sq[:, None, :]
        g[:, ar, ar] = np.inf
        margin = 1e-3 + 1e-6 * float(sq.max(initial=0.0))
        cand = sub[g.reshape(sub.size, -1).min(axis=1) < lim2 + margin]
        for c in cand:  # exact, float64 (few)
            d = np.sqrt(((coord[c][:, None, :] - coord[c][None, :, :]) ** 2).sum(-1))
            d[ar, ar] = np.inf
            bad[c] = d.min() < min_dist
    if not bad.any():
        return bad, None
    c = int(np.flatnonzero(bad)[0])
    d = np.sqrt(((coord[c][:, None, :] - coord[c][None, :, :]) ** 2).sum(-1))
    d[ar, ar] = np.inf
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    i, j = sorted((int(i), int(j)))
    return bad, (c, i, j, float(d[i, j]))


def close_atoms_message(i: int, j: int, dist: float, numbers) -> str:
    zi, zj = int(numbers[i]), int(numbers[j])
    return (f"atoms {i} ({PERIODIC_TABLE[zi]}) and {j} ({PERIODIC_TABLE[zj]}) are {dist:.4f} Å apart "
            f"(closer than {MIN_DISTANCE_A} Å: overlapping atoms); set 'skip_bad_conformers': true "
            f"to skip such conformers")


# -- label ranges ----------------------------------------------------------------------------------

def energy_bounds(numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) physical bounds (Hartree) of the energy of each conformer; numbers (n, na)."""
    z = np.clip(np.asarray(numbers, np.int64), 0, _ZMAX - 1)
    return _E_LOW[z].sum(axis=1), np.full(z.shape[0], ENERGY_MAX_PER_ATOM_HA * z.shape[1])


def bad_label_rows(name: str, val: np.ndarray, numbers: np.ndarray, per: str) -> np.ndarray:
    """(n,) bool: conformers whose label ``name`` (values ``val`` in the stored units, float64,
    NaN = missing) is infinite or outside its physical range (see the module docstring)."""
    n = val.shape[0]
    rows = val.reshape(n, -1)
    bad = np.isinf(rows).any(axis=1)
    with np.errstate(invalid="ignore"):
        bad |= (np.abs(rows) > _F32_MAX).any(axis=1)   # would be infinite once stored as float32
    with np.errstate(invalid="ignore"):
        if name == "energy" and per == "conformer" and rows.shape[1] == 1:
            lo, hi = energy_bounds(numbers)
            e = rows[:, 0]
            bad |= (e < lo) | (e > hi)
        elif name == "forces":
            bad |= (np.abs(rows) > FORCE_MAX_HA_PER_A).any(axis=1)
        elif name == "charges":
            bad |= (np.abs(rows) > CHARGE_MAX_E).any(axis=1)
        elif name == "volumes":
            bad |= (np.abs(rows) > VOLUME_MAX_BOHR3).any(axis=1)
    return bad


#: Units named at read time. Rydberg (a factor 2) is left out there: a valence-only method's energy in
#: eV, read as Rydberg, looks like an all-electron one; the SAE check after the fit tells them apart.
_READ_TIME_GUESSES = ("hartree", "ev", "kcal/mol", "kj/mol")


def _energy_unit_hint(e_ha: float, declared: str, numbers) -> str:
    """Which energy unit would put ``e_ha`` (read as ``declared``) within the bounds, the one
    nearest the all-electron energy of the atoms first."""
    f_decl = units.FACTORS[declared][1]
    raw = e_ha / f_decl
    lo, hi = energy_bounds(np.asarray(numbers)[None])
    s = float(_E_ATOM[np.asarray(numbers, np.int64)].sum())
    fits = []
    for u, f in ENERGY_UNIT_GUESSES.items():
        if f == f_decl or u not in _READ_TIME_GUESSES:
            continue
        v = raw * f
        if lo[0] <= v <= hi[0]:
            dist = abs(math.log(v / s)) if v < 0 else math.inf
            fits.append((dist, u, v))
    if not fits or not math.isfinite(raw):
        return ("no usual energy unit brings it into range: a corrupt value, or not an energy; "
                "fix the data, or set 'skip_bad_conformers': true to skip such conformers")
    fits.sort()
    best = fits[0]
    others = ("; also in range: " + ", ".join(f"as {u} {v:.6g} Ha" for _, u, v in fits[1:])
              if len(fits) > 1 else "")
    return (f"the energies look like {best[1]} declared as {declared!r}: as {best[1]} it is "
            f"{best[2]:.6g} Ha, nearest the {s:.6g} Ha of its all-electron atoms{others}; fix "
            f"'unit', or set 'skip_bad_conformers': true to skip such conformers")


def bad_label_message(name: str, p: dict, val: np.ndarray, numbers: np.ndarray) -> str:
    """Why the label ``name`` of one conformer (values ``val`` in the stored unit, numbers (na,))
    failed ``bad_label_rows``: the property, its key, the value, its unit and the likely cause."""
    src = f"property {name!r} (key {p['key']!r}, unit {p['unit']!r})"
    skip = "set 'skip_bad_conformers': true to skip such conformers"
    flat = np.asarray(val, np.float64).reshape(-1)
    if np.isinf(flat).any():
        k = int(np.flatnonzero(np.isinf(flat))[0])
        where = _where(p, val, k)
        return f"{src}: value {flat[k]}{where} is infinite (a corrupt value? {skip})"
    if name == "energy":
        e = float(flat[0])
        lo, hi = energy_bounds(np.asarray(numbers)[None])
        formula, na = _formula(numbers), len(numbers)
        if e < lo[0]:
            return (f"{src}: energy {e:.8g} Ha of {formula} ({na} atoms) is below the physical "
                    f"bound {lo[0]:.6g} Ha ({ENERGY_LOW_FACTOR} × the energy of its all-electron "
                    f"atoms − {ENERGY_LOW_MARGIN_PER_ATOM_HA:g} Ha per atom); "
                    + _energy_unit_hint(e, p["unit"], numbers))
        return (f"{src}: energy {e:.8g} Ha of {formula} ({na} atoms) is above the physical bound "
                f"{hi[0]:.6g} Ha (+{ENERGY_MAX_PER_ATOM_HA:g} Ha per atom): a corrupt value or a "
                f"wrong unit? {skip}")
    bounds = {"forces": (f"|component| ≤ {FORCE_MAX_HA_PER_A:g} Ha/Å", np.abs(flat) > FORCE_MAX_HA_PER_A,
                         "forces in kcal/mol/Å or eV/Å declared as Ha/Å, or in a gradient of "
                         "another length unit"),
              "charges": (f"|q| ≤ {CHARGE_MAX_E:g} e", np.abs(flat) > CHARGE_MAX_E,
                          "not partial charges (e.g. spin densities or a scaled quantity)"),
              "volumes": (f"|v| ≤ {VOLUME_MAX_BOHR3:g} bohr³", np.abs(flat) > VOLUME_MAX_BOHR3,
                          "volumes in another unit")}
    if name not in bounds:
        k = int(np.flatnonzero(np.abs(flat) > _F32_MAX)[0])
        return (f"{src}: value {flat[k]:.6g}{_where(p, val, k)} does not fit a float32 (a corrupt "
                f"value? {skip})")
    rng, mask, cause = bounds[name]
    k = int(np.flatnonzero(mask)[0])
    internal = units.INTERNAL[{"forces": "force", "charges": "charge", "volumes": "volume"}[name]]
    return (f"{src}: value {flat[k]:.6g} {internal}{_where(p, val, k)} is outside the physical "
            f"range {rng} (likely cause: a wrong unit, {cause}, or a corrupt value); fix the data "
            f"or 'unit', or {skip}")


def _where(p, val, k) -> str:
    """" (atom i)" for flat index ``k`` into one conformer's per-atom values ``val`` (na, ...)."""
    shape = np.asarray(val).shape
    if p.get("per") == "atom" and len(shape) >= 1:
        return f" (atom {int(np.unravel_index(k, shape)[0])})"
    return ""


# -- energy unit from the SAE ----------------------------------------------------------------------

#: SAE of H (Hartree) that fits of total energies give: −0.5 (the atom) to ~−0.75 (fits on a few
#: molecules absorb some binding); −0.55 is the centre used to guess a unit.
SAE_H_TOTAL_HA = -0.55
#: |SAE of H| above this (Hartree, after the declared unit) is no energy in Hartree: total energies
#: give 0.4–0.8, atomization energies ~0.1–0.2, relative energies ~0.
SAE_H_MAX_HA = 1.0
#: SAE ratios of all-electron total energies (released AIMNet SAE): C/H 63, N/H 91, O/H 125. Within
#: a factor 1.6 of these for every one of C, N, O that is determined, the energies are total
#: all-electron energies (the ratio does not depend on the unit), and then H must be ≈ −0.5 Ha.
_AE_RATIO = {6: 63.2, 7: 90.8, 8: 124.8}


def _determined(rows: np.ndarray) -> np.ndarray:
    """(k,) bool: which SAE the composition rows (m, k) determine (unit vector in their row space)."""
    if rows.size == 0:
        return np.zeros(rows.shape[1], bool)
    proj = np.linalg.pinv(rows) @ rows
    return np.abs(proj - np.eye(rows.shape[1])).max(axis=0) < 1e-6


def _unit_guess(h_ha: float, declared: str | None) -> str | None:
    """The unit whose factor takes the raw SAE of H nearest −0.55 Ha (within a factor 1.6)."""
    f_decl = units.FACTORS.get(declared or "hartree", ("", 1.0))[1]
    f_true = SAE_H_TOTAL_HA * f_decl / h_ha
    best = min(ENERGY_UNIT_GUESSES.items(), key=lambda kv: abs(math.log(f_true / kv[1])))
    if abs(math.log(f_true / best[1])) < math.log(1.6) and best[1] != f_decl:
        return best[0]
    return None


def sae_plausibility(sae, elements, determined, label: str = "-", declared: str | None = None):
    """The verdict on one fitted SAE vector (Hartree, as declared): None when plausible or not
    checkable, else the message of the DataError (see ``check_sae_plausible``)."""
    elements = [int(z) for z in elements]
    if 1 not in elements or not determined[elements.index(1)]:
        return None
    h = float(sae[elements.index(1)])
    decl = f" declared as {declared!r}" if declared else ""
    f_decl = units.FACTORS.get(declared or "hartree", ("", 1.0))[1]
    if abs(h) > SAE_H_MAX_HA:
        guess = _unit_guess(h, declared)
        why = (f"the energies look like {guess}{decl} (as {guess}, the SAE of H is "
               f"{h / f_decl * ENERGY_UNIT_GUESSES[guess]:.4g} Ha)"
               if guess else
               f"the energies are not in Hartree{decl}: {abs(h / SAE_H_TOTAL_HA):.4g} × too large "
               f"for total energies (no usual unit matches; atomization or relative energies in "
               f"kcal/mol or kJ/mol give such values)")
        return (f"fitted self-atomic energy of H is {h:.6g} Ha, expected about −0.5 Ha for total "
                f"energies (|SAE of H| ≤ {SAE_H_MAX_HA:g} Ha for any energy in Hartree): {why}; fix "
                f"the energy 'unit' of {label}")
    ratios = {}
    for z in _AE_RATIO:
        if z in elements and determined[elements.index(z)] and h != 0.0:
            ratios[z] = float(sae[elements.index(z)]) / h
    if ratios and abs(h) < 0.3 and all(ref / 1.6 < ratios[z] < ref * 1.6 for z, ref in _AE_RATIO.items()
                                       if z in ratios):
        guess = _unit_guess(h, declared)
        rs = ", ".join(f"{PERIODIC_TABLE[z]}/H = {r:.3g}" for z, r in ratios.items())
        why = (f"the energies look like {guess}{decl} (as {guess}, the SAE of H is "
               f"{h / f_decl * ENERGY_UNIT_GUESSES[guess]:.4g} Ha)" if guess else
               f"the declared unit {declared or 'hartree'!r} is too large by ≈ "
               f"{SAE_H_TOTAL_HA / h:.4g}×")
        return (f"fitted self-atomic energy of H is {h:.6g} Ha while the SAE ratios ({rs}) are "
                f"those of all-electron total energies, for which H is about −0.5 Ha: {why}; fix "
                f"the energy 'unit' of {label}")
    return None


def check_sae_plausible(ds, indices=None, elements=ELEMENTS, sae=None) -> list[str]:
    """Check that every source's energies are in Hartree as declared, from the self-atomic energy
    of H fitted on that source alone (its conformers among ``indices``, default all).

    The SAE of H is the unit's fingerprint: about −0.5 Ha for total energies of any method
    (all-electron, valence-only like xTB, or ECP), ~−0.1 to −0.2 Ha for atomization energies,
    ~0 for relative ones. A DataError naming the file is raised when

    - |SAE of H| > 1 Ha: no energy in Hartree gives that. The message names the unit that takes
      the fit to ≈ −0.55 Ha (within a factor 1.6): eV (SAE of H ≈ −13.6 … −15), kcal/mol (≈ −314
      … −380), kJ/mol (≈ −1300 … −1600), Rydberg, meV; or says none does.
    - |SAE of H| < 0.3 Ha while the SAE of C, N, O (those determined) relative to H are those of
      all-electron total energies (C/H ≈ 63, N/H ≈ 91, O/H ≈ 125, within a factor 1.6): total
      energies with H far too small, i.e. a declared unit too large (Hartree declared as eV).

    Not checked (nothing is raised): sources without H, without energies, or whose compositions do
    not determine the SAE of H (e.g. only CH4, NH3 and H2O: any H value fits), where the read-time
    bounds are the only check. ``sae`` (the trainer's fit) is used instead of a new fit when all
    checked conformers come from one source. Returns one line per source saying what was found.
    """
    from .sae import fit_sae_rows

    elements = [int(z) for z in elements]
    idx = np.arange(ds.n_conf) if indices is None else np.asarray(indices, np.int64)
    if "energy" not in ds.labels or idx.size == 0:
        return ["energy unit check: no energies"]
    src_of = np.asarray(ds.source)[idx]
    specs = getattr(ds, "source_specs", None) or [None] * len(ds.sources)
    out = []
    srcs = np.unique(src_of)
    for s in srcs:
        path = ds.sources[int(s)]
        sub = idx[src_of == s]
        e = np.asarray(ds.labels["energy"][sub], np.float64)
        sub = sub[np.isfinite(e)]
        spec = specs[int(s)]
        declared = None
        if spec is not None and "energy" in spec.get("properties", {}):
            declared = spec["properties"]["energy"]["unit"]
        if sub.size == 0:
            out.append(f"{path}: energy unit not checked (no energies)")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit, rows = fit_sae_rows(ds, elements, sub)
        if sae is not None and len(srcs) == 1:
            fit = np.asarray(sae, np.float64)
        det = np.zeros(len(elements), bool)
        present = rows.any(axis=0)
        det[present] = _determined(rows[:, present])
        msg = sae_plausibility(fit, elements, det, path, declared)
        if msg is not None:
            raise DataError(msg, path)
        if 1 in elements and det[elements.index(1)]:
            out.append(f"{path}: fitted SAE of H {fit[elements.index(1)]:.4f} Ha: the declared "
                       f"energy unit {declared or 'hartree'!r} fits")
        else:
            out.append(f"{path}: energy unit not checked (the compositions do not determine the "
                       f"SAE of H)")
    return out
