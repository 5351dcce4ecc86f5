"""GPU benchmark of one full training step (forward T passes, loss on every pass, backward, fused
AMSGrad) on 380 molecules of the embedded default data set (3–20 atoms, like ANI-1x), the reference
path against the Triton kernels, float32 and TF32 products. Skipped without CUDA.

    pytest bench/test_bench_train_gpu.py -s

Prints molecules/s and the model-FLOPs utilisation against the H100's FP32 / TF32 peaks
(aimnet_fast.flops counts the step's work for the batch's actual atoms, pairs and triplets).
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PEAK = {"ieee": 67e12, "tf32": 495e12}   # H100 SXM datasheet, FLOP/s


@pytest.fixture(scope="module")
def gpu_batch():
    from aimnet_fast import data as D
    ds = D.load_dataset(D.default_sources())
    idx = next(iter(D.BatchSampler(ds, None, mols_per_batch=380, seed=0)))
    b = D.collate(ds, idx)
    return ds, b.to("cuda")


@pytest.mark.parametrize("n_pass", [1, 3])
@pytest.mark.parametrize("impl,precision", [("torch", "ieee"), ("triton", "ieee"), ("triton", "tf32")])
def test_train_step_gpu(benchmark, guard, gpu_batch, impl, precision, n_pass):
    from aimnet_fast import data as D
    from aimnet_fast.train.config import LossConfig, OptimConfig
    from aimnet_fast.flops import count_batch
    from aimnet_fast.model import AIMNet
    from aimnet_fast.neighbors import build_neighbors
    from aimnet_fast.train.dist import Dist
    from aimnet_fast.train.model_setup import place
    from aimnet_fast.train.optim import make_optimizer
    from aimnet_fast.train.step import train_step

    ds, batch = gpu_batch
    torch.manual_seed(0)
    model = AIMNet(backend=impl, precision=precision)
    with torch.no_grad():
        model.sae_Ha.copy_(torch.as_tensor(D.fit_sae(ds)))
    model = place(model, torch.device("cuda"), torch.float32)
    opt, desc = make_optimizer(model.parameters(), OptimConfig(), torch.device("cuda"))
    dist = Dist(device=torch.device("cuda"))

    def step():
        train_step(model, opt, batch, LossConfig(), ["energy", "charges"], n_pass, dist)

    t = guard.measure_cuda(benchmark, step, rounds=10, inner=3)
    if t is None:
        return
    nb = build_neighbors(batch.coord, batch.mol_idx)
    n_mol = batch.n_mol
    work = count_batch(model, nb, batch.n_atoms, n_pass=n_pass)
    mfu = work.train_flop / t / PEAK[precision]
    benchmark.extra_info.update(molecules_per_s=n_mol / t, mfu=mfu, optimizer=desc)
    print(f"\n{impl}/{precision} T={n_pass}: {n_mol / t:,.0f} molecules/s "
          f"({t * 1e3:.2f} ms per step of {n_mol}), MFU {mfu * 100:.1f} % of the {precision} peak")
