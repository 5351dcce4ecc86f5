"""The paper's learning-rate schedule: reduce on plateau of the validation loss, with a floor.

``PlateauSchedule`` is ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (mode min, relative threshold,
no cooldown) with two differences of convention:

* ``patience`` counts the epochs without improvement *at which* the lr drops (the paper: ×0.9 once
  six epochs in a row fail to improve), torch's those *after which* it drops: ours = torch's + 1.
* ``min_lr`` is a floor that ends the phase (``below_floor``), not a clamp: the lr keeps falling
  by ``factor`` and the trainer stops the phase once it is below ``min_lr``.

An epoch improves if its loss < best · (1 − threshold); a NaN loss never does.
"""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau


class PlateauSchedule:
    """Multiply the lr by ``factor`` once ``patience`` epochs in a row have not improved the best
    validation loss (improve: loss < best · (1 − threshold)); the count then starts again.
    A NaN loss counts as no improvement. ``below_floor`` tells the phase to stop."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: float = 0.9, patience: int = 6,
                 threshold: float = 0.0, min_lr: float = 0.0):
        if patience < 1:
            raise ValueError(f"patience must be ≥ 1, got {patience}")
        self.optimizer = optimizer
        self.factor, self.patience, self.threshold, self.min_lr = factor, patience, threshold, min_lr
        # min_lr=0 and eps=0: torch neither clamps nor skips small reductions; the floor is ours.
        self._torch = ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience - 1,
                                        threshold=threshold, threshold_mode="rel", cooldown=0,
                                        min_lr=0.0, eps=0.0)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def below_floor(self) -> bool:
        return self.lr < self.min_lr

    @property
    def best(self) -> float:
        return self._torch.best

    @property
    def bad_epochs(self) -> int:
        return self._torch.num_bad_epochs

    def step(self, val_loss: float) -> bool:
        """Record one epoch's validation loss; True if the lr was reduced."""
        best = self._torch.best
        self._torch.step(val_loss)
        return self._torch.best == best and self._torch.num_bad_epochs == 0

    def state_dict(self) -> dict:
        """``{"best", "bad_epochs", "lr"}``: the form the trainer's checkpoints have always held."""
        return {"best": self.best, "bad_epochs": self.bad_epochs, "lr": self.lr}

    def load_state_dict(self, sd: dict) -> None:
        self._torch.best = float(sd["best"])
        self._torch.num_bad_epochs = int(sd["bad_epochs"])
        self._torch.cooldown_counter = 0
        for g in self.optimizer.param_groups:
            g["lr"] = sd["lr"]
