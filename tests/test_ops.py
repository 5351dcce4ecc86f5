"""The seam ``aimnet_fast.ops``: backend names checked once when the model is built (or its backend
set), "auto" decided per call by the tensors' device, the neighbor search behind the seam with every
backend returning the reference's ``Neighbors``, and the model's SAE kept in float64 whatever its
dtype. Triton runs in its interpreter without a GPU (conftest), compiled on one."""
import copy
import json

import pytest
import torch

from aimnet_fast import aev, cpu_aev, ops
from aimnet_fast.constants import ANGULAR_CUTOFF_A, ELEMENTS
from aimnet_fast.kernels import neighbors as kernel_neighbors
from aimnet_fast.model import AIMNet
from aimnet_fast.neighbors import angular_subset, build_neighbors, neighbor_pairs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIELDS = ("radial", "angular", "triplets", "pairs", "triplet_pair")


def _same_neighbors(got, want):
    for field in FIELDS:
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == w.dtype and torch.equal(g, w), field


def _molecule(n, seed, dtype=torch.float64, box_A=3.0):
    g = torch.Generator().manual_seed(seed)
    numbers = torch.tensor(ELEMENTS)[torch.randint(0, len(ELEMENTS), (n,), generator=g)]
    coord = torch.rand(n, 3, generator=g, dtype=torch.float64).to(dtype) * box_A
    return numbers, coord, torch.zeros(n, dtype=torch.long)


# -- backend names --------------------------------------------------------------------------------
def test_unknown_backend_is_refused_when_built_and_when_set():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        AIMNet(backend="cuda")
    m = AIMNet(backend="torch")
    with pytest.raises(ValueError, match="unknown backend"):
        m.backend = "Triton"
    assert m.backend == "torch"
    m.backend = "triton"
    assert m.backend == "triton"


def test_triton_backend_without_triton_is_refused_when_built(monkeypatch):
    monkeypatch.setitem(ops.IMPLEMENTATIONS, "triton", None)
    monkeypatch.setitem(ops._UNAVAILABLE, "triton", "Triton is not installed (test)")
    with pytest.raises(ValueError, match="Triton is not installed"):
        AIMNet(backend="triton")
    m = AIMNet(backend="auto")
    with pytest.raises(ValueError, match="Triton is not installed"):
        m.backend = "triton"
    # a direct call that bypassed the model gets the same explanation, not a TypeError on None
    with pytest.raises(ValueError, match="Triton is not installed"):
        ops.radial_contract(torch.zeros(1, 3), torch.zeros(2, 0, dtype=torch.long),
                            torch.zeros(1, 4), "triton")


