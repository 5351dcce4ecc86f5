"""Generate the project's embedded default data set: small organic molecules labelled with GFN2-xTB.

Run (needs the optional extra ``pip install aimnet_fast[make-data]``, i.e. rdkit and tblite)::

    OMP_NUM_THREADS=1 python -m aimnet_fast.data.make_default --out aimnet_fast/data/default.h5

Recipe (DEFAULT_DATASET.md has the numbers of the committed file):

1. ``SMILES``: a hand-written list of neutral closed-shell molecules of H, C, N, O, F, S, Cl with
   at most 9 heavy atoms.
2. Per molecule: up to ``n_etkdg`` RDKit ETKDGv3 conformers (with H, pruned at 0.25 Å RMSD), MMFF94
   minimisations of the first ``n_mmff`` of them, and random normal Cartesian displacements of these
   base geometries until the molecule has ``per_molecule`` conformers. ``sigma`` (drawn per
   conformer uniformly in [sigma_min, sigma_max] Å) is the RMS length of an atom's 3D
   displacement, i.e. each Cartesian component gets a normal deviate of std sigma/sqrt(3).
3. Coordinates are rounded to float32 *before* labelling, so the stored labels belong exactly to the
   stored geometry. GFN2-xTB single points through tblite (electronic temperature 300 K, accuracy
   1, at most 250 SCF cycles: tblite's defaults, set explicitly) give energy (Ha), gradient
   (Ha/bohr) and charges (e).
4. Dropped and counted: conformers with two atoms closer than ``MIN_DISTANCE_A`` and conformers
   whose SCF did not converge.

Layout (ANI-1x release layout): one group per formula (Hill order, e.g. ``C2H6O``). Atoms are sorted
by atomic number (stable), so isomers share a formula's atom order and merge into one group (the
``<formula>_1``, ``_2`` names for a differing atom order are kept in the code but then never needed).
Each group holds

- ``atomic_numbers`` (Na,)       uint8
- ``coordinates``    (Nc, Na, 3) float32, Å
- ``gfn2.energy``    (Nc,)       float64, Hartree (total GFN2-xTB energy, no reference subtracted)
- ``gfn2.forces``    (Nc, Na, 3) float32, Hartree/Å, true forces −dE/dR
- ``gfn2.charges``   (Nc, Na)    float32, e (Mulliken charges of GFN2-xTB)

and the group attributes ``smiles`` (the molecules in the group), ``smiles_index`` (Nc,) (which of
them each conformer is), ``sampling`` (Nc,) (0 ETKDG, 1 MMFF-optimised, 2 displaced) and ``sigma_A``
(Nc,) (displacement sigma in Å, 0 for undisplaced). File attributes describe the level of theory,
units, generator version, seed and drop counts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from importlib import metadata

import numpy as np

from aimnet_fast.constants import PERIODIC_TABLE
from aimnet_fast.units import BOHR_TO_A

GENERATOR_VERSION = "2.0"
DEFAULT_SEED = 20261125
#: Conformers with two atoms closer than this (Å) are dropped.
MIN_DISTANCE_A = 0.7
ALLOWED_Z = frozenset((1, 6, 7, 8, 9, 16, 17))
ELECTRONIC_TEMPERATURE_K = 300.0
KB_HA_PER_K = 3.166808578545117e-6  # tblite takes the electronic temperature in Hartree
TBLITE_ACCURACY = 1.0
TBLITE_MAX_ITER = 250

# Grouped by chemistry only for reading; order matters for seeding (molecule index).
SMILES: tuple[str, ...] = (
    # alkanes, alkenes, alkynes
    "C", "CC", "CCC", "CCCC", "CC(C)C", "CCCCC", "CC(C)(C)C", "C1CC1", "C1CCCCC1", "C=C", "C#C",
    "CC=C", "C=CC=C",
    # alcohols, ethers
    "CO", "CCO", "CCCO", "CC(C)O", "OCCO", "OC1CCCCC1", "COC", "CCOC", "C1CCOC1", "C1COCCO1",
    "COCCOC",
    # amines, amino alcohols, amides
    "N", "CN", "CCN", "CNC", "CN(C)C", "NCCN", "C1CCNCC1", "NCCO", "NC=O", "CC(N)=O", "CNC(C)=O",
    "CN(C)C=O", "NC(N)=O", "O=C1CCCN1",
    # nitriles
    "C#N", "CC#N", "CCC#N", "N#CC#N", "N#Cc1ccccc1",
    # carbonyls, acids, esters
    "C=O", "CC=O", "CC(C)=O", "O=CO", "CC(=O)O", "COC(C)=O", "O=C1CCCC1", "NCC(=O)O",
    "CC(N)C(=O)O",
    # aromatics, heterocycles
    "c1ccccc1", "Cc1ccccc1", "Oc1ccccc1", "Nc1ccccc1", "c1ccncc1", "O=Cc1ccccc1", "c1cc[nH]c1",
    "c1ccoc1", "c1ccsc1", "c1cnc[nH]1", "c1cscn1", "c1cnccn1", "c1ncncn1", "c1cocn1",
    "O=c1cccc[nH]1", "c1ccc2[nH]ccc2c1", "NC(=O)c1ccccc1",
    # thiols, sulfides, other sulfur
    "S", "CS", "CCS", "OCCS", "NCCS", "Sc1ccccc1", "CSC", "CCSC", "CSSC", "C1CCSC1", "CS(C)=O",
    "CS(C)(=O)=O", "O=S=O", "C=S", "NC(N)=S", "CC(N)=S", "S=C=S", "O=C=S", "CC(=O)SC",
    "CS(N)(=O)=O", "CSc1ccccc1", "Cc1ccc(S)cc1", "NC(CS)C(=O)O", "CSCCC(N)C(=O)O",
    # fluoro compounds
    "F", "CF", "FCF", "FC(F)F", "FC(F)(F)F", "CCF", "C=CF", "Fc1ccccc1", "OCC(F)(F)F",
    "O=C(O)C(F)(F)F", "CC(F)(F)F", "Fc1ccc(F)cc1", "O=C(F)F", "NCC(F)(F)F", "Fc1ccncc1",
    "FC(F)(F)S", "CS(=O)(=O)F",
    # chloro compounds
    "Cl", "CCl", "ClCCl", "ClC(Cl)Cl", "ClC(Cl)(Cl)Cl", "CCCl", "C=CCl", "Clc1ccccc1", "CC(=O)Cl",
    "N#CCCl", "O=C(Cl)Cl", "OCCCl", "FC(F)Cl", "FC(F)(Cl)Cl", "Clc1ccc(F)cc1", "SCCCl",
    "Clc1ccncc1", "ClC(Cl)=C(Cl)Cl", "CS(=O)(=O)Cl", "O=C(O)CCl", "Oc1ccc(Cl)cc1", "Clc1cccs1",
)


# Systematic part: R1–R2 for pairs of monovalent groups (``[*]`` marks the attachment atom; ``[H]``
# gives the parent R–H). A pair is kept if at least one of the two attachment atoms is carbon (no
# O–O, N–F, S–Cl, ... links), the product has at most ``PAIR_MAX_HEAVY`` heavy atoms, and it is not
# in ``SMILES`` already. Order: canonical SMILES, sorted (fixes each molecule's index and seed).
GROUPS_C: tuple[str, ...] = (
    "[*]C", "[*]CC", "[*]C(C)C", "[*]C=C", "[*]C#C", "[*]C1CC1", "[*]C#N", "[*]C=O", "[*]C(C)=O",
    "[*]C(=O)O", "[*]C(N)=O", "[*]C(=O)OC", "[*]C(F)(F)F", "[*]CO", "[*]CN", "[*]CCl", "[*]CF",
    "[*]CS", "[*]C(=S)N", "[*]c1ccccc1", "[*]c1ccncc1", "[*]c1cccs1", "[*]c1ccco1",
    "[*]c1ccc[nH]1", "[*]c1ncc[nH]1", "[*]C1CCOC1",
)
GROUPS_X: tuple[str, ...] = (
    "[*][H]", "[*]O", "[*]OC", "[*]N", "[*]NC", "[*]N(C)C", "[*]F", "[*]Cl", "[*]S", "[*]SC",
    "[*]NC=O", "[*]OC(C)=O", "[*]S(C)(=O)=O", "[*]S(C)=O",
)
PAIR_MAX_HEAVY = 9


def pair_smiles(max_heavy: int = PAIR_MAX_HEAVY) -> tuple[str, ...]:
    """The canonical SMILES of the R1–R2 molecules (see ``GROUPS_C``), sorted, without ``SMILES``."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.warning")   # "not removing hydrogen atom with dummy atom neighbors"

    def canon(s):
        return Chem.MolToSmiles(Chem.MolFromSmiles(s))

    have = {canon(s) for s in SMILES}
    out = set()
    groups = GROUPS_C + GROUPS_X
    for i, a in enumerate(GROUPS_C):
        for b in groups[i:]:
            m = Chem.molzip(Chem.MolFromSmiles(a.replace("[*]", "[*:1]")),
                            Chem.MolFromSmiles(b.replace("[*]", "[*:1]")))
            m = Chem.RemoveHs(m)
            Chem.SanitizeMol(m)
            if m.GetNumHeavyAtoms() <= max_heavy:
                out.add(Chem.MolToSmiles(m))
    return tuple(sorted(out - have))


