"""The test report of a model on labelled data: MAE and RMSE per target, per pass and per source.

Command line::

    python -m aimnet_fast.evaluate MODEL DATA [--layout auto|ani1x|ani1|06r|ani2x|aimnet2|spice]
        [--forces | --no-forces] [--device cpu|cuda|auto] [--backend auto|torch|cpu|triton]
        [--dtype float32|float64] [--mols-per-batch N] [--n-pass T] [--cache-dir DIR]
        [--out test_metrics.json]

MODEL is an aimnet_fast checkpoint (a converted released model, or a training run's ``last.pt`` /
``best.pt``). DATA is an HDF5 file read with ``--layout`` (default ``auto``), or a YAML file with
the sources to read, in the form of the training configuration's ``data.sources``: a list of
sources, a mapping with a ``sources:`` key (any other key of ``data``, such as ``cache_dir``, may
sit beside it), or a whole training configuration (its ``data.test_sources`` where it has them,
else its ``data.val_sources``, else its ``data.sources``, which may be the embedded default data
set). A relative source path is taken
from the working directory, or, where no such file is there, from the YAML file's folder; sources
whose layout is ``auto`` take ``--layout``. The report is printed (``format_report``) and, with
``--out``, written as JSON (``write_report``).

In Python::

    report = evaluate(model, ds, indices)      # ds: aimnet_fast.data.PackedDataset
    print(format_report(report)); write_report(report, "test_metrics.json")

Errors are reported in user units (``aimnet_fast.units.REPORT_UNITS``): energies in kcal/mol per
molecule (the total energy of a conformer, not per atom, as the training metrics), forces in
kcal/mol/Å per Cartesian component (−dE/dR of the last pass only), charges in e and volumes in Å³
(the model's bohr³ converted), per atom. A label that is absent (NaN, an all-zero row the reader marks as
missing, or a label the source does not have: ``Batch.masks``) is not counted. Sums are float64.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import data as D
from . import ops
from .checkpoint import write_atomic
from .errors import AIMNetError, ConfigError, DataError, PredictError, report as report_error
from .train.loss import TARGET_HEAD, predicted_forces, residuals
from .units import REPORT_UNITS

__all__ = ["evaluate", "available_targets", "format_report", "write_report", "read_sources",
           "main"]

#: The targets a report can hold, in report order.
TARGETS = ("energy", "charges", "volumes", "forces")


def _module(model):
    """The model itself where it is wrapped (DistributedDataParallel keeps it as ``.module``)."""
    return getattr(model, "module", model)


def available_targets(model, ds, forces: Optional[bool] = None) -> list[str]:
    """Targets of ``TARGETS`` that both the model's heads and the data's labels have (forces: the
    energy head and a ``forces`` label, unless ``forces`` is False)."""
    heads = set(_module(model).heads.keys())
    labels = set(ds.labels.keys())
    out = [t for t in ("energy", "charges", "volumes") if TARGET_HEAD[t] in heads and t in labels]
    if forces is not False and "energy" in heads and "forces" in labels:
        out.append("forces")
    return out


def _choose_targets(model, ds, targets, forces) -> list[str]:
    avail = available_targets(model, ds, forces)
    if targets is None:
        chosen = list(avail)
        if forces and "forces" not in chosen:
            raise PredictError("forces asked for, but the model has no energy head or the data no "
                               "forces label")
        return chosen
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise PredictError(f"unknown target(s) {unknown}; known: {list(TARGETS)}")
    missing = [t for t in targets if t not in avail]
    if missing:
        raise PredictError(f"target(s) {missing} cannot be evaluated: the model's heads are "
                           f"{list(_module(model).heads.keys())}, the data's labels "
                           f"{sorted(ds.labels.keys())}")
    chosen = [t for t in TARGETS if t in targets]
    if forces and "forces" not in chosen:
        chosen.append("forces")
    return chosen


def _source_names(paths: Sequence[str]) -> list[str]:
    """One key per source: its path, with ``#k`` added where the same path comes again."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        k = seen.get(p, 0)
        seen[p] = k + 1
        names.append(p if k == 0 else f"{p}#{k + 1}")
    return names


