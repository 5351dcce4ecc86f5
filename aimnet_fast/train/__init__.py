"""The trainer: ``python -m aimnet_fast.train`` (the loop and command line: ``aimnet_fast.train.trainer``)."""
from .trainer import Trainer, main, run  # noqa: F401
