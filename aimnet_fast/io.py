"""Reading and writing molecules as XYZ and extended XYZ (one or many frames per file).

A frame is::

    N
    comment line (plain XYZ) or key=value pairs with Properties=species:S:1:pos:R:3:... (extended)
    El  x  y  z        <- N atom lines; coordinates in Å

Every parse error is an ``InputError`` naming the file, the line number (1-based) and the frame
(0-based index and its comment). Checks on values (element supported by the model, finite
coordinates, overlapping atoms, empty molecule) are ``Batch.validate``'s, with batch names
``"FILE frame K (comment)"`` so that its errors name file and molecule too.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .batch import Batch, InputError
from .constants import ELEMENTS, PERIODIC_TABLE
from .units import element_number

#: A small bundled multi-frame XYZ file (see examples/README.md).
EXAMPLE_XYZ = Path(__file__).resolve().parent / "examples" / "molecules.xyz"

_KEY_VALUE = re.compile(r'^\s*[A-Za-z_][\w.-]*\s*=')


@dataclass
class Frame:
    """One molecule read from a file.

    ``numbers`` (N,) atomic numbers; ``coord`` (N, 3) float64 coordinates in Å; ``comment`` the
    frame's comment line (stripped); ``index`` the 0-based frame number in ``source``; ``line`` the
    1-based line number of its atom-count line; ``info`` the key=value pairs of an extended-XYZ
    comment (empty for plain XYZ).
    """
    numbers: list[int]
    coord: list[list[float]]
    comment: str = ""
    index: int = 0
    source: str = "<string>"
    line: int = 1
    info: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        """A short name for output: the extended-XYZ ``name=`` value, else the comment."""
        return str(self.info.get("name", self.comment))

    @property
    def label(self) -> str:
        """``"FILE frame K (comment)"``: how errors name this molecule."""
        return frame_label(self.source, self.index, self.comment)


def frame_label(source: str, index: int, comment: str) -> str:
    """``"FILE frame K (comment)"``, the comment shortened to 80 characters."""
    return f"{source} {frame_desc(index, comment)}"


def frame_desc(index: int, comment: str) -> str:
    c = comment.strip()
    if len(c) > 80:
        c = c[:77] + "..."
    return f"frame {index} ({c})" if c else f"frame {index}"


def _parse_properties(spec: str) -> list[tuple[str, str, int]]:
    """``species:S:1:pos:R:3`` -> [(name, type, columns), ...]; raises ValueError if malformed."""
    parts = spec.split(":")
    if len(parts) % 3 or not parts[0]:
        raise ValueError(f"Properties={spec!r} is not a list of name:type:columns triples")
    out = []
    for k in range(0, len(parts), 3):
        name, typ, cols = parts[k], parts[k + 1].upper(), parts[k + 2]
        if typ not in ("S", "R", "I", "L") or not cols.isdigit() or int(cols) < 1:
            raise ValueError(f"Properties={spec!r}: bad entry {':'.join(parts[k:k + 3])!r}")
        out.append((name, typ, int(cols)))
    return out


def _parse_comment(comment: str) -> dict | None:
    """Key=value pairs of an extended-XYZ comment line, or None for a plain comment."""
    if "properties=" not in comment.lower() or not _KEY_VALUE.match(comment):
        return None
    try:
        tokens = shlex.split(comment, posix=True)
    except ValueError:
        return None
    info: dict = {}
    for tok in tokens:
        if "=" not in tok:
            info[tok] = True  # a bare key is a flag in extended XYZ
            continue
        key, value = tok.split("=", 1)
        info[key] = value
    return info


def _is_periodic(info: dict) -> bool:
    pbc = next((v for k, v in info.items() if k.lower() == "pbc"), None)
    if pbc is None:  # extended XYZ: a lattice without pbc means periodic in all directions
        return any(k.lower() == "lattice" for k in info)
    return any(t.upper() in ("T", "TRUE", "1") for t in str(pbc).split())


def _float(tok: str) -> float:
    try:
        return float(tok)
    except ValueError:
        # Fortran-style exponents (1.0D-3) appear in XYZ files written by quantum-chemistry codes.
        return float(tok.replace("D", "E").replace("d", "e"))


def parse_xyz(text: str, source: str = "<string>") -> list[Frame]:
    """Parse the frames of an XYZ or extended-XYZ text (see the module docstring).

    Blank lines between frames and at the end are allowed. Raises InputError naming ``source``,
    the line and the frame for: a missing or non-integer atom count, a truncated frame, an atom
    line with the wrong number of fields, a non-numeric coordinate, an unknown element symbol,
    an atom count that does not match the atom lines, a malformed Properties= header.
    """
    lines = text.splitlines()
    frames: list[Frame] = []
    # Symbol → atomic number, as element_number gives it (None: unknown), filled as symbols come:
    # files repeat a handful of symbols, and the lookup was a fifth of the parse.
    numbers_of: dict[str, int | None] = {}
    n_lines = len(lines)
    pos = 0
    while True:
        while pos < n_lines and not lines[pos].strip():
            pos += 1
        if pos >= n_lines:
            break
        index = len(frames)
        count_line = pos + 1
        head = lines[pos].split()
        if len(head) != 1 or not head[0].lstrip("+").isdigit():
            hint = ""
            if frames:
                prev = frames[-1]
                hint = (f"; does the atom count {len(prev.numbers)} of "
                        f"{frame_desc(prev.index, prev.comment)} (line {prev.line}) match its "
                        f"atom lines?")
            raise InputError(f"{source} line {count_line}: expected the atom count of frame "
                             f"{index}, found {lines[pos].strip()!r}{hint}")
        n_atoms = int(head[0])
        if pos + 1 >= n_lines:
            raise InputError(f"{source} line {count_line}, frame {index}: truncated file: the "
                             f"comment line and {n_atoms} atom lines are missing")
        comment = lines[pos + 1].strip()
        desc = frame_desc(index, comment)

        def error(line: int, msg: str, desc: str = desc) -> InputError:
            return InputError(f"{source} line {line}, {desc}: {msg}")

        if n_atoms == 0:
            raise error(count_line, "empty molecule (atom count 0)")
        info = _parse_comment(comment)
        if info is not None and _is_periodic(info):
            raise error(count_line + 1, "periodic boundary conditions (pbc/Lattice) are not "
                        "supported; AIMNet is a molecular model: write the frame with "
                        "pbc=\"F F F\" or as plain XYZ")
        # Columns of the element symbol and of x, y, z, and how many fields an atom line has.
        species_col, pos_col, n_fields = 0, 1, 4
        if info is not None:
            props_key = next(k for k in info if k.lower() == "properties")
            try:
                props = _parse_properties(str(info[props_key]))
            except ValueError as e:
                raise error(count_line + 1, str(e)) from None
            col, species_col, pos_col = 0, None, None
            for name, typ, cols in props:
                if name.lower() == "species" and typ == "S" and cols == 1:
                    species_col = col
                elif name.lower() == "pos" and typ == "R" and cols == 3:
                    pos_col = col
                col += cols
            if species_col is None or pos_col is None:
                raise error(count_line + 1, f"Properties= must contain species:S:1 and pos:R:3, "
                            f"found {info[props_key]!r}")
            n_fields = col
        numbers: list[int] = []
        coord: list[list[float]] = []
        for a in range(n_atoms):
            ln = pos + 2 + a
            if ln >= n_lines:
                raise error(ln + 1, f"truncated file: the atom count (line {count_line}) "
                            f"announces {n_atoms} atoms, the file ends after {a}")
            fields = lines[ln].split()
            if len(fields) == 1 and fields[0].isdigit():
                raise error(ln + 1, f"found {fields[0]!r} where atom {a} was expected: the atom "
                            f"count (line {count_line}) announces {n_atoms} atoms but only {a} "
                            f"atom lines follow")
            if not fields:
                raise error(ln + 1, f"blank line where atom {a} of {n_atoms} was expected (does "
                            f"the atom count on line {count_line} match?)")
            if len(fields) != n_fields:
                expect = ("element x y z" if info is None
                          else f"{n_fields} fields per Properties=")
                raise error(ln + 1, f"atom line has {len(fields)} fields, expected {n_fields} "
                            f"({expect}): {lines[ln].strip()!r}")
            sym = fields[species_col]
            z = numbers_of.get(sym, -1)
            if z == -1:
                z = numbers_of[sym] = element_number(sym)
            if z is None:
                raise error(ln + 1, f"unknown element {sym!r} (atom {a})")
            try:
                xyz = [_float(fields[pos_col]), _float(fields[pos_col + 1]),
                       _float(fields[pos_col + 2])]
            except ValueError:
                raise error(ln + 1, f"non-numeric coordinate in "
                            f"{' '.join(fields[pos_col:pos_col + 3])!r} (atom {a})") from None
            numbers.append(z)
            coord.append(xyz)
        frames.append(Frame(numbers, coord, comment, index, source, count_line, info or {}))
        pos += 2 + n_atoms
    return frames


def read_xyz(path: str | os.PathLike) -> list[Frame]:
    """Read every frame of an XYZ or extended-XYZ file (see ``parse_xyz``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected an XYZ file") from None
    frames = parse_xyz(text, str(path))
    if not frames:
        raise InputError(f"{path}: no molecule in the file")
    return frames


def frames_to_batch(frames: Sequence[Frame], dtype=torch.float32, validate: bool = True,
                    elements: Sequence[int] = ELEMENTS) -> Batch:
    """A ``Batch`` of ``frames`` named ``"FILE frame K (comment)"``; ``validate`` runs
    ``Batch.validate(elements)``, which raises InputError for an unsupported element, non-finite
    coordinates or overlapping atoms, naming the frame."""
    batch = Batch.from_molecules([(f.numbers, f.coord) for f in frames],
                                 names=[f.label for f in frames], dtype=dtype)
    if validate:
        batch.validate(elements)
    return batch


def chunk_frames(frames: Sequence[Frame], batch_atoms: int) -> Iterator[list[Frame]]:
    """Consecutive groups of frames with at most ``batch_atoms`` atoms each (a molecule larger
    than the budget forms a group of its own)."""
    if batch_atoms < 1:
        raise ValueError(f"batch_atoms must be positive, got {batch_atoms}")
    group: list[Frame] = []
    n = 0
    for f in frames:
        if group and n + len(f.numbers) > batch_atoms:
            yield group
            group, n = [], 0
        group.append(f)
        n += len(f.numbers)
    if group:
        yield group


def format_xyz(numbers: Sequence[int], coord_A, comment: str = "") -> str:
    """One plain-XYZ frame (coordinates in Å, 10 decimals) as text ending in a newline."""
    if "\n" in comment:
        raise ValueError("an XYZ comment must be a single line")
    coord = torch.as_tensor(coord_A, dtype=torch.float64).reshape(-1, 3).tolist()
    rows = [f"{len(numbers)}", comment]
    for z, (x, y, w) in zip(numbers, coord):
        rows.append(f"{PERIODIC_TABLE[int(z)]:<2s} {x:16.10f} {y:16.10f} {w:16.10f}")
    return "\n".join(rows) + "\n"


def write_xyz(path: str | os.PathLike, molecules: Iterable[tuple],
              comments: Iterable[str] | None = None) -> None:
    """Write ``(numbers, coord_A)`` molecules as a multi-frame plain-XYZ file."""
    molecules = list(molecules)
    comments = list(comments) if comments is not None else [""] * len(molecules)
    text = "".join(format_xyz(n, c, t) for (n, c), t in zip(molecules, comments))
    Path(path).write_text(text)
