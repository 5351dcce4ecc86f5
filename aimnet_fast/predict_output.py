"""Writers for prediction results, chosen by the output file's suffix, fed one batch at a time.

- ``.json`` (and standard output): one document, ``{"format": "aimnet_fast.predict", "units",
  "models", "input", "n_models", "heads", "molecules": [...]}``, one molecule per line, in the
  model's units (Hartree, Hartree/Å, e, bohr³; names say which). Written as the batches come, so
  memory does not grow with the file.
- ``.extxyz`` (or ``.xyz``): extended XYZ that ``ase.io.read(path, ":")`` reads into Atoms with a
  calculator holding ``energy`` (eV), ``forces`` (eV/Å) and ``charges`` (e): ASE's units, converted
  here at the edge. The comment line also holds ``energy_Ha`` and the frame's ``name`` and
  ``source``; per-atom ``volumes_bohr3`` is an extra column.
- ``.npz``: flat arrays (``numbers``, ``offsets`` (M+1,), ``energy_Ha`` (M,), ``forces_Ha_per_A``
  (N, 3), ...) plus ``name``, ``source``, ``index`` per molecule and ``units`` (a JSON string);
  arrays are gathered until the end (a few dozen bytes per atom).

Every writer writes to ``PATH.partial`` and renames it into place only when all molecules are
written: a failed run leaves no output that looks complete.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .units import HARTREE_TO_EV, element_symbol

SUFFIXES = (".json", ".extxyz", ".xyz", ".npz")


#: Output names with one value per molecule; every other name has one row per atom.
PER_MOLECULE = ("energy_Ha", "energy_std_Ha")


def records(numbers: np.ndarray, offsets: Sequence[int], arrays: dict[str, np.ndarray]) -> list[dict]:
    """Per-molecule dicts (``numbers`` and the output names, as lists) from flat arrays."""
    per_mol = {k: v.tolist() for k, v in arrays.items() if k in PER_MOLECULE}
    results = []
    for m in range(len(offsets) - 1):
        a, b = int(offsets[m]), int(offsets[m + 1])
        r: dict = {"numbers": numbers[a:b].tolist()}
        for k, v in arrays.items():
            r[k] = per_mol[k][m] if k in PER_MOLECULE else v[a:b].tolist()
        results.append(r)
    return results


class _Writer:
    binary = False  # the file is opened in binary mode

    def __init__(self, path: Path | None, header: dict):
        self.path = path
        self.header = header
        self.count = 0
        if path is None:
            self.tmp, self.fh = None, sys.stdout
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = path.with_name(path.name + ".partial")
            self.fh = open(self.tmp, "wb" if self.binary else "w")

    def write(self, frames: Sequence, numbers: np.ndarray, offsets: np.ndarray,
              arrays: dict[str, np.ndarray]) -> None:
        """One batch: its frames (``io.Frame``), atomic numbers (N,), offsets (M+1,) and the
        result arrays by output name (``energy_Ha`` (M,), ``forces_Ha_per_A`` (N, 3), ...)."""
        raise NotImplementedError

    def _finish(self) -> None:
        pass

    def close(self) -> None:
        self._finish()
        if self.tmp is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.tmp is not None:
            self.fh.close()
            self.tmp.unlink(missing_ok=True)


def _number_format(values: np.ndarray) -> str | None:
    """The %-format that writes every value of a float64 array as JSON, or None where only
    ``json.dumps`` can (NaN and infinities are not JSON numbers; it writes them as NaN/Infinity).

    Values that a float32 network computed are float32 numbers held in float64: nine significant
    digits identify each exactly (``np.float32`` of the text is the value), and ``%.9g`` formats
    them ~4× faster than the 17-digit shortest form. Any other value (an energy with its float64
    SAE, a float64 model's output, an ensemble's mean) is written as ``json.dumps`` would: repr."""
    if values.dtype != np.float64 or not np.isfinite(values).all():
        return None
    return "%.9g" if np.array_equal(values.astype(np.float32), values) else "%r"


def _template(number: str, shape: tuple) -> str:
    """JSON text of an (n,) or (n, c) list of numbers, as a %-format."""
    if len(shape) == 1:
        return "[" + ", ".join([number] * shape[0]) + "]"
    row = "[" + ", ".join([number] * shape[1]) + "]"
    return "[" + ", ".join([row] * shape[0]) + "]"


#: The templates of molecules up to 256 atoms, built once per shape (~3 MB at most); larger ones
#: are built per molecule, at a cost small beside formatting their numbers.
_small_template = functools.lru_cache(maxsize=512)(_template)


class JsonWriter(_Writer):
    def __init__(self, path, header):
        super().__init__(path, header)
        head = json.dumps(header, indent=1)
        self.fh.write(head[:-2] + ',\n "molecules": [')

    def write(self, frames, numbers, offsets, arrays):
        # The text of each molecule is what json.dumps of its record gives (same keys, separators
        # and number forms, float32 values aside: _number_format), built from %-formats: the
        # S66x8 ×4 output (380k numbers) took 0.36-0.48 s through json.dumps, 0.11-0.18 s so.
        formats = {k: _number_format(v) for k, v in arrays.items()}
        if None in formats.values():
            return self._write_records(frames, numbers, offsets, arrays)
        keys = {k: ", " + json.dumps(k) + ": " for k in arrays}
        per_mol = {k: v.tolist() for k, v in arrays.items() if k in PER_MOLECULE}
        lines = []
        for m, f in enumerate(frames):
            a, b = int(offsets[m]), int(offsets[m + 1])
            head = json.dumps({"index": f.index, "name": f.title, "source": f.source,
                               "numbers": numbers[a:b].tolist()})
            parts = [head[:-1]]
            for k, v in arrays.items():
                number = formats[k]
                if k in PER_MOLECULE:
                    parts.append(keys[k] + number % per_mol[k][m])
                else:
                    rows = v[a:b]
                    template = (_small_template if len(rows) <= 256 else _template)(number, rows.shape)
                    parts.append(keys[k] + template % tuple(rows.ravel().tolist()))
            lines.append("".join(parts) + "}")
        self._put(lines)

    def _write_records(self, frames, numbers, offsets, arrays):
        self._put([json.dumps({"index": f.index, "name": f.title, "source": f.source, **r})
                   for f, r in zip(frames, records(numbers, offsets, arrays))])

    def _put(self, lines: list[str]) -> None:
        if lines:
            self.fh.write(("\n" if self.count == 0 else ",\n") + ",\n".join(lines))
            self.count += len(lines)

    def _finish(self):
        self.fh.write("\n]}\n")


class ExtxyzWriter(_Writer):
    def write(self, frames, numbers, offsets, arrays):
        props = ["species:S:1", "pos:R:3"]
        cols = []
        if "forces_Ha_per_A" in arrays:
            props.append("forces:R:3")
            cols.append(arrays["forces_Ha_per_A"] * HARTREE_TO_EV)
        if "forces_std_Ha_per_A" in arrays:
            props.append("forces_std:R:3")
            cols.append(arrays["forces_std_Ha_per_A"] * HARTREE_TO_EV)
        if "charges_e" in arrays:
            props.append("charges:R:1")
            cols.append(arrays["charges_e"][:, None])
        if "volumes_bohr3" in arrays:
            props.append("volumes_bohr3:R:1")
            cols.append(arrays["volumes_bohr3"][:, None])
        ncol = sum(c.shape[1] for c in cols)
        row_fmt = "%-2s %.8f %.8f %.8f" + " %.10e" * ncol + "\n"
        symbols = [element_symbol(z) for z in numbers.tolist()]
        values = np.concatenate(cols, axis=1) if cols else np.zeros((len(symbols), 0))
        for m, f in enumerate(frames):
            a, b = int(offsets[m]), int(offsets[m + 1])
            info = [f"Properties={':'.join(props)}"]
            if "energy_Ha" in arrays:
                e = float(arrays["energy_Ha"][m])
                info.append(f"energy={e * HARTREE_TO_EV!r} energy_Ha={e!r}")
            if "energy_std_Ha" in arrays:
                info.append(f"energy_std={float(arrays['energy_std_Ha'][m]) * HARTREE_TO_EV!r}")
            info.append(f"name={json.dumps(str(f.title))} source={json.dumps(str(f.source))} "
                        f'index={f.index} pbc="F F F"')
            coord = np.asarray(f.coord, dtype=np.float64)
            lines = [f"{b - a}\n", " ".join(info) + "\n"]
            for n in range(b - a):
                lines.append(row_fmt % (symbols[a + n], *coord[n], *values[a + n]))
            self.fh.write("".join(lines))
            self.count += 1


class NpzWriter(_Writer):
    binary = True

    def __init__(self, path, header):
        super().__init__(path, header)
        self.parts: dict[str, list] = {"numbers": [], "sizes": [], "name": [], "source": [],
                                       "index": []}

    def write(self, frames, numbers, offsets, arrays):
        self.parts["numbers"].append(numbers)
        self.parts["sizes"].append(np.diff(offsets))
        self.parts["name"].extend(str(f.title) for f in frames)
        self.parts["source"].extend(str(f.source) for f in frames)
        self.parts["index"].extend(f.index for f in frames)
        for k, v in arrays.items():
            self.parts.setdefault(k, []).append(v)
        self.count += len(frames)

    def _finish(self):
        out = {}
        for k, v in self.parts.items():
            if k in ("name", "source"):
                out[k] = np.array(v, dtype=str)
            elif k == "index":
                out[k] = np.array(v, dtype=np.int64)
            else:
                out[k] = np.concatenate(v) if v else np.zeros(0)
        sizes = out.pop("sizes")
        out["offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        out["units"] = np.array(json.dumps(self.header["units"]))
        np.savez(self.fh, **out)


def open_writer(path: str | os.PathLike | None, header: dict) -> _Writer:
    """The writer for ``path``'s suffix (JSON on standard output for None). ValueError for a
    suffix it does not know."""
    if path is None:
        return JsonWriter(None, header)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return NpzWriter(path, header)
    if suffix in (".extxyz", ".xyz"):
        return ExtxyzWriter(path, header)
    if suffix == ".json":
        return JsonWriter(path, header)
    raise ValueError(f"{path}: unknown output format {suffix or '(no suffix)'!r}; use one of "
                     f"{', '.join(SUFFIXES)}")