def _stats(s: list[float], pos: int, P: int, tags: list[str]) -> tuple[dict, int]:
    """{tag: {"mae", "rmse", "n"}} from the sums at ``pos`` (|e| sums of P passes, e² sums, count)."""
    n = s[pos + 2 * P]
    out = {}
    for p, tag in enumerate(tags):
        mae = s[pos + p] / n if n > 0 else None
        rmse = math.sqrt(s[pos + P + p] / n) if n > 0 else None
        out[tag] = {"mae": mae if mae is None or math.isfinite(mae) else None,
                    "rmse": rmse if rmse is None or math.isfinite(rmse) else None,
                    "n": int(n)}
    return out, pos + 2 * P + 1


def evaluate(model, ds, indices=None, *, targets: Optional[Sequence[str]] = None,
             n_pass: Optional[int] = None, forces: Optional[bool] = None,
             device=None, dtype: Optional[torch.dtype] = None, mols_per_batch: int = 64,
             dist=None, name: Optional[str] = None) -> dict:
    """MAE and RMSE of ``model`` on the conformers ``indices`` of ``ds``, per target, pass and
    source, in user units.

    model: an ``aimnet_fast.model.AIMNet`` (or a wrapper with ``.module``), already on ``device``
        with its parameters in ``dtype``; it is run in eval mode (its mode is restored after).
    ds: ``aimnet_fast.data.PackedDataset``; indices: conformer indices (default: all of ``ds``).
    targets: some of energy, charges, volumes, forces (default: those the model's heads and the
        data's labels both have). forces: None: evaluate forces where possible; False: never;
        True: required. Forces are −dE/dR (Hartree/Å internally) of the last pass, by autograd.
    n_pass: passes T (default: the model's ``n_pass``); every pass's outputs are scored.
    device, dtype: where batches go and the dtype of their coordinates (default: the model's).
    mols_per_batch: conformers per batch.
    dist: an ``aimnet_fast.train.dist.Dist``; where active, each rank evaluates
        ``indices[rank::world_size]`` and the sums are all-reduced, so every rank returns the
        report of all ``indices`` (call it on every rank).
    name: what ``report["model"]`` says (e.g. the checkpoint's path).

    Returns a JSON-able dict::

        {"model": name, "n_pass": T, "targets": [...], "units": {target: unit},
         "conformers": {"all": C, "sources": {source: C_s}},
         "all": {target: {"p1": {"mae", "rmse", "n"}, ..., f"p{T}": ...}},
         "sources": {source: {target: ...}}}

    ``n`` counts present labels: molecules for energy, atoms for charges and volumes, Cartesian
    components (3 per atom) for forces; forces have only ``"last"``. Sources are keyed by their
    path (``#2``, ... where a path comes again) and listed when some of their conformers were
    evaluated; a target without labels there has n = 0 and ``mae``/``rmse`` None (also where
    the errors are not finite).
    """
    m = _module(model)
    T = int(m.n_pass if n_pass is None else n_pass)
    if T < 1:
        raise PredictError(f"n_pass must be ≥ 1, got {T}")
    if mols_per_batch < 1:
        raise PredictError(f"mols_per_batch must be ≥ 1, got {mols_per_batch}")
    chosen = _choose_targets(model, ds, targets, forces)
    param = next(m.parameters(), None)
    device = torch.device(device) if device is not None else (
        param.device if param is not None else torch.device("cpu"))
    if dtype is None:
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    idx = np.arange(ds.n_conf, dtype=np.int64) if indices is None else \
        np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= ds.n_conf):
        raise PredictError(f"conformer indices out of range 0..{ds.n_conf - 1}")
    active = dist is not None and dist.active
    if active:
        idx = idx[dist.rank::dist.world_size]

    passes = {t: (1 if t == "forces" else T) for t in chosen}
    width = sum(2 * passes[t] + 1 for t in chosen) + 1      # + conformers
    S = len(ds.sources)
    sums = torch.zeros(S, width, dtype=torch.float64, device=device)
    source_of = np.asarray(ds.source)
    need_forces = "forces" in chosen

    was_training = m.training
    m.eval()
    try:
        for start in range(0, idx.size, mols_per_batch):
            part = idx[start:start + mols_per_batch]
            batch = D.collate(ds, part).to(device, dtype)
            src_mol = torch.as_tensor(source_of[part].astype(np.int64), device=device)
            src_atom = src_mol.repeat_interleave(batch.mol_sizes)
            coord = batch.coord
            # first_order: forces by one backward, never differentiated again (the cpu backend's
            # native kernels and first-order MLPs, as for the predict command)
            with torch.set_grad_enabled(need_forces), ops.first_order():
                if need_forces:
                    coord = coord.detach().requires_grad_(True)
                out = m(batch.numbers, coord, batch.mol_idx, batch.n_mol, n_pass=T)
                f = predicted_forces(out, coord, create_graph=False) if need_forces else None
            with torch.no_grad():
                res = residuals(out, batch, chosen, f.detach() if f is not None else None)
                pos = 0
                for t in chosen:
                    P = passes[t]
                    r, mask = res[t]
                    grp = src_mol if t == "energy" else (
                        src_atom.repeat_interleave(3) if t == "forces" else src_atom)
                    r = r.detach().to(torch.float64)
                    u = torch.where(mask, r, torch.zeros((), dtype=r.dtype, device=r.device))
                    u = u * REPORT_UNITS[t][1]
                    sums[:, pos:pos + P].index_add_(0, grp, u.abs().T)
                    sums[:, pos + P:pos + 2 * P].index_add_(0, grp, (u * u).T)
                    sums[:, pos + 2 * P].index_add_(0, grp, mask.to(torch.float64))
                    pos += 2 * P + 1
                sums[:, pos].index_add_(0, src_mol, torch.ones_like(src_mol, dtype=torch.float64))
    finally:
        m.train(was_training)
    if active:
        sums = dist.all_reduce_sum(sums)

    def block(s: list[float]) -> dict:
        out, pos = {}, 0
        for t in chosen:
            tags = ["last"] if t == "forces" else [f"p{p + 1}" for p in range(T)]
            out[t], pos = _stats(s, pos, passes[t], tags)
        return out

    rows = sums.cpu().tolist()
    total = sums.sum(dim=0).cpu().tolist()
    names = _source_names([str(p) for p in ds.sources])
    per_source = {names[k]: block(rows[k]) for k in range(S) if rows[k][-1] > 0}
    return {
        "model": name, "n_pass": T, "targets": list(chosen),
        "units": {t: REPORT_UNITS[t][0] for t in chosen},
        "conformers": {"all": int(total[-1]),
                       "sources": {names[k]: int(rows[k][-1]) for k in range(S) if rows[k][-1] > 0}},
        "all": block(total), "sources": per_source,
    }


