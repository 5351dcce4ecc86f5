"""Readers for the HDF5 layouts of public molecular data sets.

A *source* is a dict naming one file and how to read it::

    {"path": "ani1x.h5", "layout": "ani1x",            # or "auto"
     "properties": {"energy": {"key": "wb97x_tz.energy", "unit": "hartree"},
                    "forces": {"key": "wb97x_tz.forces", "unit": "hartree/angstrom"},
                    "charges": {"key": "wb97x_tz.mbis_charges", "unit": "e"}},
     "skip_unknown_elements": False}

Property entries: ``key`` (dataset name inside a molecule group), ``unit``, ``convention``
(``"force"`` = −dE/dR as stored, ``"gradient"`` = +dE/dR, negated on reading), ``drop_last_column``
(06r charge arrays carry an extra residual column), ``per`` (``"atom"``/``"conformer"``, known for the
standard names), ``zero_is_missing`` (all-zero rows mean "not computed"; default on for energy, forces,
charges, volumes, except per-atom rows of single-atom conformers; turn it off where exact zeros are
real, e.g. rounded charges of a homonuclear diatomic) and ``required`` (default true: a key found in
no group of the file is an error, because it is most likely a typo; found in some groups only, the
others are masked and counted).
Without ``properties`` the layout's defaults apply (``LAYOUTS[...]["defaults"]``).

Source options: ``coord_unit`` (layout default), ``skip_unknown_elements`` (skip and count conformers
with elements outside ``elements`` instead of raising), ``skip_bad_conformers`` (same for NaN/inf
coordinates, atoms closer than 0.1 Å, and labels that are infinite or outside their physical range:
see ``aimnet_fast.data.checks``), ``skip_charged`` (skip conformers whose total charge is not 0 or
multiplicity not 1: from the group's ``charge``/``mult`` arrays, else from the rounded sum of the
``charges`` label),
``elements`` (default: the model's H C N O S F Cl).

An unknown key in a source or a property entry (``units`` for ``unit``) is a DataError naming it and
the known ones.

Stored units after reading: coordinates Å, energy Hartree (float64), forces Hartree/Å (true forces,
float32), charges e, volumes bohr³; missing values NaN.

Every conformer is checked while it is read (``checks``): a failed check is a DataError naming file,
group and conformer (and atoms, property, value and unit), or a skip counted per reason in the
summary (``PackedDataset.summary()``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import h5py
import numpy as np

from .. import units
from ..constants import ELEMENTS, PERIODIC_TABLE
from ..errors import DataError
from . import checks

#: Unit name -> (dimension, factor to the stored unit).
UNITS = units.FACTORS

#: Standard label names: (per, dimension, trailing shape, stored dtype).
STANDARD = {
    "energy": ("conformer", "energy", (), np.float64),
    "forces": ("atom", "force", (3,), np.float32),
    "charges": ("atom", "charge", (), np.float32),
    "volumes": ("atom", "volume", (), np.float32),
}

LAYOUTS: dict[str, dict] = {
    # ANI-1x release: one group per formula; atomic_numbers (Na,), coordinates (Nc,Na,3) Å.
    "ani1x": {"species": "atomic_numbers", "coord": "coordinates", "coord_unit": "angstrom",
              "group_by": "group",
              "defaults": {"energy": {"key": "wb97x_tz.energy", "unit": "hartree"},
                           "forces": {"key": "wb97x_tz.forces", "unit": "hartree/angstrom"},
                           "charges": {"key": "wb97x_tz.mbis_charges", "unit": "e"},
                           "volumes": {"key": "wb97x_tz.mbis_volumes", "unit": "bohr3"}}},
    # Original ANI-1: <set>/<mol>/{species (byte symbols), coordinates, energies}.
    "ani1": {"species": "species", "coord": "coordinates", "coord_unit": "angstrom",
             "group_by": "group",
             "defaults": {"energy": {"key": "energies", "unit": "hartree"}}},
    # Raw "06r" ANI layout: as ani1 plus forces that store +dE/dx, 06r charges with an extra column.
    "06r": {"species": "species", "coord": "coordinates", "coord_unit": "angstrom",
            "group_by": "group",
            "defaults": {"energy": {"key": "energies", "unit": "hartree"},
                         "forces": {"key": "forces", "unit": "hartree/angstrom",
                                    "convention": "gradient"}}},
    # ANI-2x by size: 002/{species (Nc,Na) int64, coordinates, energies, forces (true forces)}.
    "ani2x": {"species": "species", "coord": "coordinates", "coord_unit": "angstrom",
              "group_by": "formula",
              "defaults": {"energy": {"key": "energies", "unit": "hartree"},
                           "forces": {"key": "forces", "unit": "hartree/angstrom"}}},
    # AIMNet2 size-grouped: 007/{coord, numbers (Nc,Na), energy eV, forces eV/Å, charges, charge, mult}.
    "aimnet2": {"species": "numbers", "coord": "coord", "coord_unit": "angstrom",
                "group_by": "formula",
                "defaults": {"energy": {"key": "energy", "unit": "ev"},
                             "forces": {"key": "forces", "unit": "ev/angstrom"},
                             "charges": {"key": "charges", "unit": "e"}}},
    # SPICE: per molecule atomic_numbers, conformations (bohr), dft_total_energy (Ha),
    # dft_total_gradient (Ha/bohr, a gradient), mbis_charges (Nc,Na,1).
    "spice": {"species": "atomic_numbers", "coord": "conformations", "coord_unit": "bohr",
              "group_by": "group",
              "defaults": {"energy": {"key": "dft_total_energy", "unit": "hartree"},
                           "forces": {"key": "dft_total_gradient", "unit": "hartree/bohr",
                                      "convention": "gradient"},
                           "charges": {"key": "mbis_charges", "unit": "e"}}},
}

_COORD_KEYS = ("coordinates", "coord", "conformations")

#: The keys a source dict and a property entry may have.
SOURCE_KEYS = ("path", "layout", "properties", "coord_unit", "skip_unknown_elements",
               "skip_bad_conformers", "skip_charged", "elements")
PROPERTY_KEYS = ("key", "unit", "convention", "drop_last_column", "per", "zero_is_missing",
                 "required")

#: Conformer chunks are read so that one chunk holds about this many atoms (bounds the memory).
CHUNK_ATOMS = 1 << 20


def open_h5(path: str) -> h5py.File:
    """Open an HDF5 file read-only; a missing, corrupt or truncated file raises DataError."""
    if not os.path.exists(path):
        raise DataError("file not found", path)
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read HDF5 file (corrupt or truncated?): {e}", path) from e


def _leaf_groups(h5: h5py.File, coord_key: str | None, path: str) -> Iterator[tuple[str, h5py.Group]]:
    """Molecule groups (those holding a coordinates dataset), depth first, in name order."""
    def walk(g):
        try:
            keys = sorted(g.keys())
        except (OSError, KeyError, RuntimeError) as e:
            raise DataError(f"cannot list group: {e}", path, g.name) from e
        keys_here = set(keys)
        ck = coord_key if coord_key else next((k for k in _COORD_KEYS if k in keys_here), None)
        if ck is not None and ck in keys_here and g.get(ck, getclass=True) is h5py.Dataset:
            yield g.name.lstrip("/"), g
            return
        for k in keys:
            try:
                cls = g.get(k, getclass=True)
            except (OSError, KeyError, RuntimeError) as e:
                raise DataError(f"cannot read member {k!r}: {e}", path, g.name) from e
            if cls is h5py.Group:
                yield from walk(g[k])
    yield from walk(h5)


def detect_layout(path: str) -> str:
    """Guess the layout from the first molecule group of the file (see ``LAYOUTS``)."""
    with open_h5(path) as h5:
        for name, g in _leaf_groups(h5, None, path):
            keys = set(g.keys())
            if "atomic_numbers" in keys and "coordinates" in keys:
                return "ani1x"
            if "atomic_numbers" in keys and "conformations" in keys:
                return "spice"
            if "numbers" in keys and "coord" in keys:
                return "aimnet2"
            if "species" in keys and "coordinates" in keys:
                if g["species"].ndim == 2:
                    return "ani2x"
                # The raw 06r files carry Hirshfeld/CM5 charges and a level-of-theory string.
                return "06r" if keys & {"hirshfeld", "cm5", "lot"} else "ani1"
            raise DataError(f"unknown layout: molecule group keys {sorted(keys)}", path, name)
    raise DataError("no molecule group (with coordinates) found: unknown layout", path)


def normalize_source(src: dict) -> dict:
    """Validate a source dict and fill every default; the result is JSON-able (cache key)."""
    if not isinstance(src, dict):
        raise DataError(f"a source must be a mapping (path, layout, properties, ...), got {src!r}")
    if "path" not in src:
        raise DataError("source without 'path'")
    path = os.path.abspath(os.fspath(src["path"]))
    checks.check_keys(src, SOURCE_KEYS, f"the source of {path}", path)
    layout = src.get("layout", "auto") or "auto"
    if layout == "auto":
        layout = detect_layout(path)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r} (known: {sorted(LAYOUTS)} or 'auto')", path)
    lay = LAYOUTS[layout]
    coord_unit = str(src.get("coord_unit", lay["coord_unit"])).lower()
    if UNITS.get(coord_unit, ("",))[0] != "length":
        raise DataError(f"coord_unit {coord_unit!r} is not a length unit", path)
    props_in = src.get("properties")
    if props_in is None:
        props_in = lay["defaults"]
    if not isinstance(props_in, dict):
        raise DataError(f"'properties' must map label names to entries, got {props_in!r}", path)
    props = {}
    for name, spec in props_in.items():
        if isinstance(spec, str):
            spec = {"key": spec}
        if not isinstance(spec, dict):
            raise DataError(f"property {name!r}: an entry must be a key or a mapping "
                            f"({', '.join(PROPERTY_KEYS)}), got {spec!r}", path)
        checks.check_keys(spec, PROPERTY_KEYS, f"property {name!r} of {path}", path)
        std = STANDARD.get(name)
        per = spec.get("per", std[0] if std else None)
        if per not in (None, "atom", "conformer"):
            raise DataError(f"property {name!r}: 'per' must be 'atom' or 'conformer', got {per!r}",
                            path)
        if std and per != std[0]:
            raise DataError(f"property {name!r}: a standard label is per {std[0]}, not per {per}",
                            path)
        unit = str(spec.get("unit", {"energy": "hartree", "force": "hartree/angstrom",
                                     "charge": "e", "volume": "bohr3"}.get(std[1]) if std else "1")).lower()
        if unit not in UNITS:
            raise DataError(f"property {name!r}: unknown unit {unit!r} (known: {sorted(UNITS)})", path)
        if std and UNITS[unit][0] != std[1]:
            raise DataError(f"property {name!r}: unit {unit!r} is not a {std[1]} unit", path)
        conv = spec.get("convention", "force")
        if conv not in ("force", "gradient"):
            raise DataError(f"property {name!r}: convention must be 'force' or 'gradient'", path)
        if "key" not in spec:
            raise DataError(f"property {name!r} without 'key'", path)
        props[name] = {
            "key": str(spec["key"]), "unit": unit, "factor": UNITS[unit][1], "convention": conv,
            "drop_last_column": bool(spec.get("drop_last_column", False)), "per": per,
            "tail": list(std[2]) if std else None,
            "zero_is_missing": bool(spec.get("zero_is_missing", std is not None)),
            "required": bool(spec.get("required", True)),
            "dtype": np.dtype(std[3] if std else np.float32).str,
        }
    return {
        "path": path, "layout": layout, "coord_unit": coord_unit, "properties": props,
        "skip_unknown_elements": bool(src.get("skip_unknown_elements", False)),
        "skip_bad_conformers": bool(src.get("skip_bad_conformers", False)),
        "skip_charged": bool(src.get("skip_charged", False)),
        "elements": [int(z) for z in src.get("elements", ELEMENTS)],
    }


@dataclass
class Block:
    """Conformers of one molecule group (or one chunk of it) after conversion and filtering.

    numbers (n, Na) int64; coord (n, Na, 3) float32 Å; labels name -> (n, ...) per conformer or
    (n, Na, ...) per atom, NaN where missing; conf_index (n,) index within the HDF5 group;
    split_key (n,) str, the molecule/formula the conformer belongs to.
    """
    h5group: str
    numbers: np.ndarray
    coord: np.ndarray
    labels: dict
    conf_index: np.ndarray
    split_key: np.ndarray
    label_per: dict


#: Reasons a conformer is skipped (counted per source, in this order of precedence).
SKIP_REASONS = {"skipped_unknown_element": "unknown element", "skipped_bad_coord": "bad coordinates",
                "skipped_close_atoms": "close atoms", "skipped_bad_label": "bad label",
                "skipped_charged": "charged"}


def new_label_counts() -> dict:
    """Per label: conformers with it (``used``), masked because NaN, all-zero or absent, skipped
    because of it (infinite or out of range), and atoms with it."""
    return {"used": 0, "nan": 0, "zero": 0, "absent": 0, "skipped": 0, "atoms_used": 0}


def new_counts(src: dict) -> dict:
    return {"conformers_read": 0, "conformers_used": 0, "h5_groups": 0,
            **{k: 0 for k in SKIP_REASONS},
            "labels": {n: new_label_counts() for n in src["properties"]}}


def _species_to_numbers(arr: np.ndarray, path: str, group: str) -> np.ndarray:
    if arr.dtype.kind in "SUO":
        uniq, inv = np.unique(arr.reshape(-1), return_inverse=True)
        zs = np.empty(len(uniq), np.int64)
        for i, s in enumerate(uniq):
            s = s.decode() if isinstance(s, bytes) else str(s)
            z = units.element_number(s)
            if z is None:
                raise DataError(f"unknown element symbol {s!r}", path, group)
            zs[i] = z
        return zs[np.asarray(inv).reshape(-1)].reshape(arr.shape)
    if arr.dtype.kind not in "iu":
        raise DataError(f"species of dtype {arr.dtype} are neither symbols nor atomic numbers",
                        path, group)
    return arr.astype(np.int64)


def _formula_keys(numbers: np.ndarray) -> np.ndarray:
    """(n, Na) atomic numbers -> (n,) Hill-like formula strings ("C2H6")."""
    uniq, inv = np.unique(np.sort(numbers, axis=1), axis=0, return_inverse=True)
    names = []
    for row in uniq:
        zs, cnt = np.unique(row, return_counts=True)
        names.append("".join(f"{PERIODIC_TABLE[z]}{c}" for z, c in zip(zs, cnt)))
    return np.asarray(names, dtype=object)[np.asarray(inv).reshape(-1)]


def _read(ds: h5py.Dataset, sl: slice, path: str, group: str) -> np.ndarray:
    try:
        return ds[sl] if ds.ndim else ds[()]
    except (OSError, RuntimeError, ValueError) as e:
        raise DataError(f"cannot read {ds.name.rsplit('/', 1)[-1]!r} conformers "
                        f"{sl.start}..{sl.stop}: {e}", path, group, sl.start) from e


def iter_blocks(src: dict, counts: dict) -> Iterator[Block]:
    """Read a normalized source (``normalize_source``) chunk by chunk; update ``counts``."""
    path, lay = src["path"], LAYOUTS[src["layout"]]
    cfac = UNITS[src["coord_unit"]][1]
    elements = np.asarray(src["elements"])
    found = {n: False for n in src["properties"]}
    with open_h5(path) as h5:
        for gname, g in _leaf_groups(h5, lay["coord"], path):
            counts["h5_groups"] += 1
            if lay["species"] not in g:
                raise DataError(f"no {lay['species']!r} (element) array", path, gname)
            cds = g[lay["coord"]]
            spec_all = _species_to_numbers(_read(g[lay["species"]], slice(None), path, gname),
                                           path, gname)
            if cds.ndim != 3 or cds.shape[2] != 3:
                raise DataError(f"coordinates of shape {cds.shape}, expected (conformers, atoms, 3)",
                                path, gname)
            nc, na = cds.shape[0], cds.shape[1]
            if spec_all.shape[-1] != na or (spec_all.ndim == 2 and spec_all.shape[0] != nc) \
                    or spec_all.ndim > 2:
                raise DataError(f"species of shape {spec_all.shape} do not match coordinates "
                                f"{cds.shape}", path, gname)
            present = {n: p["key"] in g for n, p in src["properties"].items()}
            for n, ok in present.items():
                key = src["properties"][n]["key"]
                if ok and (g[key].ndim == 0 or g[key].shape[0] != nc):
                    raise DataError(f"property {n!r} ({key!r}) has shape {g[key].shape}, but the "
                                    f"group has {nc} conformers", path, gname)
            for n, p in present.items():
                found[n] |= p
            step = max(1, CHUNK_ATOMS // max(na, 1))
            for c0 in range(0, nc, step):
                c1 = min(nc, c0 + step)
                block = _read_chunk(src, g, gname, c0, c1, nc, na, spec_all, cds, cfac, elements,
                                    present, counts, lay)
                if block is not None:
                    yield block
    for n, ok in found.items():
        p = src["properties"][n]
        if not ok and p["required"]:
            raise DataError(f"property {n!r}: key {p['key']!r} is in no molecule group "
                            f"(set 'required': false if that is expected)", path)


def _read_chunk(src, g, gname, c0, c1, nc, na, spec_all, cds, cfac, elements, present, counts, lay):
    path, n = src["path"], c1 - c0
    sl = slice(c0, c1)
    counts["conformers_read"] += n
    numbers = spec_all[sl] if spec_all.ndim == 2 else np.broadcast_to(spec_all, (n, na))
    coord = _read(cds, sl, path, gname).astype(np.float64) * cfac
    keep = np.ones(n, bool)

    bad_el = ~np.isin(numbers, elements).all(axis=1)
    if bad_el.any():
        i = int(np.flatnonzero(bad_el)[0])
        z = int(numbers[i][~np.isin(numbers[i], elements)][0])
        if not src["skip_unknown_elements"]:
            raise DataError(f"element {PERIODIC_TABLE[z] if z < len(PERIODIC_TABLE) else z} "
                            f"(Z={z}) is not one the model knows "
                            f"({[PERIODIC_TABLE[e] for e in src['elements']]}); set "
                            f"'skip_unknown_elements': true to skip such conformers",
                            path, gname, c0 + i)
        counts["skipped_unknown_element"] += int(bad_el.sum())
        keep &= ~bad_el

    bad_xyz = keep & ~np.isfinite(coord).all(axis=(1, 2))
    if bad_xyz.any():
        if not src["skip_bad_conformers"]:
            raise DataError("coordinates are NaN or infinite (set 'skip_bad_conformers': true "
                            "to skip such conformers)", path, gname, c0 + int(np.flatnonzero(bad_xyz)[0]))
        counts["skipped_bad_coord"] += int(bad_xyz.sum())
        keep &= ~bad_xyz

    close, first = checks.close_atoms(coord, keep)
    if first is not None:
        c, i, j, d = first
        if not src["skip_bad_conformers"]:
            raise DataError(checks.close_atoms_message(i, j, d, numbers[c]), path, gname, c0 + c)
        counts["skipped_close_atoms"] += int(close.sum())
        keep &= ~close

    labels, zeros, pers = {}, {}, {}
    for name, p in src["properties"].items():
        labels[name], zeros[name], pers[name] = _read_label(name, p, g, gname, sl, n, na, nc,
                                                            present[name], path)
    # Infinite labels and labels outside their physical range (float64, stored units): an error
    # naming the conformer, or skipped and counted per label.
    for name, p in src["properties"].items():
        if not present[name]:
            continue
        bad = checks.bad_label_rows(name, labels[name], numbers, pers[name]) & keep
        if bad.any():
            c = int(np.flatnonzero(bad)[0])
            if not src["skip_bad_conformers"]:
                raise DataError(checks.bad_label_message(name, {**p, "per": pers[name]},
                                                         labels[name][c], numbers[c]),
                                path, gname, c0 + c)
            counts["labels"][name]["skipped"] += int(bad.sum())
            counts["skipped_bad_label"] += int(bad.sum())
            keep &= ~bad

    if src["skip_charged"]:
        charged = np.zeros(n, bool)
        if "charge" in g:
            charged |= np.asarray(_read(g["charge"], sl, path, gname)).reshape(n) != 0
        elif "charges" in labels:
            q = np.nansum(labels["charges"].astype(np.float64), axis=1)
            charged |= np.isfinite(labels["charges"]).all(axis=1) & (np.abs(np.rint(q)) > 0)
        if "mult" in g:
            charged |= np.asarray(_read(g["mult"], sl, path, gname)).reshape(n) != 1
        charged &= keep
        counts["skipped_charged"] += int(charged.sum())
        keep &= ~charged

    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return None
    numbers = np.ascontiguousarray(numbers[idx])
    # to the stored dtype only now: values of skipped conformers may not fit it
    labels = {k: v[idx].astype(np.dtype(src["properties"][k]["dtype"])) for k, v in labels.items()}
    for name, v in labels.items():
        c = counts["labels"][name]
        if not present[name]:
            c["absent"] += idx.size
            continue
        fin = np.isfinite(v.reshape(idx.size, -1))
        zero = zeros[name][idx]
        c["zero"] += int(zero.sum())
        c["nan"] += int((~fin.all(axis=1) & ~zero).sum())
        c["used"] += int(fin.all(axis=1).sum())
        if pers[name] == "atom":
            c["atoms_used"] += int(np.isfinite(v.reshape(idx.size, na, -1)).all(axis=2).sum())
    counts["conformers_used"] += idx.size
    if lay["group_by"] == "formula":
        split_key = _formula_keys(numbers)
    else:
        split_key = np.full(idx.size, gname, dtype=object)
    return Block(gname, numbers, coord[idx].astype(np.float32), labels,
                 (c0 + idx).astype(np.int64), split_key, pers)


def _read_label(name, p, g, gname, sl, n, na, nc, present, path):
    """One property for conformers ``sl`` in stored units (float64; the caller casts to the stored
    dtype after the range checks), NaN where missing.

    Returns (values, zero_rows (n,) bool, "atom" | "conformer"); rows that were all zero (now NaN)
    are flagged so that the summary counts them apart from NaN rows.
    """
    tail = tuple(p["tail"]) if p["tail"] is not None else None
    if not present:
        if p["per"] is None:
            raise DataError(f"property {name!r}: say 'per': 'atom' or 'conformer'", path, gname)
        shape = (n, na) + (tail or ()) if p["per"] == "atom" else (n,) + (tail or ())
        return np.full(shape, np.nan, np.float64), np.zeros(n, bool), p["per"]
    ds = g[p["key"]]
    raw = np.asarray(_read(ds, sl, path, gname))
    per = p["per"]
    if per is None:  # a name we do not know: per atom when its second axis matches the atoms
        per = "atom" if raw.ndim >= 2 and raw.shape[1] in (na, na + p["drop_last_column"]) else "conformer"
    if raw.shape[:1] != (n,):
        raise DataError(f"property {name!r} ({p['key']!r}) has shape {ds.shape}, but the group has "
                        f"{nc} conformers", path, gname, sl.start)
    if per == "atom":
        if p["drop_last_column"]:
            if raw.ndim < 2 or raw.shape[1] != na + 1:
                raise DataError(f"property {name!r} ({p['key']!r}) of shape {ds.shape}: "
                                f"drop_last_column expects {na + 1} columns", path, gname, sl.start)
            raw = raw[:, :na]
        if tail == () and raw.ndim == 3 and raw.shape[2] == 1:  # SPICE (Nc, Na, 1)
            raw = raw[:, :, 0]
        if raw.ndim < 2 or raw.shape[1] != na or (tail is not None and raw.shape[2:] != tail):
            raise DataError(f"property {name!r} ({p['key']!r}) has shape {ds.shape}, expected "
                            f"(conformers, {na}{''.join(', ' + str(t) for t in tail or ())})",
                            path, gname, sl.start)
    elif tail is not None and raw.shape[1:] != tail:
        raise DataError(f"property {name!r} ({p['key']!r}) has shape {ds.shape}, expected "
                        f"(conformers{''.join(', ' + str(t) for t in tail)})", path, gname, sl.start)
    if raw.dtype.kind not in "fiub":
        raise DataError(f"property {name!r} ({p['key']!r}) of dtype {raw.dtype} is not numeric",
                        path, gname)
    val = raw.astype(np.float64) * p["factor"]
    if p["convention"] == "gradient":
        val = -val
    zero = np.zeros(n, bool)
    # A lone atom has zero force and charge for real: only rows of two or more atoms are "missing".
    if p["zero_is_missing"] and (per == "conformer" or na > 1):
        rows = val.reshape(n, -1)
        zero = (rows == 0).all(axis=1)
        rows[zero] = np.nan
    return val, zero, per
