"""Predict energies, forces, charges, volumes and electric moments of molecules.

Command line::

    python -m aimnet_fast.predict MODEL INPUT [--out OUT.json|OUT.extxyz|OUT.npz] [--forces]
        [--ensemble MODEL2 ...] [--backend auto|torch|cpu|triton] [--device cpu|cuda]
        [--memory-budget 1GB] [--batch-atoms N]

MODEL is an aimnet_fast checkpoint (``python -m aimnet_fast.convert`` makes one from the released
files), INPUT an XYZ or extended-XYZ file with one or many molecules, OUT a file whose suffix
picks the format (``aimnet_fast.predict_output``). Batches are sized from a memory budget
(``plan_batches``: no input needs a flag to run fast), each with one neighbor search that the
input checks share, and results are written as each batch is done. The Python API under it,
``predict_arrays``, ``predict(models, batch, forces)`` and ``predict_frames(models, frames, ...)``,
is shared with the ASE calculator.

Per molecule, the results hold only what the models have heads for (the SMD model has an energy
head only): ``energy_Ha``, ``forces_Ha_per_A`` (−dE/dR, when asked), ``charges_e``,
``elmoments`` ([charge (e), |dipole|, |quadrupole|, |octupole|], atomic units: e·bohr^k),
``volumes_bohr3``. With several models, values are means over the models, and ``energy_std_Ha`` /
``forces_std_Ha_per_A`` are their standard deviations (sample, ddof = 1).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .batch import Batch
from .checkpoint import load_model
from .cpu import flush_denormals, tune_allocator
from .errors import AIMNetError, PredictError, report
from .io import Frame, chunk_frames, frames_to_batch, read_xyz
from .neighbors import Neighbors
from .predict_output import SUFFIXES, open_writer, records
from . import ops
from .model import AIMNet
from .units import OUTPUT_UNITS

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


#: Default memory budget of one batch, bytes: batches are sized so that their estimated peak
#: (``batch_bytes``) stays under it, whatever the molecules' sizes and densities.
DEFAULT_MEMORY_BUDGET = 1 << 30

#: Peak bytes of an energy+forces batch on the CPU backend (float32), per atom, per angular triplet
#: and per unique triplet pair (j, k): the least-squares fit over S66x8 batches and water droplets
#: of 0.9k–20k atoms by ``python -m bench.predict_memory`` (bench/RESULTS.md), raised 10 % so that
#: the estimate is above every measured case.
BYTES_PER_ATOM = 46_000
BYTES_PER_TRIPLET = 2_500
BYTES_PER_PAIR = 7_900
#: For the first cut, before the neighbor list says: about what an S66x8 dimer costs per atom.
BYTES_PER_ATOM_TYPICAL = 150_000


def batch_bytes(n_atoms: int, nb: Neighbors) -> int:
    """Estimated peak bytes of predicting energies and forces for a batch with neighbors ``nb``."""
    return (BYTES_PER_ATOM * n_atoms + BYTES_PER_TRIPLET * nb.triplets.shape[1]
            + BYTES_PER_PAIR * nb.pairs.shape[1])


def parse_bytes(text: str | int) -> int:
    """``"1GB"``, ``"512MB"``, ``"2G"``, ``"1e9"`` or an int → bytes (powers of 1024 for K/M/G/T)."""
    if isinstance(text, int):
        return text
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    for suffix, k in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, scale = t[:-1], k
            break
    try:
        value = float(t) * scale
    except ValueError:
        raise PredictError(f"not a size in bytes: {text!r} (e.g. 1GB, 512MB)") from None
    if not value >= 1:
        raise PredictError(f"memory budget must be at least 1 byte, got {text!r}")
    return int(value)


def _model_inputs(model: AIMNet, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = next(model.parameters())
    coord = batch.coord.detach().to(device=p.device, dtype=p.dtype)
    return batch.numbers.to(p.device), coord, batch.mol_idx.to(p.device)


def _run_model(model: AIMNet, batch: Batch, forces: bool,
               neighbors: Neighbors | None = None) -> dict[str, torch.Tensor]:
    """One model on one batch → flat float64 CPU tensors: energy (M,), forces (N,3), charges (N,),
    elmoments (N,4), volumes (N,), for the heads the model has. ``neighbors``: the batch's list
    (on the model's device), if already built."""
    numbers, coord, mol_idx = _model_inputs(model, batch)
    out = None
    if forces:
        if "energy" not in model.heads:
            raise PredictError("forces asked of a model without an energy head")
        if neighbors is None:
            neighbors = ops.build_neighbors(coord, mol_idx, model.backend)
        # without autograd where the backend can (the cpu backend: autograd's graph cost a
        # 21-atom molecule's call ~13 %, bench/RESULTS.md)
        out = ops.energy_forces(model, numbers, coord, mol_idx, batch.n_mol, neighbors)
    if out is not None:
        res = {"forces": out["forces"]}
    else:
        coord.requires_grad_(forces)
        with torch.set_grad_enabled(forces), ops.first_order():
            out = model(numbers, coord, mol_idx, batch.n_mol, neighbors=neighbors, all_passes=False)
            res = {}
            if forces:
                (grad,) = torch.autograd.grad(out["energy"].sum(), coord)
                res["forces"] = -grad
    for key in ("energy", "charges", "elmoments", "volumes"):
        if key in out:
            res[key] = out[key]
    return {k: v.detach().to("cpu", torch.float64) for k, v in res.items()}


#: result name → output name (with its unit)
OUTPUT_NAMES = {"energy": "energy_Ha", "forces": "forces_Ha_per_A", "charges": "charges_e",
                "elmoments": "elmoments", "volumes": "volumes_bohr3"}


def predict_arrays(models, batch: Batch, forces: bool = False,
                   neighbors: Neighbors | None = None) -> dict[str, np.ndarray]:
    """Run one model or an ensemble on a checked batch → float64 arrays by output name:
    ``energy_Ha`` (M,), ``forces_Ha_per_A`` (N, 3), ``charges_e`` (N,), ``elmoments`` (N, 4),
    ``volumes_bohr3`` (N,) for the heads the models have; with two or more models, ensemble means
    and ``energy_std_Ha`` / ``forces_std_Ha_per_A``, sample standard deviations (ddof = 1)."""
    models = _as_models(models)
    runs = [_run_model(m, batch, forces, neighbors) for m in models]
    out: dict[str, np.ndarray] = {}
    for key, name in OUTPUT_NAMES.items():
        if key not in runs[0]:
            continue
        stacked = torch.stack([r[key] for r in runs])
        out[name] = stacked.mean(0).numpy()
        if len(models) > 1 and key in ("energy", "forces"):
            out[name.replace("_Ha", "_std_Ha")] = stacked.std(0, correction=1).numpy()
    order = ("energy_Ha", "energy_std_Ha", "forces_Ha_per_A", "forces_std_Ha_per_A", "charges_e",
             "elmoments", "volumes_bohr3")
    return {k: out[k] for k in order if k in out}


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
    neighbors = checked_neighbors(models, batch, common_elements(models)) if validate else None
    arrays = predict_arrays(models, batch, forces, neighbors)
    return records(batch.numbers.numpy(), batch.offsets.tolist(), arrays)


def batch_neighbors(model: AIMNet, batch: Batch) -> Neighbors:
    """The model's neighbor list of ``batch``, on the model's device, as its forward would build
    it (shared by the members of an ensemble and by the overlap check)."""
    _, coord, mol_idx = _model_inputs(model, batch)
    return ops.build_neighbors(coord, mol_idx, model.backend)


def checked_neighbors(models: Sequence[AIMNet], batch: Batch, elements: Sequence[int]) -> Neighbors:
    """``Batch.validate`` on ``elements``, with the overlap check taken from the neighbor list
    that the models then use (``batch_neighbors``): one search for checks and models."""
    batch.validate(elements, overlap=False)
    nb = batch_neighbors(models[0], batch)
    batch.check_overlap(nb.radial)
    return nb


def plan_batches(models: Sequence[AIMNet], frames: Sequence[Frame],
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, batch_atoms: int | None = None,
                 ) -> Iterator[tuple[list[Frame], Batch, Neighbors]]:
    """Checked batches of consecutive frames, each with its neighbor list, sized so that
    ``batch_bytes`` stays within ``memory_budget`` (and, if given, at most ``batch_atoms`` atoms).

    A first cut by atoms (``BYTES_PER_ATOM_TYPICAL``) is checked against its real neighbor list,
    and halved, and searched again, only when it is over the budget. A molecule over the budget
    on its own forms a batch of its own. Errors name the frame (``Batch.validate``)."""
    elements = common_elements(models)
    dtype = next(models[0].parameters()).dtype
    first_cut = max(1, memory_budget // BYTES_PER_ATOM_TYPICAL)
    if batch_atoms is not None:
        first_cut = min(first_cut, batch_atoms)

    def fit(group: list[Frame]):
        batch = frames_to_batch(group, dtype=dtype, validate=False)
        nb = checked_neighbors(models, batch, elements)
        if len(group) > 1 and batch_bytes(batch.n_atoms, nb) > memory_budget:
            half = len(group) // 2
            yield from fit(group[:half])
            yield from fit(group[half:])
        else:
            yield group, batch, nb

    for group in chunk_frames(frames, first_cut):
        yield from fit(group)


def predict_stream(models, frames: Sequence[Frame], forces: bool = False,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, batch_atoms: int | None = None,
                   ) -> Iterator[tuple[list[Frame], Batch, dict[str, np.ndarray]]]:
    """``predict_arrays`` over frames read by ``aimnet_fast.io``, batch by batch (``plan_batches``):
    yields each batch's frames, the ``Batch`` and its result arrays."""
    models = _as_models(models)
    check_ensemble(models)
    for group, batch, nb in plan_batches(models, frames, memory_budget, batch_atoms):
        yield group, batch, predict_arrays(models, batch, forces, nb)


def predict_frames(models, frames: Sequence[Frame], forces: bool = False,
                   batch_atoms: int | None = None,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET) -> list[dict]:
    """``predict`` over frames read by ``aimnet_fast.io``, batched within ``memory_budget`` bytes
    (and ``batch_atoms`` atoms, if given); each result also holds the frame's ``index`` (0-based,
    in its file), ``name`` (comment or extended-XYZ ``name=``) and ``source`` (file)."""
    results = []
    for group, batch, arrays in predict_stream(models, frames, forces, memory_budget, batch_atoms):
        for f, r in zip(group, records(batch.numbers.numpy(), batch.offsets.tolist(), arrays)):
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
    p.add_argument("--out", "-o", help="output file, by suffix: .json (model units), .extxyz "
                   "(ASE's: eV, eV/Å) or .npz (default: JSON on standard output)")
    p.add_argument("--forces", action="store_true", help="also compute forces -dE/dR")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="MODEL2",
                   help="more checkpoints: report the mean and the standard deviation")
    p.add_argument("--backend", choices=ops.BACKENDS, default="auto")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default cpu)")
    p.add_argument("--memory-budget", default="1GB",
                   help="estimated peak memory of one batch (default 1GB); batches are sized to it")
    p.add_argument("--batch-atoms", type=int, default=None,
                   help="at most this many atoms per batch (default: as the memory budget allows)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m aimnet_fast.predict") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.batch_atoms is not None and args.batch_atoms < 1:
        print(f"{prog}: error: --batch-atoms must be positive", file=sys.stderr)
        return 2
    if args.out and Path(args.out).suffix.lower() not in SUFFIXES:
        print(f"{prog}: error: --out {args.out}: unknown output format; use a file ending in "
              f"{', '.join(SUFFIXES)}", file=sys.stderr)
        return 2
    paths = [args.model, *args.ensemble]
    if args.device == "cpu":
        tune_allocator()
        flush_denormals()
    writer = None
    try:
        budget = parse_bytes(args.memory_budget)
        models = load_models(paths, args.device, args.backend)
        frames = read_xyz(args.input)
        header = {"format": "aimnet_fast.predict", "units": UNITS,
                  "models": [str(p) for p in paths], "input": str(args.input),
                  "n_models": len(models), "heads": list(models[0].heads.keys())}
        writer = open_writer(args.out, header)
        for group, batch, arrays in predict_stream(models, frames, args.forces, budget,
                                                   args.batch_atoms):
            writer.write(group, batch.numbers.numpy(), batch.offsets.numpy(), arrays)
        writer.close()
    except AIMNetError as e:
        if writer is not None:
            writer.abort()
        return report(prog, e)
    except OSError as e:
        if writer is not None:
            writer.abort()
        print(f"{prog}: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    if args.out:
        print(f"wrote {args.out}: {writer.count} molecules, {len(models)} model(s), heads "
              f"{', '.join(header['heads'])}{', forces' if args.forces else ''}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