# -- the report as text and as a file --------------------------------------------------------------
def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


def format_report(report: dict) -> str:
    """The report as a table: one row per source and target (then the totals, ``all``), columns
    n (present labels) and MAE / RMSE of every pass; forces (the last pass's) in the last pass's
    columns."""
    T = int(report["n_pass"])
    targets = list(report.get("targets") or report["all"].keys())
    units = report.get("units", {})
    cols = [f"p{p + 1}" for p in range(T)]
    head = ["", "target", "unit", "n"] + [f"{c} {k}" for c in cols for k in ("MAE", "RMSE")]

    def rows_of(label: str, block: dict) -> list[list[str]]:
        rows = []
        for t in targets:
            if t not in block:
                continue
            st = block[t]
            cells = []
            for p, c in enumerate(cols):
                v = st.get(c) or (st.get("last") if p == T - 1 else None)
                cells += [_fmt(v["mae"]), _fmt(v["rmse"])] if v else ["", ""]
            n = next(iter(st.values()))["n"] if st else 0
            rows.append([label, t, units.get(t, ""), str(n)] + cells)
            label = ""
        return rows

    body: list[list[str]] = []
    srcs = report.get("sources", {})
    conf = report.get("conformers", {})
    for s, block in srcs.items():
        n = conf.get("sources", {}).get(s)
        body += rows_of(f"{s}" + (f" ({n} conformers)" if n is not None else ""), block)
    n_all = conf.get("all")
    totals = rows_of("all" + (f" ({n_all} conformers)" if n_all is not None else ""), report["all"])
    widths = [max(len(r[k]) for r in [head] + body + totals) for k in range(len(head))]

    def line(r):
        return "  ".join(c.ljust(w) if k < 3 else c.rjust(w)
                         for k, (c, w) in enumerate(zip(r, widths))).rstrip()
    rule = "-" * len(line(head))
    model = report.get("model")
    title = (f"test report{' of ' + str(model) if model else ''}: T = {T} pass(es), MAE and RMSE; "
             f"energy per molecule, forces of the last pass")
    out = [title, line(head), rule] + [line(r) for r in body]
    if body:
        out.append(rule)
    out += [line(r) for r in totals]
    return "\n".join(out)


