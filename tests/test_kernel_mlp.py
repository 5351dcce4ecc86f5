"""Triton ELU MLP (kernels/mlp.py) against torch.nn.Sequential in float64.

Runs under TRITON_INTERPRET=1 without a GPU (conftest). Tiles are shrunk to 16 (the tl.dot minimum)
so that every size here straddles the M, N and K tile boundaries; outputs are allocated as NaN so
an element a kernel forgets to write fails the comparison.
"""
import json
import os

import pytest
import torch
from torch import nn

from aimnet_fast.kernels import mlp
from aimnet_fast.model import build_elu_mlp as make_mlp

pytestmark = pytest.mark.usefixtures("poisoned_buffers", "kernel_device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setitem(mlp.BLOCKS, "BLOCK_M", 16)
    monkeypatch.setitem(mlp.BLOCKS, "BLOCK_N", 16)
    monkeypatch.setitem(mlp.BLOCKS, "BLOCK_K", 16)
    torch.manual_seed(1234)  # the default initialisation of the nn.Linear layers built below


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=False)


# sizes: rows M; layer widths with every one ≠ 0 mod 16 and some below, at and over one tile
CASES = [
    (45, [37, 21, 19, 5], False),   # head-like: linear last layer
    (33, [17, 33, 16, 18], True),   # ELU after the last layer too
    (1, [7, 3], True),              # one row, one layer
    (16, [16, 16], False),          # exactly one tile
]


