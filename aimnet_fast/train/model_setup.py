"""The model a run trains: a fresh one or one started from a checkpoint (``model.init_from``),
re-initialisation and freezing by parameter-name patterns, placing it on the device, and the
T=1 → T=3 switch of the curriculum."""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch
from torch import nn

from ..checkpoint import load_model
from ..errors import CheckpointError
from ..model import AIMNet
from . import config as C


def place(model: AIMNet, device: torch.device, dtype: torch.dtype) -> AIMNet:
    """Move the model to ``device`` and its weights to ``dtype``. The SAE stay float64 (the model
    keeps them so under ``.to``: a float32 SAE would put errors of ~1e-6 Ha × atoms into every
    energy)."""
    return model.to(device=device, dtype=dtype)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _load_init(path: str) -> AIMNet:
    try:
        return load_model(path)
    except CheckpointError as e:  # load_model names the file; say which key gave it
        raise CheckpointError(f"model.init_from: {e}") from e


def build_model(cfg: C.TrainConfig, log: Callable[[str], None] = print) -> AIMNet:
    """A fresh model (seeded by ``cfg.seed``, identical on every rank) or one started from
    ``model.init_from``; freezing and re-initialisation by name patterns."""
    torch.manual_seed(cfg.seed)
    mc = cfg.model
    if mc.init_from:
        src = _load_init(mc.init_from)
        model = AIMNet(heads=mc.heads, n_pass=cfg.curriculum[0].n_pass, elements=src.elements,
                       sae_Ha=src.sae_Ha.tolist(), backend=cfg.backend)
        own = model.state_dict()
        loaded, skipped = [], []
        for k, v in src.state_dict().items():
            if k in own and own[k].shape == v.shape:
                own[k] = v.clone()
                loaded.append(k)
            else:
                skipped.append(k)
        model.load_state_dict(own)
        fresh = [k for k in own if k not in loaded]
        log(f"init_from {mc.init_from}: loaded {len(loaded)} tensors; fresh: "
            f"{', '.join(fresh) or 'none'}; not used: {', '.join(skipped) or 'none'}")
    else:
        model = AIMNet(heads=mc.heads, n_pass=cfg.curriculum[0].n_pass, backend=cfg.backend)
    if mc.reinit:
        for mname, module in model.named_modules():
            own_params = [f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False)]
            if own_params and any(_matches(n, mc.reinit) for n in own_params):
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                elif module is model:
                    nn.init.orthogonal_(model.afv_table)
                log(f"re-initialised {mname or 'afv_table'}")
    frozen = []
    for name, p in model.named_parameters():
        train = not _matches(name, mc.freeze)
        if mc.trainable is not None:
            train = train and _matches(name, mc.trainable)
        p.requires_grad_(train)
        if not train:
            frozen.append(name)
    if frozen:
        log(f"frozen parameters ({len(frozen)}): {', '.join(frozen)}")
    return model


def zero_last_update_layer(model: AIMNet) -> None:
    """The T=1 → T=3 switch: the first update then adds zero, so predictions do not change."""
    last = model.update_mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
