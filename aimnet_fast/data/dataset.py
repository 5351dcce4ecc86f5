"""``PackedDataset``: all conformers of one or more sources as flat arrays, and its packed cache.

The first read of a list of sources streams them group by group / chunk by chunk into flat ``.npy``
files (``CACHE_DIR/<first file stem>[+<more files>]-<key>/``, key = hash of every file's path, size
and mtime and the normalized property maps and options); later runs memory-map them. Nothing in the
build holds more than one chunk of a file in memory, so data larger than the RAM can be packed. The
folder appears atomically (built under a temporary name, then renamed), so ranks that build the same
cache at once do not clash. Caches of files that changed are not deleted: clear CACHE_DIR by hand.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from ..errors import DataError
from .readers import SKIP_REASONS, iter_blocks, new_counts, new_label_counts, normalize_source

#: 2: the read-time checks (close atoms, label ranges) and their counters (``skipped_close_atoms``,
#: ``skipped_bad_label``, per label ``skipped``); caches of version 1 are rebuilt, not misread.
CACHE_VERSION = 2
_HEADER_BYTES = 128  # fixed .npy header length, rewritten with the final shape when the file closes


class _NpyWriter:
    """Append rows to a .npy file whose length is unknown until the end."""

    def __init__(self, path: Path):
        self.path, self.f, self.dtype, self.tail, self.rows = path, open(path, "wb"), None, None, 0
        self.f.write(b"\0" * _HEADER_BYTES)

    def append(self, arr: np.ndarray):
        if self.dtype is None:
            self.dtype, self.tail = arr.dtype, arr.shape[1:]
        if arr.dtype != self.dtype or arr.shape[1:] != self.tail:
            raise ValueError(f"{self.path.name}: got {arr.dtype}{arr.shape}, "
                             f"expected {self.dtype}(*, {self.tail})")
        self.f.write(np.ascontiguousarray(arr).tobytes())
        self.rows += arr.shape[0]

    def close(self, dtype=None, tail=()):
        if self.dtype is None:
            self.dtype, self.tail = np.dtype(dtype), tuple(tail)
        shape = (self.rows,) + tuple(self.tail)
        d = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": shape})
        head = d.encode("latin1")
        pad = _HEADER_BYTES - 10 - len(head) - 1
        if pad < 0:
            raise ValueError("npy header too long")
        self.f.seek(0)
        self.f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_BYTES - 10) + head
                     + b" " * pad + b"\n")
        self.f.close()


class _ListWriter:
    def __init__(self):
        self.parts, self.dtype, self.tail = [], None, None

    def append(self, arr):
        self.parts.append(np.array(arr))

    def close(self, dtype=None, tail=()):
        if not self.parts:
            return np.zeros((0,) + tuple(tail), dtype)
        return np.concatenate(self.parts)


class PackedDataset:
    """All conformers, flat (see the data API contract in ``aimnet_fast.data``).

    numbers (A,) int64; coord (A, 3) float32 Å; conf_offsets (C+1,) int64; labels name -> (C, ...)
    or (A, ...) with NaN where missing (energy float64 Ha, forces float32 Ha/Å true forces,
    charges float32 e, volumes float32 bohr³); group (C,) int64 molecule/formula id; source (C,)
    int16 index into ``sources``; n_atoms (C,) int64; n_conf (int).
    """

    def __init__(self, numbers, coord, conf_offsets, labels, group, source, sources, *,
                 label_per, group_names, h5group, h5group_names, conf_index, counts,
                 source_specs=None):
        self.numbers, self.coord, self.conf_offsets = numbers, coord, conf_offsets
        self.labels, self.group, self.source, self.sources = labels, group, source, list(sources)
        self.label_per = dict(label_per)          # name -> "atom" | "conformer"
        self.group_names = list(group_names)      # group id -> "file:molecule-or-formula"
        self.h5group, self.h5group_names = h5group, list(h5group_names)
        self.conf_index = conf_index              # (C,) conformer index inside its HDF5 group
        self.counts = counts                      # per source: read/used/skipped and label counts
        #: per source: the normalized source dict (layout, property keys and units), or None
        self.source_specs = list(source_specs) if source_specs is not None else [None] * len(self.sources)
        self.n_atoms = np.diff(np.asarray(conf_offsets)).astype(np.int64)

    @property
    def n_conf(self) -> int:
        return int(self.conf_offsets.shape[0] - 1)

    def __len__(self) -> int:
        return self.n_conf

    def name(self, c: int) -> str:
        """"file:group:conformer" of conformer ``c`` (the HDF5 group and index inside it)."""
        c = int(c)
        return (f"{self.sources[int(self.source[c])]}:{self.h5group_names[int(self.h5group[c])]}"
                f":{int(self.conf_index[c])}")

    def summary_dict(self) -> dict:
        """Totals over all sources: conformers read/used/skipped (per reason, ``skipped_*``) and,
        per label, conformers with the label (``used``), masked because NaN, all-zero or absent,
        skipped because of it (infinite or out of range), and atoms with the label.
        ``per_source``: the same counts for each source, with its ``path`` and ``layout``."""
        tot = {"sources": len(self.sources), "conformers": self.n_conf,
               "atoms": int(self.conf_offsets[-1]), "groups": len(self.group_names),
               **{k: 0 for k in SKIP_REASONS}, "labels": {}}
        per_source = []
        for si, c in enumerate(self.counts):
            spec = self.source_specs[si] if si < len(self.source_specs) else None
            one = {"path": self.sources[si], "layout": spec["layout"] if spec else None,
                   **{k: 0 for k in SKIP_REASONS}, "labels": {}}
            for k, v in c.items():
                if k == "labels":
                    for n, lc in v.items():
                        t = tot["labels"].setdefault(n, new_label_counts())
                        o = one["labels"].setdefault(n, new_label_counts())
                        for k2, v2 in lc.items():
                            t[k2] = t.get(k2, 0) + v2
                            o[k2] = o.get(k2, 0) + v2
                        if spec and n in spec["properties"]:
                            o["key"] = spec["properties"][n]["key"]
                            o["unit"] = spec["properties"][n]["unit"]
                elif isinstance(v, int):
                    tot[k] = tot.get(k, 0) + v
                    one[k] = v
            per_source.append(one)
        for t in tot["labels"].values():
            # conformers of sources that never declared the label count as absent
            t["absent"] += self.n_conf - sum(t[k] for k in ("used", "nan", "zero", "absent"))
        tot["per_source"] = per_source
        return tot

    def summary(self) -> str:
        """What was read, per source and per label: conformers read, used and skipped (by reason),
        and per label used, masked (NaN, all-zero, absent) and skipped. Several lines; the trainer
        prints it on rank 0 at start."""
        d = self.summary_dict()

        def skipped(c):
            n = sum(c.get(k, 0) for k in SKIP_REASONS)
            return f"skipped {n}" + (" (" + ", ".join(
                f"{c[k]} {what}" for k, what in SKIP_REASONS.items() if c.get(k, 0)) + ")" if n else "")

        lines = [f"data: {d['conformers']} conformers ({d['atoms']} atoms, {d['groups']} "
                 f"molecules/formulas) from {d['sources']} source(s); read "
                 f"{d.get('conformers_read', 0)}, {skipped(d)}"]
        for si, c in enumerate(d["per_source"]):
            lay = f" [{c['layout']}]" if c.get("layout") else ""
            lines.append(f"source {si}: {c['path']}{lay}: read {c.get('conformers_read', 0)} "
                         f"conformers in {c.get('h5_groups', 0)} groups, used "
                         f"{c.get('conformers_used', 0)}, {skipped(c)}")
            for n, t in c["labels"].items():
                atoms = f" ({t['atoms_used']} atoms)" if self.label_per.get(n) == "atom" else ""
                key = (f" ({t['key']!r}, {t['unit']})" if "key" in t
                       else " (not declared)" if c.get("layout") else "")
                bad = f"; skipped {t['skipped']} (infinite or out of range)" if t.get("skipped") else ""
                lines.append(f"  {n}{key}: used {t['used']} conformers{atoms}; masked: "
                             f"{t['nan']} NaN, {t['zero']} all-zero, {t['absent']} absent{bad}")
        if len(d["per_source"]) > 1:
            lines.append("all sources:")
            for n, t in d["labels"].items():
                atoms = f" ({t['atoms_used']} atoms)" if self.label_per.get(n) == "atom" else ""
                lines.append(f"  {n}: used {t['used']} conformers{atoms}; masked: {t['nan']} NaN, "
                             f"{t['zero']} all-zero, {t['absent']} absent; skipped {t.get('skipped', 0)}")
        return "\n".join(lines)

    def __repr__(self):
        return f"PackedDataset({self.summary()})"

    #: Set when the arrays are memory-mapped from one cache folder: pickling (e.g. to DataLoader
    #: workers started by spawn) then sends the folder, not a copy of the arrays.
    cache_folder: Path | None = None

    def __getstate__(self):
        if self.cache_folder is not None:
            return {"cache_folder": str(self.cache_folder)}
        return self.__dict__

    def __setstate__(self, state):
        if set(state) == {"cache_folder"}:
            state = _load_cached(Path(state["cache_folder"])).__dict__
        self.__dict__.update(state)


def _cache_key(srcs: list[dict]) -> str:
    stats = [(os.stat(s["path"]).st_size, os.stat(s["path"]).st_mtime_ns) for s in srcs]
    blob = json.dumps({"v": CACHE_VERSION, "src": srcs, "stat": stats}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_FIXED = {"numbers": (np.int64, ()), "coord": (np.float32, (3,)), "conf_offsets": (np.int64, ()),
          "group": (np.int64, ()), "h5group": (np.int32, ()), "conf_index": (np.int64, ()),
          "source": (np.int16, ())}


def _label_specs(srcs: list[dict]) -> dict:
    """Union of the labels of all sources: name -> (per or None, dtype, tail or None)."""
    spec = {}
    for s in srcs:
        for n, p in s["properties"].items():
            old = spec.get(n)
            new = (p["per"], p["dtype"], tuple(p["tail"]) if p["tail"] is not None else None)
            if old is None:
                spec[n] = new
            elif old[0] and new[0] and old[0] != new[0]:
                raise DataError(f"label {n!r} is per {old[0]} in one source and per {new[0]} in another")
            elif old[0] is None:
                spec[n] = (new[0], old[1], old[2] or new[2])
    if len(srcs) > 1:
        for n, (per, _, _) in spec.items():
            if per is None and not all(n in s["properties"] for s in srcs):
                raise DataError(f"label {n!r}: with several sources, say 'per': 'atom' or "
                                f"'conformer' (some sources lack it)")
    if len(srcs) > np.iinfo(np.int16).max:
        raise DataError("too many sources")
    return spec


def _build(srcs: list[dict], writer_factory) -> tuple[dict, dict]:
    """Stream normalized sources, one after the other, into writers; return (closed writers, meta).

    Labels a source lacks are written as NaN for its conformers (and counted absent).
    """
    spec = _label_specs(srcs)
    w = {k: writer_factory(k) for k in _FIXED}
    for n in spec:
        w["label_" + n] = writer_factory("label_" + n)
    group_names: list[str] = []
    h5names: list[str] = []
    all_counts = []
    w["conf_offsets"].append(np.zeros(1, np.int64))
    atoms = 0
    per = {n: v[0] for n, v in spec.items()}
    try:
        for si, src in enumerate(srcs):
            counts = new_counts(src)
            group_ids: dict[str, int] = {}
            last_h5 = None
            for b in iter_blocks(src, counts):
                n, na = b.numbers.shape
                w["numbers"].append(b.numbers.reshape(-1))
                w["coord"].append(b.coord.reshape(-1, 3))
                w["conf_offsets"].append(atoms + na * np.arange(1, n + 1, dtype=np.int64))
                atoms += n * na
                keys, inv = np.unique(b.split_key, return_inverse=True)
                ids = []
                for k in keys:
                    if str(k) not in group_ids:
                        group_ids[str(k)] = len(group_names)
                        group_names.append(f"{src['path']}:{k}")
                    ids.append(group_ids[str(k)])
                w["group"].append(np.asarray(ids, np.int64)[np.asarray(inv).reshape(-1)])
                if last_h5 != b.h5group:
                    h5names.append(b.h5group)
                    last_h5 = b.h5group
                w["h5group"].append(np.full(n, len(h5names) - 1, np.int32))
                w["conf_index"].append(b.conf_index)
                w["source"].append(np.full(n, si, np.int16))
                for name, (_, dtype, tail) in spec.items():
                    if name in b.labels:
                        v = b.labels[name]
                        per[name] = b.label_per[name]
                    else:
                        v = np.full((n, na) + (tail or ()) if per[name] == "atom" else (n,) + (tail or ()),
                                    np.nan, dtype)
                    if per[name] == "atom":
                        v = v.reshape((n * na,) + v.shape[2:])
                    w["label_" + name].append(v)
            for name in spec:
                if name not in src["properties"]:
                    counts["labels"][name] = {**new_label_counts(),
                                              "absent": counts["conformers_used"]}
            all_counts.append(counts)
    except BaseException:
        for x in w.values():
            if isinstance(x, _NpyWriter):
                x.f.close()
        raise
    out = {}
    for k, x in w.items():
        if k.startswith("label_"):
            _, dtype, tail = spec[k[6:]]
            out[k] = x.close(dtype, tail or ())
        else:
            out[k] = x.close(*_FIXED[k])
    meta = {"version": CACHE_VERSION, "sources": srcs, "counts": all_counts,
            "group_names": group_names, "h5group_names": h5names,
            "label_per": {n: per[n] or "conformer" for n in spec}}
    return out, meta


def _from_arrays(arr: dict, meta: dict) -> PackedDataset:
    labels = {k[6:]: v for k, v in arr.items() if k.startswith("label_")}
    return PackedDataset(arr["numbers"], arr["coord"], arr["conf_offsets"], labels, arr["group"],
                         arr["source"], [s["path"] for s in meta["sources"]],
                         label_per=meta["label_per"], group_names=meta["group_names"],
                         h5group=arr["h5group"], h5group_names=meta["h5group_names"],
                         conf_index=arr["conf_index"], counts=meta["counts"],
                         source_specs=meta["sources"])


def _load_cached(folder: Path) -> PackedDataset:
    meta = json.loads((folder / "meta.json").read_text())
    arr = {}
    for f in folder.glob("*.npy"):
        arr[f.stem] = np.load(f, mmap_mode="r")
    ds = _from_arrays(arr, meta)
    ds.cache_folder = folder
    return ds


def _load(srcs: list[dict], cache_dir=None) -> PackedDataset:
    srcs = [normalize_source(s) for s in srcs]
    if cache_dir is None:
        arr, meta = _build(srcs, lambda k: _ListWriter())
        return _from_arrays(arr, meta)
    cache_dir = Path(cache_dir)
    stem = Path(srcs[0]["path"]).stem + (f"+{len(srcs) - 1}" if len(srcs) > 1 else "")
    folder = cache_dir / f"{stem}-{_cache_key(srcs)}"
    if (folder / "meta.json").exists():
        return _load_cached(folder)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _, meta = _build(srcs, lambda k: _NpyWriter(tmp / f"{k}.npy"))
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, folder)  # atomic: ranks building the same cache at once do not clash
        except OSError:
            if not (folder / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_cached(folder)


def load_source(src: dict, cache_dir=None) -> PackedDataset:
    """One source (a dict as in ``readers``); with ``cache_dir`` build or reuse its packed cache."""
    return _load([src], cache_dir)


def load_dataset(sources, cache_dir=None) -> PackedDataset:
    """Read one or more sources (dicts, see ``aimnet_fast.data.readers``; a bare path means
    ``{"path": p, "layout": "auto"}``) into one PackedDataset.

    With ``cache_dir`` the sources are packed once, together, into one cache folder (keyed by every
    file's path, size and mtime and the property maps) and memory-mapped afterwards; without, they
    are read into memory (one copy).
    """
    if isinstance(sources, (str, os.PathLike, dict)):
        sources = [sources]
    srcs = [s if isinstance(s, dict) else {"path": os.fspath(s), "layout": "auto"} for s in sources]
    if not srcs:
        raise DataError("no sources given")
    return _load(srcs, cache_dir)


def default_dataset_path() -> Path:
    """The embedded default data set (ANI-1x release layout; keys gfn2.energy Ha, gfn2.forces Ha/Å
    true forces, gfn2.charges e). The file may be absent in a source checkout."""
    return Path(__file__).resolve().parent / "default.h5"


def default_sources() -> list[dict]:
    return [{"path": str(default_dataset_path()), "layout": "ani1x",
             "properties": {"energy": {"key": "gfn2.energy", "unit": "hartree"},
                            "forces": {"key": "gfn2.forces", "unit": "hartree/angstrom"},
                            "charges": {"key": "gfn2.charges", "unit": "e"}}}]
