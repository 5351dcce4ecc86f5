"""The optimizer: Adam / AMSGrad, fused where available (the schedule: ``schedule.PlateauSchedule``)."""
from __future__ import annotations

import torch

from ..errors import TrainingError
from . import config as C


def make_optimizer(params, oc: C.OptimConfig, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """Adam (AMSGrad by default), fused where this torch supports it for ``device``."""
    kw = dict(lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay,
              amsgrad=oc.name == "amsgrad")
    params = list(params)
    want = str(oc.fused).lower()
    name = "AMSGrad" if kw["amsgrad"] else "Adam"
    if want in ("auto", "true"):
        try:
            opt = torch.optim.Adam(params, fused=True, **kw)
            return opt, f"{name} (fused, {device.type})"
        except (RuntimeError, ValueError, TypeError) as e:
            if want == "true":
                raise TrainingError(f"optim.fused=true but fused Adam is not available: {e}") from e
            why = str(e).splitlines()[0]
            return torch.optim.Adam(params, foreach=True, **kw), f"{name} (foreach; fused unavailable: {why})"
    return torch.optim.Adam(params, foreach=True, **kw), f"{name} (foreach)"

