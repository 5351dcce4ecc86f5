"""Our checkpoint format, the converter from the released AIMNet files, and the loader.

A checkpoint is a ``torch.save``d dict:

- ``format`` = "aimnet_fast", ``format_version`` = FORMAT_VERSION
- ``units``: what the model's inputs and outputs are measured in
- ``model``: constructor arguments of ``AIMNet`` (heads, n_pass, elements, sae_Ha)
- ``constants``: AEV parameters and output scales the weights were trained with (checked on load)
- ``state_dict``: the weights
- optional ``training``: optimizer, scheduler, sampler and random state (the trainer's business)
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch

from . import constants as C
from .errors import CheckpointError
from .model import AIMNet
from .units import MODEL_UNITS

FORMAT = "aimnet_fast"
FORMAT_VERSION = 1
UNITS = MODEL_UNITS


def model_constants() -> dict:
    return {
        "radial_cutoff_A": C.RADIAL_CUTOFF_A, "radial_eta_per_A2": C.RADIAL_ETA_PER_A2,
        "radial_shifts_A": list(C.RADIAL_SHIFTS_A),
        "angular_cutoff_A": C.ANGULAR_CUTOFF_A, "angular_eta_per_A2": C.ANGULAR_ETA_PER_A2,
        "angular_zeta": C.ANGULAR_ZETA, "angular_shifts_A": list(C.ANGULAR_SHIFTS_A),
        "angular_sectors_rad": list(C.ANGULAR_SECTORS_RAD), "cos_clamp": C.COS_CLAMP,
        "energy_scale_Ha": C.ENERGY_SCALE_HA, "elmoments_scale": list(C.ELMOMENTS_SCALE),
        "volume_scale_bohr3": C.VOLUME_SCALE_BOHR3,
    }


def model_config(model: AIMNet) -> dict:
    return {"heads": list(model.heads.keys()), "n_pass": model.n_pass,
            "elements": list(model.elements), "sae_Ha": model.sae_Ha.tolist()}


def checkpoint_dict(model: AIMNet, **extra) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "units": dict(UNITS),
            "model": model_config(model), "constants": model_constants(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}


def new_file_mode() -> int:
    """The mode ``open`` gives a new file (0o666 less the umask); ``mkstemp`` gives 0o600."""
    old = os.umask(0)
    os.umask(old)
    return 0o666 & ~old


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``data`` to a temporary file in the same folder, fsynced, then renamed into place (and the
    folder fsynced): a crash while writing never leaves a half-written file under ``path``, and a
    full disk is an ``OSError`` (ENOSPC) with the old file intact. The file gets the mode of any
    other new file (umask), not ``mkstemp``'s 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)        # the rename itself on disk
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """torch.save through ``write_atomic``. The object is serialized in memory first, so that a
    full disk is an error of the write, not one deep inside torch's zip writer."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getbuffer())


def save_model(model: AIMNet, path: str | os.PathLike, **extra) -> None:
    save_atomic(checkpoint_dict(model, **extra), path)


def load_model(path: str | os.PathLike, map_location="cpu", backend: str = "auto") -> AIMNet:
    """Load a model from our checkpoint format (see ``convert_released`` for the released files)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch.load raises many kinds for a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a checkpoint torch can read "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an aimnet_fast checkpoint; convert released AIMNet "
                              f"files first with `python -m aimnet_fast.convert BACKBONE HEADS OUT`")
    if ck.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {ck['format_version']} is newer than this "
                              f"aimnet_fast reads ({FORMAT_VERSION}); upgrade aimnet_fast")
    saved = ck.get("constants", {})
    here = model_constants()
    for k, v in saved.items():
        if k in here and torch.tensor(v, dtype=torch.float64).ne(
                torch.tensor(here[k], dtype=torch.float64)).any():
            raise CheckpointError(f"{path}: constant {k} = {v} differs from this code's {here[k]}")
    model = AIMNet(backend=backend, **ck["model"])
    model.load_state_dict(ck["state_dict"])
    return model


def convert_released(backbone_path: str | os.PathLike, heads_path: str | os.PathLike) -> AIMNet:
    """Build an AIMNet from a released backbone (``aimnet_cv{k}.pt``) and heads file
    (``aimnet_mt_cv{k}.pt`` with energy, elmoments and volume, or ``aimnet_smd_cv{k}.pt`` with a
    solvent energy head only)."""
    bb = torch.load(backbone_path, map_location="cpu", weights_only=True)
    hd = torch.load(heads_path, map_location="cpu", weights_only=True)
    need = ["embed.afv_table", "embed.implemented_elements"]
    for key in need:
        if key not in bb:
            raise CheckpointError(f"{backbone_path}: key {key!r} missing; is this an AIMNet backbone?")
    elements = [int(z) for z in bb["embed.implemented_elements"]]
    heads = sorted({k.split(".")[0] for k in hd}, key=list(("energy", "elmoments", "volume")).index)
    unknown = set(heads) - {"energy", "elmoments", "volume"}
    if unknown or not heads:
        raise CheckpointError(f"{heads_path}: unexpected heads {sorted(unknown) or 'none'}")
    sae = [C.SAE_HA[C.ELEMENTS.index(z)] for z in elements]
    model = AIMNet(heads=heads, elements=elements, sae_Ha=sae)
    sd = {"afv_table": bb["embed.afv_table"][: len(elements)]}  # last row is the NaN guard row
    for k, v in bb.items():
        if k.startswith("embed.combine_mlp.") or k.startswith("embed.embedding_mlp."):
            sd[k[len("embed."):]] = v
        elif k.startswith("update_mlp.") or k.startswith("interact_mlp."):
            sd[k] = v
    for k, v in hd.items():
        sd["heads." + k] = v
    sd["sae_Ha"] = torch.tensor(sae, dtype=torch.float64)
    missing, extra = model.load_state_dict(sd, strict=False)
    if missing or extra:
        raise CheckpointError(f"{backbone_path} + {heads_path}: missing {missing}, unexpected {extra}")
    return model
