"""Predict energies, forces, charges, volumes and electric moments of molecules.

Command line::

    python -m aimnet_fast.predict MODEL INPUT [--out OUT.json] [--forces]
        [--ensemble MODEL2 ...] [--backend auto|torch|triton] [--device cpu|cuda]
        [--batch-atoms 20000]

MODEL is an aimnet_fast checkpoint (``python -m aimnet_fast.convert`` makes one from the released
files), INPUT an XYZ or extended-XYZ file with one or many molecules. The Python API under it,
``predict(models, batch, forces)`` and ``predict_frames(models, frames, ...)``, is shared with the
ASE calculator.

Per molecule, the results hold only what the models have heads for (the SMD model has an energy
head only): ``energy_Ha``, ``forces_Ha_per_A`` (−dE/dR, when asked), ``charges_e``,
``elmoments`` ([charge (e), |dipole|, |quadrupole|, |octupole|], atomic units: e·bohr^k),
``volumes_bohr3``. With several models, values are means over the models, and ``energy_std_Ha`` /
``forces_std_Ha_per_A`` are their standard deviations (sample, ddof = 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from .batch import Batch
from .checkpoint import load_model
from .cpu import tune_allocator
from .errors import AIMNetError, PredictError, report
from .io import Frame, chunk_frames, frames_to_batch, read_xyz
from . import ops
from .model import AIMNet
from .units import OUTPUT_UNITS

DEFAULT_BATCH_ATOMS = 20000

UNITS = OUTPUT_UNITS


def _as_models(models) -> list[AIMNet]:
    if isinstance(models, torch.nn.Module):
        return [models]
    models = list(models)
    if not models:
        raise PredictError("no model given")
    return models


def check_ensemble(models: Sequence[AIMNet]) -> tuple[str, ...]:
    """The heads every model of the ensemble has; raise PredictError if they differ (averaging a
    solvent (SMD) energy with a gas-phase energy would be meaningless)."""
    heads = tuple(models[0].heads.keys())
    for k, m in enumerate(models[1:], 1):
        if set(m.heads.keys()) != set(heads):
            raise PredictError(f"ensemble member {k} has heads {sorted(m.heads.keys())}, member 0 "
                               f"has {sorted(heads)}: models of an ensemble must predict the same "
                               f"properties")
    return heads


def common_elements(models: Sequence[AIMNet]) -> tuple[int, ...]:
    known = set(models[0].elements)
    for m in models[1:]:
        known &= set(m.elements)
    return tuple(z for z in models[0].elements if z in known)


def _run_model(model: AIMNet, batch: Batch, forces: bool) -> dict[str, torch.Tensor]:
    """One model on one batch → flat float64 CPU tensors: energy (M,), forces (N,3), charges (N,),
    elmoments (N,4), volumes (N,), for the heads the model has."""
    p = next(model.parameters())
    numbers = batch.numbers.to(p.device)
    mol_idx = batch.mol_idx.to(p.device)
    coord = batch.coord.detach().to(device=p.device, dtype=p.dtype)
    if forces:
        if "energy" not in model.heads:
            raise PredictError("forces asked of a model without an energy head")
        coord.requires_grad_(True)
    with torch.set_grad_enabled(forces):
        out = model(numbers, coord, mol_idx, batch.n_mol, all_passes=False)
        res = {}
        if forces:
            (grad,) = torch.autograd.grad(out["energy"].sum(), coord)
            res["forces"] = -grad
    for key in ("energy", "charges", "elmoments", "volumes"):
        if key in out:
            res[key] = out[key]
    return {k: v.detach().to("cpu", torch.float64) for k, v in res.items()}


def predict(models, batch: Batch, forces: bool = False, validate: bool = True) -> list[dict]:
    """Run one model or an ensemble on a batch.

    ``models``: an AIMNet or a sequence of them (same heads). ``batch``: coordinates in Å.
    ``validate`` checks the batch first (``Batch.validate`` on the elements all models know).
    Returns one dict per molecule with ``numbers`` and, for the heads the models have:
    ``energy_Ha`` (float), ``forces_Ha_per_A`` (N×3 list, if ``forces``), ``charges_e`` (N),
    ``elmoments`` (N×4), ``volumes_bohr3`` (N); with two or more models the values are ensemble
    means and ``energy_std_Ha`` / ``forces_std_Ha_per_A`` the sample standard deviations.
    """
    models = _as_models(models)
    check_ensemble(models)
    if validate:
        batch.validate(common_elements(models))
    runs = [_run_model(m, batch, forces) for m in models]
    stacked = {k: torch.stack([r[k] for r in runs]) for k in runs[0]}
    mean = {k: v.mean(0) for k, v in stacked.items()}
    std = {k: v.std(0, correction=1) for k, v in stacked.items()
           if k in ("energy", "forces")} if len(models) > 1 else {}
    results = []
    offsets = batch.offsets.tolist()
    for m in range(batch.n_mol):
        a, b = offsets[m], offsets[m + 1]
        r: dict = {"numbers": batch.numbers[a:b].tolist()}
        if "energy" in mean:
            r["energy_Ha"] = float(mean["energy"][m])
            if "energy" in std:
                r["energy_std_Ha"] = float(std["energy"][m])
        if "forces" in mean:
            r["forces_Ha_per_A"] = mean["forces"][a:b].tolist()
            if "forces" in std:
                r["forces_std_Ha_per_A"] = std["forces"][a:b].tolist()
        if "charges" in mean:
            r["charges_e"] = mean["charges"][a:b].tolist()
        if "elmoments" in mean:
            r["elmoments"] = mean["elmoments"][a:b].tolist()
        if "volumes" in mean:
            r["volumes_bohr3"] = mean["volumes"][a:b].tolist()
        results.append(r)
    return results


def predict_frames(models, frames: Sequence[Frame], forces: bool = False,
                   batch_atoms: int = DEFAULT_BATCH_ATOMS) -> list[dict]:
    """``predict`` over frames read by ``aimnet_fast.io``, batched by an atom budget; each result
    also holds the frame's ``index`` (0-based, in its file), ``name`` (comment or extended-XYZ
    ``name=``) and ``source`` (file)."""
    models = _as_models(models)
    check_ensemble(models)
    elements = common_elements(models)
    dtype = next(models[0].parameters()).dtype
    results = []
    for group in chunk_frames(frames, batch_atoms):
        batch = frames_to_batch(group, dtype=dtype, validate=True, elements=elements)
        for f, r in zip(group, predict(models, batch, forces, validate=False)):
            results.append({"index": f.index, "name": f.title, "source": f.source, **r})
    return results


def resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"device {device!r} asked for, but this PyTorch sees no CUDA GPU "
                           f"(torch {torch.__version__}); use --device cpu")
    return dev


def load_models(paths: Sequence[str | os.PathLike], device: str = "cpu",
                backend: str = "auto") -> list[AIMNet]:
    """Load checkpoints for inference: on ``device``, in eval mode, weights frozen."""
    dev = resolve_device(device)
    if backend == "triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise PredictError("--backend triton needs a CUDA device (the Triton kernels run on GPUs; "
                           "on CPU only in Triton's slow interpreter, TRITON_INTERPRET=1); use "
                           "--backend torch or auto on CPU")
    models = []
    for path in paths:
        model = load_model(path, map_location=dev, backend=backend).to(dev).eval()
        model.requires_grad_(False)  # forces need d/dcoord only
        models.append(model)
    check_ensemble(models)
    return models


def build_parser(prog: str = "python -m aimnet_fast.predict") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Predict AIMNet energies (Hartree), forces (Hartree/Å), charges "
        "(e), electric moments and volumes (bohr³) of the molecules of an XYZ file.")
    p.add_argument("model", help="aimnet_fast checkpoint (see `aimnet-fast convert`)")
    p.add_argument("input", help="XYZ or extended-XYZ file, one or many molecules (Å)")
    p.add_argument("--out", "-o", help="output JSON file (default: standard output)")
    p.add_argument("--forces", action="store_true", help="also compute forces -dE/dR")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="MODEL2",
                   help="more checkpoints: report the mean and the standard deviation")
    p.add_argument("--backend", choices=ops.BACKENDS, default="auto")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default cpu)")
    p.add_argument("--batch-atoms", type=int, default=DEFAULT_BATCH_ATOMS,
                   help=f"atom budget of one batch (default {DEFAULT_BATCH_ATOMS})")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m aimnet_fast.predict") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.batch_atoms < 1:
        print(f"{prog}: error: --batch-atoms must be positive", file=sys.stderr)
        return 2
    paths = [args.model, *args.ensemble]
    if args.device == "cpu":
        tune_allocator()
    try:
        models = load_models(paths, args.device, args.backend)
        frames = read_xyz(args.input)
        results = predict_frames(models, frames, args.forces, args.batch_atoms)
    except AIMNetError as e:
        return report(prog, e)
    doc = {"format": "aimnet_fast.predict", "units": UNITS, "models": [str(p) for p in paths],
           "input": str(args.input), "n_models": len(models),
           "heads": list(models[0].heads.keys()), "molecules": results}
    text = json.dumps(doc, indent=1)
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
        except OSError as e:
            print(f"{prog}: error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
            return 1
        print(f"wrote {out}: {len(results)} molecules, {len(models)} model(s), heads "
              f"{', '.join(doc['heads'])}{', forces' if args.forces else ''}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
