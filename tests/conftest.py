"""Shared test fixtures. Without a GPU, Triton kernels run in its interpreter: the variable must be
set before any kernel module is imported, so it is set here, at collection time."""
import os
from pathlib import Path

import pytest

try:
    import torch
    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: Where the kernel tests run: compiled on the GPU when there is one, interpreted on the CPU otherwise.
DEVICE = "cuda" if _cuda else "cpu"

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AIMNET_FAST_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared material not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def reference_molecules(shared):
    """The 20 molecules of the original model's outputs (shared/reference), read in place."""
    import json
    with open(shared / "reference" / "aimnet_original_outputs.json") as f:
        return json.load(f)["molecules"]


@pytest.fixture(scope="session")
def released_models(shared):
    """The five released cross-validation models (backbone + multitask heads), converted."""
    from aimnet_fast.checkpoint import convert_released
    d = shared / "aimnet_pretrained"
    models = []
    for k in range(5):
        m = convert_released(d / f"aimnet_cv{k}.pt", d / f"aimnet_mt_cv{k}.pt")
        m.backend = "torch"
        models.append(m.eval())
    return models


@pytest.fixture
def kernel_device():
    """Tensors and modules the test builds are made on ``DEVICE`` (``with torch.device``): on a GPU
    machine the kernels under test run compiled there, never interpreted. Random generators must be
    ``torch.Generator(DEVICE)`` for that."""
    import torch
    with torch.device(DEVICE):
        yield DEVICE


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every buffer the kernels' launch functions allocate (all through ``kernels._alloc.empty``)
    starts as NaN, or as the most negative integer for index buffers, so an element a kernel
    fails to write fails the comparison."""
    import torch

    from aimnet_fast.kernels import _alloc

    def empty(shape, like, dtype=None):
        dtype = like.dtype if dtype is None else dtype
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(tuple(shape), fill, dtype=dtype, device=like.device)
    monkeypatch.setattr(_alloc, "empty", empty)