def test_cpu_work_never_imports_triton():
    """A CPU prediction imports neither Triton nor the kernels (a third of a second of start-up
    for every command); asking for the Triton backend then loads them."""
    import subprocess
    import sys
    code = ("import sys, torch\n"
            "from aimnet_fast.model import AIMNet\n"
            "from aimnet_fast import predict, evaluate, ops\n"
            "m = AIMNet(backend='auto').double()\n"
            "c = torch.tensor([[0., 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], dtype=torch.float64)\n"
            "m(torch.tensor([8, 1, 1]), c, torch.zeros(3, dtype=torch.long), 1)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] == 'triton' or 'kernels' in k))\n"
            "ops.implementation('triton')\n"
            "print('aimnet_fast.kernels.mlp' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout


class _Refused(Exception):
    pass


def _refusing_backend():
    def refuse(*args, **kwargs):
        raise _Refused
    return ops.Backend(*([refuse] * len(ops.Backend._fields)))


def test_auto_runs_the_fast_cpu_backend_on_cpu_tensors_and_the_table_on_request(monkeypatch):
    monkeypatch.setitem(ops.IMPLEMENTATIONS, "triton", _refusing_backend())
    _, coord, mol_idx = _molecule(6, seed=1)
    pairs = neighbor_pairs(coord, mol_idx, 4.6)
    afv = torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(ops.radial_contract(coord, pairs, afv, "auto"),
                               cpu_aev.radial_contract(coord, pairs, afv), rtol=0, atol=0)
    torch.testing.assert_close(ops.radial_contract(coord, pairs, afv, "torch"),
                               aev.radial_contract(coord, pairs, afv), rtol=0, atol=0)
    _same_neighbors(ops.build_neighbors(coord, mol_idx, "auto"), build_neighbors(coord, mol_idx))
    for call in (lambda: ops.radial_contract(coord, pairs, afv, "triton"),
                 lambda: ops.build_neighbors(coord, mol_idx, "triton"),
                 lambda: ops.elu_mlp(afv, torch.nn.Sequential(), "triton")):
        with pytest.raises(_Refused):
            call()
    monkeypatch.setitem(ops.IMPLEMENTATIONS, "cpu", _refusing_backend())
    with pytest.raises(_Refused):
        ops.radial_contract(coord, pairs, afv, "auto")


def test_forward_builds_its_neighbors_through_the_seam(monkeypatch):
    numbers, coord, mol_idx = _molecule(5, seed=2)
    seen = []
    real = ops.build_neighbors

    def spy(coord, mol_idx, backend="auto"):
        seen.append(backend)
        return real(coord, mol_idx, backend)
    monkeypatch.setattr(ops, "build_neighbors", spy)
    m = AIMNet(backend="torch").double()
    out = m(numbers, coord, mol_idx, 1)
    assert seen == ["torch"]
    given = m(numbers, coord, mol_idx, 1, neighbors=build_neighbors(coord, mol_idx))
    assert seen == ["torch"]  # neighbors passed in: no search
    torch.testing.assert_close(out["energy"], given["energy"], rtol=0, atol=0)


# -- the neighbor search behind the seam ---------------------------------------------------------
@pytest.fixture
def small_neighbor_tiles(monkeypatch):
    """Tiles of 4 centres × 8 candidates and 4 triplet partners: molecules of 1–17 atoms straddle
    every boundary."""
    monkeypatch.setitem(kernel_neighbors.BLOCKS, "BLOCK_I", 4)
    monkeypatch.setitem(kernel_neighbors.BLOCKS, "BLOCK_J", 8)
    monkeypatch.setattr(kernel_neighbors, "TRIPLET_BLOCK", 4)


@pytest.mark.usefixtures("small_neighbor_tiles", "poisoned_buffers", "kernel_device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_neighbors_equal_the_reference_on_random_molecules(dtype):
    g = torch.Generator(DEVICE).manual_seed(5)
    sizes = [1, 2, 17, 4, 9, 8]
    coord = torch.cat([torch.rand(n, 3, generator=g, dtype=torch.float64) * 3.5 + 50.0 * m
                       for m, n in enumerate(sizes)]).to(dtype)
    mol_idx = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    want = build_neighbors(coord, mol_idx)
    counts = torch.bincount(want.angular[0], minlength=coord.shape[0])
    assert counts.max() > 4 and want.triplets.shape[1] > 100
    _same_neighbors(ops.build_neighbors(coord, mol_idx, "triton"), want)


@pytest.mark.usefixtures("small_neighbor_tiles", "poisoned_buffers", "kernel_device")
def test_triton_neighbors_follow_the_reference_at_the_angular_cutoff_in_float32():
    """Pairs so close to 3.1 Å that float32 and float64 disagree about them: the subset is the
    reference's (decided in the coordinates' dtype), not a float64 search's."""
    c = ANGULAR_CUTOFF_A
    angle = torch.linspace(0.1, 1.4, 400, dtype=torch.float64)
    ring = torch.stack([c * torch.cos(angle), c * torch.sin(angle), torch.zeros_like(angle)], 1)
    ring = ring.float()
    d2_32, d2_64 = ring.square().sum(1), ring.double().square().sum(1)
    split = ((d2_32 < c * c) != (d2_64 < c * c)).nonzero().flatten()[:6]
    assert split.numel() == 6
    coord = torch.cat([torch.zeros(1, 3), ring[split]])      # a centre and six borderline atoms
    mol_idx = torch.zeros(7, dtype=torch.long)
    want = build_neighbors(coord, mol_idx)
    in_float64 = angular_subset(coord.double(), want.radial, c)
    assert not torch.equal(want.angular, in_float64)          # the case is a real one
    _same_neighbors(ops.build_neighbors(coord, mol_idx, "triton"), want)


@pytest.mark.usefixtures("small_neighbor_tiles", "poisoned_buffers", "kernel_device")
def test_triton_neighbors_equal_the_reference_on_real_molecules(shared):
    ref = json.loads((shared / "reference" / "aimnet_original_outputs.json").read_text())
    mols = ref["molecules"][:4] + ref["molecules"][8:10]
    for dtype in (torch.float64, torch.float32):
        coord = torch.cat([torch.tensor(m["coord_A"], dtype=dtype) for m in mols])
        mol_idx = torch.repeat_interleave(torch.arange(len(mols)),
                                          torch.tensor([len(m["numbers"]) for m in mols]))
        _same_neighbors(ops.build_neighbors(coord, mol_idx, "triton"),
                        build_neighbors(coord, mol_idx))


# -- the SAE stays float64 -------------------------------------------------------------------------
@pytest.mark.parametrize("convert", [lambda m: m.float(), lambda m: m.half(),
                                     lambda m: m.to(torch.float32), lambda m: m.double(),
                                     lambda m: m.to("meta", torch.bfloat16)],
                         ids=["float", "half", "to_float32", "double", "to_meta_bf16"])
def test_sae_stays_float64_through_dtype_conversions(convert):
    sae = [-0.5004312345678901, -37.84531234567891, -54.58312345678912, -75.06412345678912,
           -99.73112345678912, -398.1021234567891, -460.1681234567891]
    m = AIMNet(sae_Ha=sae)
    out = convert(m)
    assert out is m
    assert m.sae_Ha.dtype == torch.float64
    if m.sae_Ha.device.type == "meta":  # device moves still apply to it
        assert next(m.parameters()).device.type == "meta"
    else:
        assert m.sae_Ha.tolist() == sae   # not a float64 copy of a rounded value


def test_float32_model_energy_uses_the_float64_sae():
    # values with float32 rounding errors of ~1e-6 Ha and more
    sae = torch.tensor([-0.5004312345678901, -37.84531234567891, -54.58312345678912,
                        -75.06412345678912, -99.73112345678912, -398.1021234567891,
                        -460.1681234567891], dtype=torch.float64)
    assert (sae - sae.float().double()).abs().max() > 1e-6
    m = AIMNet(sae_Ha=sae.tolist(), backend="torch").float().eval()
    numbers, coord, mol_idx = _molecule(9, seed=3, dtype=torch.float32)
    out = m(numbers, coord, mol_idx, 1)
    # float64 reference: the same float32 network without SAE, plus the float64 SAE per atom
    bare = copy.deepcopy(m)
    bare.sae_Ha.zero_()
    net_atom = bare(numbers, coord, mol_idx, 1)["atomic_energies"]
    want_atom = net_atom + sae[m.species(numbers)]
    assert out["atomic_energies"].dtype == torch.float64
    torch.testing.assert_close(out["atomic_energies"], want_atom, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["energy"], want_atom.sum().reshape(1), rtol=0, atol=1e-11)
    # a state dict loaded into a float32 model keeps the buffer float64 too
    fresh = AIMNet(backend="torch").float()
    fresh.load_state_dict(m.state_dict())
    assert fresh.sae_Ha.dtype == torch.float64 and torch.equal(fresh.sae_Ha, sae)