def write_report(report: dict, path) -> None:
    """Write the report as JSON to ``path`` atomically (``checkpoint.write_atomic``)."""
    write_atomic(path, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())


# -- data from the command line --------------------------------------------------------------------
_YAML_SUFFIXES = (".yaml", ".yml")


def _check_layout(layout: str) -> None:
    if layout != "auto" and layout not in D.LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: unknown layout; choose one of "
                          f"{', '.join(['auto', *D.LAYOUTS])}")


def _resolve_paths(sources: list[dict], base: Path) -> list[dict]:
    """Relative paths: from the working directory, else from ``base`` where the file is there."""
    out = []
    for s in sources:
        s = dict(s)
        p = s.get("path")
        if isinstance(p, (str, os.PathLike)) and not os.path.isabs(p) and not os.path.exists(p) \
                and (base / p).exists():
            s["path"] = str(base / p)
        out.append(s)
    return out


def _validated(data: dict, path) -> tuple[list[dict], Optional[str]]:
    """Sources (dicts for ``load_dataset``) and cache_dir of a ``data`` mapping, checked against
    the training configuration's schema where OmegaConf is installed."""
    from .train import config as C
    srcs = data.get("sources")
    if not isinstance(srcs, list):
        raise ConfigError(f"{path}: sources: expected a list of sources")
    # A bare path stands for {path: ...}.
    data = {**data, "sources": [{"path": s} if isinstance(s, str) else s for s in srcs]}
    if C.OmegaConf is None:   # no schema check: the readers check what they use
        return list(data["sources"]), data.get("cache_dir")
    cfg = C.OmegaConf.structured(C.DataConfig)
    try:
        for k, v in data.items():
            C._set(cfg, str(k), v)
        obj = C.OmegaConf.to_object(cfg)
    except C.OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {C._config_error(e, '')}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return C.source_dicts(obj), obj.cache_dir


def read_sources(path, layout: str = "auto") -> tuple[list[dict], Optional[str], str]:
    """The sources DATA names (see the module docstring): ``([source dict, ...], cache_dir or None,
    what)``, with the cache folder where the YAML gives one and ``what`` saying which sources
    these are (e.g. ``data.test_sources of run/config.yaml``)."""
    path = Path(path)
    _check_layout(layout)
    if not path.exists():
        raise DataError("file not found", path)
    if path.suffix.lower() not in _YAML_SUFFIXES:
        return [{"path": str(path), "layout": layout}], None, str(path)
    import yaml
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the YAML: {' '.join(str(e).split())}") from None
    shapes = ("expected a list of sources, a mapping with 'sources:', or a training configuration "
              "with 'data:'")
    what = f"the sources of {path}"
    if isinstance(values, list):
        sources, cache_dir = _validated({"sources": values}, path)
    elif isinstance(values, dict) and "sources" in values:
        sources, cache_dir = _validated(values, path)
    elif isinstance(values, dict) and "data" in values:
        from .train import config as C
        try:
            cfg = C.load_config(path)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
        # the held-out sources where the run had them, else all its data
        which = next((w for w in ("test_sources", "val_sources")
                      if getattr(cfg.data, w, None)), "sources")
        if which == "sources":
            sources = C.source_dicts(cfg.data)
        else:
            sources = [s.as_dict() if isinstance(s, C.SourceConfig) else dict(s)
                       for s in getattr(cfg.data, which)]
        cache_dir = cfg.data.cache_dir
        what = f"data.{which} of {path}" + (" (the embedded default data set)"
                                            if which == "sources" and cfg.data.sources is None else "")
    else:
        got = "nothing" if values is None else f"a {type(values).__name__}"
        raise ConfigError(f"{path}: {shapes}; got {got}")
    if not sources:
        raise ConfigError(f"{path}: no sources")
    sources = _resolve_paths(sources, path.parent)
    for s in sources:
        if s.get("layout", "auto") in (None, "auto"):
            s["layout"] = layout
    return sources, cache_dir, what


