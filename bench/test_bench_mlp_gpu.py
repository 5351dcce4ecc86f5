"""GPU benchmark of the Triton ELU MLP (kernels/mlp.py) and neighbor search (kernels/neighbors.py)
against the PyTorch path (cuBLAS nn.Sequential / the reference cell list). Skipped without CUDA.

Run: ``pytest bench/test_bench_mlp_gpu.py`` on a machine with a GPU. Figures (rows/s, TFLOP/s, and
the accuracy of each precision against float64 on the same GPU) go to extra_info and are printed
at the end. No figure here has been measured yet: this session had no GPU.
"""
import pytest
import torch

from aimnet_fast.model import build_elu_mlp as make_mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROWS = 5700          # ≈ one GPU batch of 380 molecules × 15 atoms
EMBEDDING = [768, 512, 256, 256]
FIGURES: list[str] = []


def _flops(sizes, rows, backward):
    fwd = 2 * rows * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    return fwd * (3 if backward else 1)




@pytest.fixture(scope="module")
def embedding():
    torch.manual_seed(0)
    net = make_mlp(EMBEDDING, last_activation=True).cuda()
    x = torch.randn(ROWS, EMBEDDING[0], device="cuda") * 0.5
    return net, x


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["torch", "ieee", "tf32", "bf16"])
def test_embedding_mlp(benchmark, guard, embedding, impl, backward):
    from aimnet_fast.kernels.mlp import elu_mlp
    net, x = embedding
    x = x.detach().requires_grad_(backward)

    def fn():
        out = net(x) if impl == "torch" else elu_mlp(x, net, precision=impl)
        if backward:
            out.sum().backward()
        return out

    t = guard.measure_cuda(benchmark, fn)
    if t:
        tflops = _flops(EMBEDDING, ROWS, backward) / t / 1e12
        benchmark.extra_info.update(rows_per_s=ROWS / t, tflops=tflops)
        FIGURES.append(f"embedding_mlp {impl} {'fwd+bwd' if backward else 'fwd'}: "
                       f"{t * 1e3:.3f} ms, {ROWS / t:,.0f} rows/s, {tflops:.1f} TFLOP/s")


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_embedding_mlp_accuracy_on_gpu(precision, embedding):
    """Not a timing: the error of each precision against float64 on this GPU (the interpreter
    cannot show tf32). Recorded, and bounded loosely."""
    from aimnet_fast.kernels.mlp import elu_mlp
    net, x = embedding
    x = x[:512].detach()
    ref = net.double()(x.double())
    net.float()
    out = elu_mlp(x, net, precision=precision).double()
    rel = ((out - ref).norm() / ref.norm()).item()
    FIGURES.append(f"embedding_mlp accuracy {precision}: rel Frobenius err {rel:.2e}, "
                   f"max abs {(out - ref).abs().max().item():.2e}")
    assert rel < {"ieee": 1e-5, "tf32": 1e-2, "bf16": 3e-2}[precision]


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_neighbor_pairs(benchmark, guard, impl, s66x8_molecules):
    """All 528 S66x8 conformers (6–34 atoms) in one batch, radial cutoff 4.6 Å."""
    from aimnet_fast.kernels import neighbors as nb
    from aimnet_fast.neighbors import neighbor_pairs
    mols = [torch.as_tensor(c, dtype=torch.float32) for _, c in s66x8_molecules]
    coord = torch.cat(mols).cuda()
    mol_idx = torch.repeat_interleave(torch.arange(len(mols)),
                                      torch.tensor([m.shape[0] for m in mols])).cuda()
    offsets = nb.offsets_from_mol_idx(mol_idx)
    max_atoms = max(m.shape[0] for m in mols)
    cap = 64 * coord.shape[0]
    if impl == "reference":
        fn = lambda: neighbor_pairs(coord, mol_idx, 4.6)  # noqa: E731
    else:
        fn = lambda: nb.neighbor_pairs_padded(coord, offsets, 4.6, cap, max_atoms)  # noqa: E731
    t = guard.measure_cuda(benchmark, fn)
    pairs, n, over = nb.neighbor_pairs_padded(coord, offsets, 4.6, cap, max_atoms)
    assert not bool(over)
    assert torch.equal(pairs[:, :int(n)], neighbor_pairs(coord, mol_idx, 4.6))
    if t:
        FIGURES.append(f"neighbor_pairs {impl}: {t * 1e6:.0f} µs for {len(mols)} molecules "
                       f"({coord.shape[0]} atoms, {int(n)} pairs)")


def teardown_module(module):
    if FIGURES:
        print("\n" + "\n".join(FIGURES))
