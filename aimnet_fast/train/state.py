"""Where a run stands, how that is written down, and the checkpoint files that hold it.

Three layers, each on its own:

- ``RunState``: the counters of the run (phase, epoch, step, skipped steps, best validation loss,
  training time) and the batch sampler's state (epoch and position in it);
- ``to_dict`` / ``from_dict`` and ``training_record``: the plain dict a checkpoint's ``training``
  entry holds (run state, optimizer, schedule, random state, config, split fingerprint, targets);
- ``write_checkpoint`` / ``read_checkpoint``: the files (``aimnet_fast.checkpoint`` format, written
  atomically with ``save_atomic``); ``model_checkpoint``: the in-memory copy of a best model.

``last.pt`` is the run's one commit point: it holds, besides the weights and the run state, the
metrics rows and the best models, so that ``best.pt``, ``best_phase<n>.pt`` and ``metrics.csv``
(written after it) are rebuilt from it on resume whatever instant a kill came at.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..checkpoint import checkpoint_dict, save_atomic
from ..errors import CheckpointError, TrainingError


@dataclass
class RunState:
    phase: int = 0                 # curriculum phase (0-based)
    phase_started: bool = False    # its optimizer and schedule exist (and are in the checkpoint)
    epoch: int = 0                 # epochs finished in this phase
    step: int = 0                  # steps taken in the current epoch
    global_epoch: int = 0          # epochs finished in the run
    global_step: int = 0           # steps taken in the run
    bad_steps: int = 0             # steps skipped for a non-finite loss or gradient
    consecutive_bad: int = 0
    best_val: float = math.inf     # best validation loss of this phase (the schedule's measure)
    stale_epochs: int = 0          # epochs in a row without a new best_val (early stopping)
    phase_step: int = 0            # steps taken in this phase (the warm-up)
    best_pred: float = math.inf    # best validation loss of the prediction (last pass): best.pt
    phase_best_pred: float = math.inf   # the same within this phase: best_phase<n>.pt
    best_epoch: int = 0            # global epoch (1-based) of best.pt
    stopped: str = ""              # why the run ended early: "max_time" (a resume may go on)
    train_loss_sum: float = 0.0    # sum and count of the good steps' losses in this epoch
    train_steps: int = 0
    elapsed_s: float = 0.0         # training time up to the last save, over all restarts
    sampler: dict = field(default_factory=dict)  # BatchSampler.state_dict() at the last save

    def start_phase(self, n: int) -> None:
        self.phase, self.phase_started, self.epoch, self.step = n, True, 0, 0
        self.best_val, self.train_loss_sum, self.train_steps = math.inf, 0.0, 0
        self.stale_epochs, self.phase_step, self.phase_best_pred = 0, 0, math.inf

    def end_epoch(self) -> None:
        self.epoch += 1
        self.global_epoch += 1
        self.step, self.train_loss_sum, self.train_steps = 0, 0.0, 0

    def end_phase(self) -> None:
        self.phase, self.phase_started, self.epoch = self.phase + 1, False, 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "checkpoint") -> "RunState":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"{source}: unknown run-state entries {unknown}")
        return cls(**d)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def training_record(state: RunState, optimizer, schedule, *, config: dict, split: str,
                    targets: Sequence[str]) -> dict:
    """The ``training`` entry of a checkpoint: all a resume needs besides the weights."""
    return {"config": config, "state": state.to_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "rng": rng_state(), "split": split,
            "targets": list(targets)}


def save_file(ck: dict, path: Path) -> None:
    """``save_atomic``, with a failed write (a full disk, no permission) as a one-line
    ``TrainingError`` that says the file under ``path`` is still the previous one."""
    try:
        save_atomic(ck, path)
    except OSError as e:
        raise TrainingError(f"cannot write {path}: {e.strerror or e}; the previous "
                            f"{Path(path).name} is intact") from e


def write_checkpoint(model, record: dict, paths: Sequence[Path]) -> None:
    """The model and its ``training`` record, written atomically to every path of ``paths``."""
    ck = checkpoint_dict(model, training=record)
    for p in paths:
        save_file(ck, p)


def model_checkpoint(model, state: RunState, *, config: dict, targets: Sequence[str]) -> dict:
    """A copy (CPU tensors, not aliasing the live weights) of ``model`` as a checkpoint, with the
    run state it was validated at: the content of ``best.pt`` and ``best_phase<n>.pt``."""
    ck = checkpoint_dict(model, training={"state": state.to_dict(), "config": config,
                                          "targets": list(targets)})
    ck["state_dict"] = {k: v.clone() for k, v in ck["state_dict"].items()}
    return ck


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(state_dict, training record) of a checkpoint written by ``write_checkpoint``."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e.strerror or e}") from e
    if not isinstance(ck, dict) or "training" not in ck or "state_dict" not in ck:
        raise CheckpointError(f"{path}: not a training checkpoint (no training state to resume)")
    return ck["state_dict"], ck["training"]
