"""Throughput of the reference path (PyTorch, CPU or GPU): forward, forward+backward (a training
step's gradient), predict with forces, and cost per atom against molecule size.

Run: ``pytest bench/test_bench_reference.py`` (figures: molecules/s and atoms/s in extra_info, also
printed at the end)."""
import pytest
import torch

import icount

from aimnet_fast.batch import Batch
from aimnet_fast.neighbors import build_neighbors
from bench.synthetic import water_cluster

FIGURES: list[str] = []


def _record(benchmark, name, n_mol, n_atoms):
    if benchmark.disabled:
        return
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(molecules_per_s=n_mol / t, atoms_per_s=n_atoms / t)
    FIGURES.append(f"{name}: {n_mol / t:,.0f} molecules/s, {n_atoms / t:,.0f} atoms/s "
                   f"(median {t * 1e3:.1f} ms, {n_mol} molecules, {n_atoms} atoms)")


@pytest.fixture(scope="module")
def s66_batch(s66x8_molecules):
    # 128 molecules (~2,300 atoms): one step's worth on a CPU, a fraction of a GPU batch. Under
    # callgrind (bench/icount.py) 32: instructions per molecule move alike, at a quarter of the cost.
    return Batch.from_molecules(s66x8_molecules[::4][:32 if icount.in_child() else 128])


def test_forward(benchmark, guard, released_model, s66_batch):
    b = s66_batch

    def run():
        with torch.no_grad():
            return released_model(b.numbers, b.coord, b.mol_idx, b.n_mol)["energy"]

    guard.measure(benchmark, "reference.forward", run, rounds=3)
    _record(benchmark, "forward T=3 (S66x8)", b.n_mol, b.n_atoms)


def test_forward_backward(benchmark, guard, released_model, s66_batch):
    """Energy and charge loss of every pass, backward to the parameters: the training step's
    model cost without the optimizer."""
    b = s66_batch
    model = released_model

    def run():
        model.zero_grad(set_to_none=True)
        out = model(b.numbers, b.coord, b.mol_idx, b.n_mol)
        loss = out["passes"]["energy"].float().var() + out["passes"]["charges"].square().mean()
        loss.backward()

    guard.measure(benchmark, "reference.forward_backward", run, rounds=3)
    _record(benchmark, "forward+backward T=3 (S66x8)", b.n_mol, b.n_atoms)


def test_predict_with_forces(benchmark, guard, released_model, s66_batch):
    b = s66_batch

    def run():
        c = b.coord.clone().requires_grad_(True)
        e = released_model(b.numbers, c, b.mol_idx, b.n_mol, all_passes=False)["energy"]
        return torch.autograd.grad(e.sum(), c)[0]

    guard.measure(benchmark, "reference.predict_forces", run, rounds=3)
    _record(benchmark, "predict energy+forces (S66x8)", b.n_mol, b.n_atoms)


@pytest.mark.parametrize("n_water", [4, 11, 34, 100])
def test_cost_per_atom(benchmark, guard, released_model, n_water):
    """One water cluster of 12 … 300 atoms, forward T=3; neighbor search included (larger: the cpu
    backend's cost per atom, bench/test_bench_cpu_backend.py)."""
    numbers, coord = water_cluster(n_water)
    b = Batch.from_molecules([(numbers, coord)])

    def run():
        with torch.no_grad():
            nb = build_neighbors(b.coord, b.mol_idx)
            return released_model(b.numbers, b.coord, b.mol_idx, 1, neighbors=nb)["energy"]

    inner = max(1, 300 // b.n_atoms)   # rounds of at least ≈ 40 ms
    guard.measure(benchmark, f"reference.cost_per_atom[{b.n_atoms}]", run,
                  rounds=5, inner=inner)
    if benchmark.disabled:
        return
    t = benchmark.stats.stats.median / inner
    benchmark.extra_info.update(us_per_atom=t / b.n_atoms * 1e6)
    FIGURES.append(f"cost per atom, {b.n_atoms} atoms: {t / b.n_atoms * 1e6:.1f} µs/atom")


def teardown_module():
    print("\n" + "\n".join(FIGURES))