@pytest.mark.parametrize("rows,sizes,last_act", CASES)
def test_forward_backward_match_sequential_float64(rows, sizes, last_act):
    g = torch.Generator(DEVICE).manual_seed(rows * 101 + sizes[0])
    net = make_mlp(sizes, last_activation=last_act).double()
    with torch.no_grad():  # weights large enough that both ELU branches occur
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(rows, sizes[0], generator=g, dtype=torch.float64, requires_grad=True)
    params = list(net.parameters())
    out = mlp.elu_mlp(x, net)
    ref = net(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert (ref < 0).any() and (ref > 0).any() or rows == 1
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    got = _grads(out, [x] + params, gy)
    want = _grads(ref, [x] + params, gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_no_bias_layer_and_parameter_grads_land_in_dot_grad():
    g = torch.Generator(DEVICE).manual_seed(3)
    net = nn.Sequential(nn.Linear(19, 23, bias=False), nn.ELU(), nn.Linear(23, 2)).double()
    x = torch.randn(20, 19, generator=g, dtype=torch.float64)  # no grad wanted for x
    mlp.elu_mlp(x, net).square().sum().backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x).square().sum().backward()
    for a, p in zip(got, net.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("split", [2, 3])
def test_weight_gradient_split_over_rows(split, monkeypatch):
    """The weight gradient's reduction over rows cut into slices (as on a GPU with few output
    tiles); 45 rows with BLOCK_K = 16 make slices of unequal length, the last one partial."""
    monkeypatch.setattr(mlp, "WEIGHT_GRAD_SPLIT_K", split)
    g = torch.Generator(DEVICE).manual_seed(10 + split)
    net = make_mlp([20, 19, 3], last_activation=True).double()
    x1 = torch.randn(45, 13, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(45, 7, generator=g, dtype=torch.float64, requires_grad=True)
    params = list(net.parameters())
    gy = torch.randn(45, 3, generator=g, dtype=torch.float64)
    ref = net(torch.cat([x1, x2], 1))
    want = _grads(ref, [x1, x2] + params, gy)
    got = _grads(mlp.elu_mlp(torch.cat([x1, x2], 1), net), [x1, x2] + params, gy)
    got_cat = _grads(mlp.elu_mlp_cat(x1, x2, net), [x1, x2] + params, gy)
    for a, c, b in zip(got, got_cat, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(c, b, rtol=1e-11, atol=1e-11)


def test_gradcheck_tiny():
    g = torch.Generator(DEVICE).manual_seed(4)
    w1 = torch.randn(17, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(17, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: mlp.linear_elu(x, w, b, True, "ieee"),
                                    (x, w1, b1))
    assert torch.autograd.gradcheck(lambda x, w, b: mlp.linear_elu(x, w, b, False, "ieee"),
                                    (x, w1, b1))


def test_zero_rows():
    net = make_mlp([20, 18, 3], last_activation=False).double()
    x = torch.zeros(0, 20, dtype=torch.float64, requires_grad=True)
    out = mlp.elu_mlp(x, net)
    assert out.shape == (0, 3)
    out.sum().backward()
    for p in net.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_opcheck_fake_and_autograd_registration():
    g = torch.Generator(DEVICE).manual_seed(5)
    x = torch.randn(18, 17, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 17, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, generator=g, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(mlp.linear_elu, (x, w, b, True, "ieee"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_bad_stacks_are_refused():
    with pytest.raises(TypeError):
        mlp.elu_mlp(torch.zeros(2, 3), nn.Sequential(nn.ELU(), nn.Linear(3, 2)))
    with pytest.raises(ValueError):
        mlp.elu_mlp(torch.zeros(2, 3), nn.Sequential(nn.Linear(3, 2), nn.ELU(alpha=0.5)))
    with pytest.raises(ValueError):
        mlp.elu_mlp(torch.zeros(2, 3, dtype=torch.float64),
                    nn.Sequential(nn.Linear(3, 2)).double(), precision="tf32")
    with pytest.raises(TypeError):  # float32 input, float64 weights
        mlp.elu_mlp(torch.zeros(2, 3), nn.Sequential(nn.Linear(3, 2)).double())


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_precision_cost_on_real_size_layers(precision, capsys, monkeypatch):
    """embedding_mlp's first two layers (768→512→256) in float32 against float64.

    Under the interpreter "tf32" runs as "ieee" (numpy products) and "bf16" rounds the inputs of
    each product to bfloat16 in the kernel; compiled on a GPU, "tf32" rounds the inputs to a 10-bit
    mantissa (relative error ≈ 2⁻¹¹ per product, ~3e-4 over the sums here: limit 2e-3). The bf16
    result must equal a torch emulation (inputs rounded to bf16, float32 products)."""
    monkeypatch.setitem(mlp.BLOCKS, "BLOCK_M", 32)
    monkeypatch.setitem(mlp.BLOCKS, "BLOCK_N", 64)
    monkeypatch.setitem(mlp.BLOCKS, "BLOCK_K", 32)
    g = torch.Generator(DEVICE).manual_seed(6)
    net = make_mlp([768, 512, 256], last_activation=True)
    x = torch.randn(40, 768, generator=g) * 0.5
    gy = torch.randn(40, 256, generator=g, dtype=torch.float64)
    ref = net.double()(x.double())
    ref_gw = torch.autograd.grad(ref, net[0].weight, gy)[0]
    ref = ref.detach()
    net.float()
    out = mlp.elu_mlp(x, net, precision)
    gw = torch.autograd.grad(out, net[0].weight, gy.float())[0].double()
    out = out.detach()
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    err = (out.double() - ref).abs().max().item()
    rel_gw = ((gw - ref_gw).norm() / ref_gw.norm()).item()
    with capsys.disabled():
        print(f"\n[precision {precision}, 768→512→256, 40 rows] output: max abs err {err:.3e}, "
              f"rel Frobenius err {rel:.3e}; grad of W1 (512×768): rel Frobenius err {rel_gw:.3e}")
    rounded_tf32 = precision == "tf32" and os.environ.get("TRITON_INTERPRET") != "1"
    assert rel_gw < (3e-2 if precision == "bf16" else 2e-3 if rounded_tf32 else 1e-5)
    if precision == "bf16":
        h = x
        for lin, act in mlp.mlp_layers(net):
            h = nn.functional.linear(h.bfloat16().float(), lin.weight.bfloat16().float(), lin.bias)
            h = nn.functional.elu(h) if act else h
        # Summation order differs, so an intermediate near a bf16 rounding tie may round the
        # other way before layer 2: compare to 1e-4, well below the bf16 error itself (~3e-3).
        torch.testing.assert_close(out, h, rtol=0, atol=1e-4)
        assert rel < 1e-2
    else:
        assert rel < (2e-3 if rounded_tf32 else 1e-6)


def test_released_model_with_kernel_mlps_matches_reference(shared, monkeypatch):
    """All MLPs of the converted released model (cv0) through the kernels, float64, on a real molecule:
    the energy matches the torch path to 1e-9 Ha and the original outputs to 1e-4 Ha."""
    for key, size in (("BLOCK_M", 32), ("BLOCK_N", 64), ("BLOCK_K", 64)):
        monkeypatch.setitem(mlp.BLOCKS, key, size)  # real widths: fewer interpreted programs
    from aimnet_fast.checkpoint import convert_released
    pre = shared / "aimnet_pretrained"
    ref = json.loads((shared / "reference" / "aimnet_original_outputs.json").read_text())
    mol = next(m for m in ref["molecules"] if len(m["numbers"]) == 6)
    model = convert_released(pre / "aimnet_cv0.pt", pre / "aimnet_mt_cv0.pt").double().to(DEVICE)
    model.backend = "torch"
    numbers = torch.tensor(mol["numbers"])
    coord = torch.tensor(mol["coord_A"], dtype=torch.float64)
    mol_idx = torch.zeros(len(numbers), dtype=torch.long)
    want = model(numbers, coord, mol_idx, 1)
    model.mlp = lambda layers, x: mlp.elu_mlp(x, layers)
    got = model(numbers, coord, mol_idx, 1)
    assert abs(got["energy"].item() - want["energy"].item()) < 1e-9
    assert abs(got["energy"].item() - mol["models"][0]["energy_Ha"]) < 1e-4
    torch.testing.assert_close(got["charges"], want["charges"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("k1,k2", [(37, 7), (16, 16), (5, 40)])
def test_concatenation_without_materializing_matches_cat(k1, k2):
    """[x1 ‖ x2] read in place; the K tile at the seam holds columns of both (BLOCK_K = 16)."""
    g = torch.Generator(DEVICE).manual_seed(k1 * 7 + k2)
    net = make_mlp([k1 + k2, 21, 18], last_activation=True).double()
    x1 = torch.randn(35, k1, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(35, k2, generator=g, dtype=torch.float64, requires_grad=True)
    params = list(net.parameters())
    out = mlp.elu_mlp_cat(x1, x2, net)
    ref = net(torch.cat([x1, x2], 1))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(_grads(out, [x1, x2] + params, gy), _grads(ref, [x1, x2] + params, gy)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_concatenation_gradcheck_and_opcheck():
    g = torch.Generator(DEVICE).manual_seed(8)
    x1 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(17, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x1, x2, w, b: mlp.linear_elu_cat(x1, x2, w, b, True, "ieee"), (x1, x2, w, b))
    torch.library.opcheck(mlp.linear_elu_cat, (x1, x2, w, b, True, "ieee"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_dispatch_through_ops():
    from aimnet_fast import ops
    assert ops.implementation("triton").elu_mlp is mlp.elu_mlp
    net = make_mlp([18, 17, 2], last_activation=False).double()
    x = torch.randn(19, 18, dtype=torch.float64)
    torch.testing.assert_close(ops.elu_mlp(x, net, backend="triton"), net(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("last_act", [True, False])
def test_double_backward_like_a_force_loss(last_act):
    """d/dθ of a loss on dE/dx (a force loss) through the kernels equals nn.Sequential's."""
    g = torch.Generator(DEVICE).manual_seed(20)
    net = make_mlp([7, 18, 3], last_activation=last_act).double()
    x = torch.randn(19, 7, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(19, 7, generator=g, dtype=torch.float64)
    res = []
    for f in (lambda t: mlp.elu_mlp(t, net), net):
        gx, = torch.autograd.grad(f(x).square().sum(), x, create_graph=True)
        res.append(torch.autograd.grad((gx * v).sum(), [x] + list(net.parameters())))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_gradgradcheck_tiny():
    g = torch.Generator(DEVICE).manual_seed(21)
    x1 = torch.randn(2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, 1, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: mlp.linear_elu(x, w, b, True, "ieee"), (torch.cat([x1, x2], 1), w, b))
    assert torch.autograd.gradgradcheck(
        lambda x1, x2, w, b: mlp.linear_elu_cat(x1, x2, w, b, True, "ieee"), (x1, x2, w, b))


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("last_act", [True, False])
def test_nan_input_gives_nan_output(precision, last_act):
    """NaN in, NaN out, as torch.nn.Sequential gives: a NaN must never leave a layer as a finite
    number (the ELU's clamp once turned it into 0)."""
    net = make_mlp([20, 18, 5], last_activation=last_act)
    x = torch.randn(7, 20)
    x[3, 4] = float("nan")
    ref = net(x)
    got = mlp.elu_mlp(x, net, precision=precision)
    assert torch.isnan(ref[3]).all()
    torch.testing.assert_close(torch.isnan(got), torch.isnan(ref), rtol=0, atol=0)
