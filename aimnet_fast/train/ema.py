"""An exponential moving average (EMA) of the trainable weights.

After every optimizer step, w_ema ← decay · w_ema + (1 − decay) · w. The trainer validates, checkpoints
and reports the averaged weights (``applied``); the raw weights keep training. A checkpoint holds the
averaged weights as its model and ``state_dict()`` (the raw weights and the update count) in its
training record, so a resume continues both exactly.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0
        self._applied = False

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, after an optimizer step."""
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average again at the current weights."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(p)

    @torch.no_grad()
    def copy_to_weights(self) -> None:
        """Make the averaged weights the raw ones (a new phase starts from them)."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)

    @contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, its raw weights again after."""
        if self._applied:       # nested: already there
            yield
            return
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        self._applied = True
        try:
            yield
        finally:
            with torch.no_grad():
                for r, p in zip(raw, self.params):
                    p.copy_(r)
            self._applied = False

    def state_dict(self) -> dict:
        """The raw weights (the model's, outside ``applied``) and the update count; the average
        itself is what a checkpoint's model holds."""
        if self._applied:
            raise RuntimeError("EMA.state_dict inside applied(): the raw weights are not in the model")
        return {"decay": self.decay, "updates": self.updates,
                "raw": {n: p.detach().cpu().clone() for n, p in zip(self.names, self.params)}}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """With the model holding a checkpoint's (averaged) weights: take them as the average and
        put the raw weights of ``sd`` into the model."""
        missing = sorted(set(self.names) - set(sd["raw"]))
        if missing:
            raise KeyError(f"EMA state lacks the raw weights of {missing[:3]}")
        self.reset()
        for n, p in zip(self.names, self.params):
            p.copy_(sd["raw"][n])
        self.updates = int(sd["updates"])