def all_smiles(pairs: bool = True) -> tuple[str, ...]:
    """The molecules of the data set in index order: ``SMILES``, then ``pair_smiles()``."""
    return SMILES + (pair_smiles() if pairs else ())


def hill_formula(numbers) -> str:
    """Hill formula (C, H, then alphabetical; counts of 1 omitted), e.g. ``C2H6O``."""
    counts: dict[str, int] = defaultdict(int)
    for z in numbers:
        counts[PERIODIC_TABLE[int(z)]] += 1
    order = (["C", "H"] if "C" in counts else []) + sorted(
        s for s in counts if not ("C" in counts and s in ("C", "H")))
    return "".join(s + (str(counts[s]) if counts[s] > 1 else "") for s in order)


def min_distance_A(coord: np.ndarray) -> float:
    """Smallest interatomic distance (Å) of one conformer (Na, 3) Å; inf for one atom."""
    d = np.linalg.norm(coord[:, None, :] - coord[None, :, :], axis=-1)
    d[np.diag_indices_from(d)] = np.inf
    return float(d.min())


def gfn2_singlepoint(numbers: np.ndarray, coord_A: np.ndarray):
    """GFN2-xTB single point of a neutral singlet. ``numbers`` (Na,), ``coord_A`` (Na, 3) Å.

    Returns (energy Ha, forces (Na, 3) Ha/Å as −dE/dR, charges (Na,) e), or None when the SCF did
    not converge (tblite raises then).
    """
    from tblite.interface import Calculator

    calc = Calculator("GFN2-xTB", np.asarray(numbers, dtype=np.int32),
                      np.asarray(coord_A, dtype=np.float64) / BOHR_TO_A, charge=0.0, uhf=0)
    calc.set("verbosity", 0)
    # tblite's defaults, set explicitly so that a changed default cannot change the labels.
    calc.set("accuracy", TBLITE_ACCURACY)
    calc.set("max-iter", TBLITE_MAX_ITER)
    calc.set("temperature", ELECTRONIC_TEMPERATURE_K * KB_HA_PER_K)
    try:
        res = calc.singlepoint()
    except RuntimeError:
        return None
    energy = float(res.get("energy"))
    forces = -np.asarray(res.get("gradient"), dtype=np.float64) / BOHR_TO_A  # Ha/bohr -> Ha/Å
    charges = np.asarray(res.get("charges"), dtype=np.float64)
    if not (np.isfinite(energy) and np.isfinite(forces).all() and np.isfinite(charges).all()):
        return None
    return energy, forces, charges


