"""The trainer: ``python -m aimnet_fast.train`` (see ``aimnet_fast.train.trainer``)."""
from .trainer import main, run  # noqa: F401
