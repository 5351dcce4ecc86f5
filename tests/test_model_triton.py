"""The whole model on the Triton backend (interpreted on the CPU), neighbor search included,
reproduces the original outputs like the reference path does, and agrees with the reference path in
float64. Every buffer the kernels allocate starts poisoned. On a GPU machine everything runs
there, compiled."""
import copy
import os

import pytest
import torch
from test_reference_outputs import check, predict

from aimnet_fast.batch import Batch
from aimnet_fast.kernels import mlp

pytestmark = pytest.mark.usefixtures("poisoned_buffers", "interpreted_mlp_tiles")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=False)
def interpreted_mlp_tiles(monkeypatch):
    """Under the interpreter, MLP tiles of 256: the interpreter's cost grows with the number of
    programs, and this file checks the whole model, not the tiling (test_kernel_mlp.py checks the
    real tiles, tile-straddling sizes included). Compiled on a GPU the real tiles run."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        monkeypatch.setitem(mlp.BLOCKS, "BLOCK_M", 256)
        monkeypatch.setitem(mlp.BLOCKS, "BLOCK_N", 256)


@pytest.fixture(scope="module")
def triton_cv0(released_models):
    m = copy.deepcopy(released_models[0]).to(DEVICE)
    m.backend = "triton"
    return m


#: Under the interpreter (minutes per molecule batch), five of the twenty: the smallest and the
#: largest, one without O, an S66x8 and an ANI-1x one. Compiled on CUDA, all twenty.
INTERPRETED_SUBSET = (8, 6, 17, 11, 0)


def test_triton_backend_reproduces_original_outputs(triton_cv0, reference_molecules):
    mols = reference_molecules
    if os.environ.get("TRITON_INTERPRET") == "1":
        mols = [reference_molecules[k] for k in INTERPRETED_SUBSET]
    got = predict(triton_cv0, mols, DEVICE)
    for g, m in zip(got, mols):
        check(g, m["models"][0])


def test_triton_backend_equals_reference_in_float64(triton_cv0, released_models,
                                                    reference_molecules):
    mols = [reference_molecules[k] for k in (8, 17, 0)]   # 6, 14 and 13 atoms
    b = Batch.from_molecules([(m["numbers"], m["coord_A"]) for m in mols],
                             dtype=torch.float64).to(DEVICE)
    outs = {}
    for name, model in (("triton", triton_cv0), ("torch", released_models[0])):
        m = copy.deepcopy(model).double().to(DEVICE)
        c = b.coord.clone().requires_grad_(True)
        out = m(b.numbers, c, b.mol_idx, b.n_mol)
        loss = (out["passes"]["energy"].sum() + out["passes"]["elmoments"].square().sum()
                + out["passes"]["volumes"].sum())
        grads = torch.autograd.grad(loss, [c] + list(m.parameters()))
        outs[name] = (out, grads)
    (ot, gt), (orf, gr) = outs["triton"], outs["torch"]
    for key in ("energy", "charges", "elmoments", "volumes"):
        torch.testing.assert_close(ot["passes"][key], orf["passes"][key], atol=1e-9, rtol=1e-9)
    for a, r in zip(gt, gr):
        torch.testing.assert_close(a, r, atol=1e-8, rtol=1e-8)