def molecule_geometries(smiles: str, mol_index: int, seed: int, per_molecule: int, n_etkdg: int,
                        n_mmff: int, sigma_min_A: float, sigma_max_A: float):
    """Sampled geometries of one molecule, before filtering.

    Returns (numbers (Na,) int, list of (coord (Na, 3) float64 Å, sampling code, sigma Å)).
    Seeded by (seed, mol_index) only, so one molecule's geometries do not depend on the others.
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    if not set(numbers.tolist()) <= ALLOWED_Z:
        raise ValueError(f"{smiles!r} has elements outside H C N O F S Cl")
    if Chem.GetFormalCharge(mol) != 0 or any(a.GetNumRadicalElectrons() for a in mol.GetAtoms()):
        raise ValueError(f"{smiles!r} is not neutral closed-shell")

    params = AllChem.ETKDGv3()
    params.randomSeed = (seed + 7919 * mol_index) % (2**31 - 1)
    params.pruneRmsThresh = 0.25
    params.numThreads = 1
    cids = list(AllChem.EmbedMultipleConfs(mol, numConfs=n_etkdg, params=params))
    if not cids:
        raise RuntimeError(f"ETKDG found no conformer for {smiles!r}")
    base = [(mol.GetConformer(c).GetPositions().copy(), 0, 0.0) for c in cids]

    if n_mmff > 0 and AllChem.MMFFHasAllMoleculeParams(mol):
        opt = Chem.Mol(mol)
        mmff_ids = cids[:n_mmff]
        for c in mmff_ids:
            AllChem.MMFFOptimizeMolecule(opt, confId=c, maxIters=2000)
        base += [(opt.GetConformer(c).GetPositions().copy(), 1, 0.0) for c in mmff_ids]

    rng = np.random.default_rng([seed, mol_index])
    out = list(base[:per_molecule])
    k = 0
    while len(out) < per_molecule:
        coord0 = base[k % len(base)][0]
        sigma = float(rng.uniform(sigma_min_A, sigma_max_A))
        # sigma is the RMS length of an atom's 3D displacement: each component gets sigma/sqrt(3).
        out.append((coord0 + rng.normal(0.0, sigma / np.sqrt(3.0), size=coord0.shape), 2, sigma))
        k += 1
    return numbers, out


def generate(out_path: str, seed: int = DEFAULT_SEED, per_molecule: int = 6, n_etkdg: int = 1,
             n_mmff: int = 1, sigma_min_A: float = 0.03, sigma_max_A: float = 0.12,
             limit: int | None = None, verbose: bool = True, pairs: bool = True) -> dict:
    """Build the data set and write it to ``out_path``. Returns a summary dict (counts, seconds)."""
    import h5py
    import rdkit

    t0 = time.perf_counter()
    smiles_list = all_smiles(pairs)
    smiles_list = smiles_list[:limit] if limit else smiles_list
    # key: (formula, atom order) -> lists accumulated conformer by conformer
    groups: dict[tuple, dict] = {}
    n_sampled = n_close = n_scf = 0
    t_label = 0.0
    for mi, smi in enumerate(smiles_list):
        numbers, geoms = molecule_geometries(smi, mi, seed, per_molecule, n_etkdg, n_mmff,
                                             sigma_min_A, sigma_max_A)
        order = np.argsort(numbers, kind="stable")
        numbers = numbers[order]
        key = (hill_formula(numbers), tuple(numbers.tolist()))
        g = groups.setdefault(key, dict(smiles=[], coord=[], energy=[], forces=[], charges=[],
                                        smiles_index=[], sampling=[], sigma=[]))
        g["smiles"].append(smi)
        for coord, code, sigma in geoms:
            n_sampled += 1
            coord = coord[order].astype(np.float32)
            if min_distance_A(coord.astype(np.float64)) < MIN_DISTANCE_A:
                n_close += 1
                continue
            t = time.perf_counter()
            res = gfn2_singlepoint(numbers, coord.astype(np.float64))
            t_label += time.perf_counter() - t
            if res is None:
                n_scf += 1
                continue
            e, f, q = res
            g["coord"].append(coord)
            g["energy"].append(e)
            g["forces"].append(f.astype(np.float32))
            g["charges"].append(q.astype(np.float32))
            g["smiles_index"].append(len(g["smiles"]) - 1)
            g["sampling"].append(code)
            g["sigma"].append(sigma)
        if verbose:
            print(f"[{mi + 1}/{len(smiles_list)}] {smi:22s} {key[0]:10s} "
                  f"{time.perf_counter() - t0:7.1f} s", file=sys.stderr, flush=True)

    # Name groups: the first atom order of a formula gets the bare formula, later ones _1, _2, ...
    seen: dict[str, int] = defaultdict(int)
    named = []
    for (formula, _), g in groups.items():
        idx = seen[formula]
        seen[formula] += 1
        named.append((formula if idx == 0 else f"{formula}_{idx}", g, _))
    named.sort(key=lambda t: t[0])

    n_kept = 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    comp = dict(compression="gzip", compression_opts=9, shuffle=True, track_times=False)
    # v110 object headers and chunk indexes: the default (v0) ones cost ~4 kB per small dataset,
    # which for ~450 groups made the file 3.6x larger than with them.
    with h5py.File(out_path, "w", track_order=False, libver=("v110", "v110")) as f:
        for name, g, numbers in named:
            if not g["energy"]:
                continue
            n_kept += len(g["energy"])
            grp = f.create_group(name)
            grp.create_dataset("atomic_numbers", data=np.asarray(numbers, dtype=np.uint8),
                               track_times=False)
            grp.create_dataset("coordinates", data=np.stack(g["coord"]).astype(np.float32), **comp)
            grp.create_dataset("gfn2.energy", data=np.asarray(g["energy"], dtype=np.float64),
                               **comp)
            grp.create_dataset("gfn2.forces", data=np.stack(g["forces"]).astype(np.float32), **comp)
            grp.create_dataset("gfn2.charges", data=np.stack(g["charges"]).astype(np.float32),
                               **comp)
            grp.attrs["smiles"] = np.array(g["smiles"], dtype=h5py.string_dtype())
            grp.attrs["smiles_index"] = np.asarray(g["smiles_index"], dtype=np.int16)
            grp.attrs["sampling"] = np.asarray(g["sampling"], dtype=np.int8)
            grp.attrs["sigma_A"] = np.asarray(g["sigma"], dtype=np.float32)
        a = f.attrs
        a["title"] = "aimnet_fast default data set: small H C N O F S Cl molecules, GFN2-xTB labels"
        a["level_of_theory"] = (f"GFN2-xTB (tblite), neutral singlet, electronic temperature "
                                f"{ELECTRONIC_TEMPERATURE_K:g} K, accuracy {TBLITE_ACCURACY:g}, "
                                f"max-iter {TBLITE_MAX_ITER}, no solvation; single points on the "
                                "stored float32 geometries")
        a["units"] = ("coordinates: angstrom; gfn2.energy: hartree (total energy); gfn2.forces: "
                      "hartree/angstrom, true forces -dE/dR; gfn2.charges: e (Mulliken)")
        a["sampling"] = (f"RDKit ETKDGv3 (<= {n_etkdg} per molecule, prune 0.25 A), MMFF94 "
                         f"minimisation of the first {n_mmff}, then random normal displacements "
                         f"(per-atom RMS displacement length sigma ~ U[{sigma_min_A}, "
                         f"{sigma_max_A}] A, sigma/sqrt(3) per component) up to {per_molecule} per "
                         f"molecule; dropped: min distance < {MIN_DISTANCE_A} A, SCF failure")
        a["group_attrs"] = ("smiles; smiles_index per conformer; sampling per conformer "
                            "(0 ETKDG, 1 MMFF-optimised, 2 displaced); sigma_A per conformer")
        a["generator"] = "aimnet_fast.data.make_default"
        a["generator_version"] = GENERATOR_VERSION
        a["seed"] = seed
        a["rdkit_version"] = rdkit.__version__
        a["tblite_version"] = metadata.version("tblite")
        a["n_molecules"] = len(smiles_list)
        a["n_sampled"] = n_sampled
        a["n_conformers"] = n_kept
        a["n_dropped_close_atoms"] = n_close
        a["n_dropped_scf"] = n_scf
    summary = dict(n_molecules=len(smiles_list), n_groups=len(named), n_sampled=n_sampled,
                   n_conformers=n_kept, n_dropped_close_atoms=n_close, n_dropped_scf=n_scf,
                   seconds_total=time.perf_counter() - t0, seconds_labelling=t_label)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="aimnet_fast/data/default.h5")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--per-molecule", type=int, default=6, help="conformers sampled per molecule")
    p.add_argument("--n-etkdg", type=int, default=1)
    p.add_argument("--n-mmff", type=int, default=1)
    p.add_argument("--no-pairs", action="store_true",
                   help="only the hand-written SMILES (the 1.0 set: --per-molecule 30 --n-etkdg 8 "
                        "--n-mmff 2 --no-pairs)")
    p.add_argument("--sigma-min", type=float, default=0.03, help="Å")
    p.add_argument("--sigma-max", type=float, default=0.12, help="Å")
    p.add_argument("--limit", type=int, default=None, help="only the first N molecules (timing)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    # One core unless told otherwise. The variable only works before libgomp is loaded; the package
    # import may already have loaded torch's libgomp, which tblite then shares (same soname), so set
    # the thread count of the loaded runtime too. More threads also change the last bits of labels.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    s = generate(args.out, seed=args.seed, per_molecule=args.per_molecule, n_etkdg=args.n_etkdg,
                 n_mmff=args.n_mmff, sigma_min_A=args.sigma_min, sigma_max_A=args.sigma_max,
                 limit=args.limit, verbose=not args.quiet, pairs=not args.no_pairs)
    for k, v in s.items():
        print(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