# -- command line ----------------------------------------------------------------------------------
def build_parser(prog: str = "python -m aimnet_fast.evaluate") -> argparse.ArgumentParser:
    from . import ops
    p = argparse.ArgumentParser(
        prog=prog, description="MAE and RMSE of a model on labelled data, per target, pass and "
        "source: energies in kcal/mol per molecule, forces kcal/mol/Å, charges e, volumes "
        f"{REPORT_UNITS['volumes'][0]}.")
    p.add_argument("model", help="aimnet_fast checkpoint (converted, or a run's last.pt/best.pt)")
    p.add_argument("data", help="HDF5 file, or a YAML file with sources (list, 'sources:' or a "
                   "training config)")
    p.add_argument("--layout", default="auto",
                   help=f"layout of the HDF5 file (or of YAML sources that say auto): auto, "
                   f"{', '.join(D.LAYOUTS)} (default auto)")
    p.add_argument("--forces", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate forces (default: where the data has them)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:K or auto (default cpu)")
    p.add_argument("--backend", choices=ops.BACKENDS, default="auto")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--mols-per-batch", type=int, default=64, help="conformers per batch (64)")
    p.add_argument("--n-pass", type=int, default=None, help="passes T (default: the model's)")
    p.add_argument("--cache-dir", default=None, help="pack the data here (memory-mapped, reused)")
    p.add_argument("--out", "-o", default=None, help="also write the report as JSON here")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m aimnet_fast.evaluate") -> int:
    args = build_parser(prog).parse_args(argv)
    for flag, v in (("--mols-per-batch", args.mols_per_batch), ("--n-pass", args.n_pass)):
        if v is not None and v < 1:
            print(f"{prog}: error: {flag} must be ≥ 1", file=sys.stderr)
            return 2
    if args.out:    # fail before the work, not after it
        out_dir = Path(args.out).resolve().parent
        while not out_dir.exists() and out_dir != out_dir.parent:
            out_dir = out_dir.parent      # write_report makes the missing folders
        if Path(args.out).is_dir() or not (out_dir.is_dir() and os.access(out_dir, os.W_OK)):
            print(f"{prog}: error: --out {args.out}: not a file in a writable folder",
                  file=sys.stderr)
            return 1
    from .cpu import flush_denormals, tune_allocator
    from .predict import load_models
    try:
        _check_layout(args.layout)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.device(device).type == "cpu":
            tune_allocator()
            flush_denormals()
        sources, cache_dir, what = read_sources(args.data, args.layout)
        if Path(args.data).suffix.lower() in _YAML_SUFFIXES:
            print(f"evaluating {what}", file=sys.stderr)
        model = load_models([args.model], device, args.backend)[0]
        dtype = torch.float64 if args.dtype == "float64" else torch.float32
        model = model.to(dtype)
        ds = D.load_dataset(sources, cache_dir=args.cache_dir or cache_dir)
        rep = evaluate(model, ds, forces=args.forces, n_pass=args.n_pass, device=device,
                       dtype=dtype, mols_per_batch=args.mols_per_batch, name=str(args.model))
    except AIMNetError as e:
        return report_error(prog, e)
    except RuntimeError as e:   # e.g. a device string torch does not know
        if "device" not in str(e).lower():
            raise
        print(f"{prog}: error: --device {args.device}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_report(rep))
    if args.out:
        try:
            write_report(rep, args.out)
        except OSError as e:
            print(f"{prog}: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
