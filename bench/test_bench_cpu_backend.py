"""The fast CPU backend ("cpu", ``aimnet_fast.cpu_aev``) beside the reference ("torch"), in one run:
prediction with forces and a T = 3 training step's model cost on S66x8 conformers, the share of that
step spent outside the MLPs' matrix products, and the cost per atom of energy+forces from 21 to
20,001 atoms (single water droplets).

    pytest bench/test_bench_cpu_backend.py --benchmark-only -s

The figures printed at the end include the cpu/torch ratios measured in this run; figures from a
run are in bench/RESULTS.md with the command that gave them.
"""
import copy

import pytest

import icount

from aimnet_fast.batch import Batch
from aimnet_fast.ops import build_neighbors
from aimnet_fast.predict import predict_arrays
from bench.synthetic import water_cluster

FIGURES: list[str] = []
MEDIANS: dict[str, float] = {}
BACKENDS = ("torch", "cpu")
#: The reference's side of each cpu/torch ratio is timed and reported, not judged: the same
#: workload is guarded as reference.predict_forces and reference.forward_backward.
BACKEND_PARAMS = [pytest.param("torch", marks=pytest.mark.unguarded), "cpu"]


@pytest.fixture(scope="module")
def models(released_model):
    out = {}
    for backend in BACKENDS:
        m = copy.deepcopy(released_model)
        m.backend = backend
        out[backend] = m
    return out


@pytest.fixture(scope="module")
def s66_batch(s66x8_molecules):
    return Batch.from_molecules(s66x8_molecules[::4][:32 if icount.in_child() else 128])


def _keep(benchmark, key, text):
    if benchmark.disabled:
        return
    MEDIANS[key] = benchmark.stats.stats.median
    FIGURES.append(f"{text}: median {MEDIANS[key] * 1e3:.1f} ms")


def _frozen(model):
    m = copy.deepcopy(model).eval()
    m.requires_grad_(False)
    return m


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_predict_forces(benchmark, guard, models, s66_batch, backend):
    """Energy and forces of 128 S66x8 conformers, as the predict command runs them."""
    b = s66_batch
    model = _frozen(models[backend])

    def run():
        return predict_arrays(model, b, forces=True)

    guard.measure(benchmark, f"cpu_backend.predict_forces[{backend}]", run, rounds=3)
    _keep(benchmark, f"predict.{backend}", f"predict energy+forces, {b.n_atoms} atoms, {backend}")


@pytest.mark.unguarded
def test_predict_forces_without_native_kernels(benchmark, guard, models, s66_batch, monkeypatch):
    """``test_predict_forces[cpu]`` with the cpu backend's torch code in place of its native
    kernels (as on a machine without a C compiler), for their ratio in one run."""
    from aimnet_fast import cpu_native
    monkeypatch.setattr(cpu_native, "library", lambda: None)
    b = s66_batch
    model = _frozen(models["cpu"])

    def run():
        return predict_arrays(model, b, forces=True)

    guard.measure(benchmark, "cpu_backend.predict_forces[cpu, torch code]", run, rounds=3)
    _keep(benchmark, "predict.cpu_torch_code",
          f"predict energy+forces, {b.n_atoms} atoms, cpu without native kernels")


def test_predict_forward_only(benchmark, guard, models, s66_batch):
    """``test_predict_forces[cpu]`` without forces (the forward alone), so that the backward's
    share is the difference: goal backward ≤ 1.2 × forward."""
    b = s66_batch
    model = _frozen(models["cpu"])

    def run():
        return predict_arrays(model, b, forces=False)

    guard.measure(benchmark, "cpu_backend.predict_forward[cpu]", run, rounds=3)
    _keep(benchmark, "forward.cpu", f"predict forward only, {b.n_atoms} atoms, cpu")


def _train_step(model, b):
    model.zero_grad(set_to_none=True)
    out = model(b.numbers, b.coord, b.mol_idx, b.n_mol)
    loss = out["passes"]["energy"].float().var() + out["passes"]["charges"].square().mean()
    loss.backward()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_train_step_t3(benchmark, guard, models, s66_batch, backend):
    """Forward T = 3, energy and charge loss on every pass, backward to the parameters."""
    model = models[backend]
    guard.measure(benchmark, f"cpu_backend.train_step_t3[{backend}]",
                  lambda: _train_step(model, s66_batch), rounds=3)
    _keep(benchmark, f"train.{backend}", f"T=3 step, {s66_batch.n_atoms} atoms, {backend}")


#: The matrix products of the MLPs: nn.Linear's forward (addmm) and its backward (mm). The
#: contractions' own products are bmm, counted outside.
MLP_MATMUL_OPS = ("aten::addmm", "aten::mm")


def test_share_outside_mlp_matmuls(benchmark, models, s66_batch):
    """Self CPU time of one T = 3 step on the CPU backend, by operator: the part that is not the
    MLPs' matrix products (goal: at most 25 %)."""
    if benchmark.disabled:
        pytest.skip("a profile, not a timing: only with timings on")
    from torch.profiler import ProfilerActivity, profile
    model = models["cpu"]
    _train_step(model, s66_batch)
    shares = []
    for _ in range(3):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _train_step(model, s66_batch)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        mlp = sum(e.self_cpu_time_total for e in events if e.key in MLP_MATMUL_OPS)
        shares.append(1.0 - mlp / total)
    share = min(shares)
    benchmark.extra_info.update(share_outside_mlp_matmuls=share)
    benchmark.pedantic(lambda: None, rounds=1)
    FIGURES.append(f"T=3 step on the cpu backend: {share:.0%} of the time outside the MLP "
                   f"matrix products (goal ≤ 25 %; min of 3 profiles)")


def _predict_one(model, b):
    """As the predict command: one neighbor search, then energy and forces."""
    return predict_arrays(model, b, forces=True, neighbors=build_neighbors(b.coord, b.mol_idx))


@pytest.mark.parametrize("n_water", [7, 67, 667, pytest.param(6667, marks=pytest.mark.unguarded)])
def test_predict_cost_per_atom(benchmark, guard, models, n_water):
    """One water droplet of 21 … 20,001 atoms: neighbor search, energy and forces (cpu backend)."""
    if n_water > 667 and (icount.in_child() or benchmark.disabled):
        pytest.skip("20,001 atoms: too long for callgrind and for the smoke run")
    numbers, coord = water_cluster(n_water)
    b = Batch.from_molecules([(numbers, coord)])
    model = _frozen(models["cpu"])

    def run():
        return _predict_one(model, b)

    inner = max(1, 600 // b.n_atoms)
    big = n_water > 1000  # 20,001 atoms: ~5 s a call on one thread
    if big and not benchmark.disabled:
        # the first call pays the page faults of ~2.7 GB of fresh memory; the round after is warm
        import time
        t = time.perf_counter()
        run()
        first = time.perf_counter() - t
        MEDIANS["first_call.per_atom"] = first / b.n_atoms
        FIGURES.append(f"predict energy+forces per atom, {b.n_atoms} atoms, first call: "
                       f"{first / b.n_atoms * 1e6:.0f} µs/atom")
    guard.measure(benchmark, f"cpu_backend.predict_cost_per_atom[{b.n_atoms}]", run,
                  rounds=1 if big else 3, warmup_rounds=0 if big else 1, inner=inner)
    if benchmark.disabled:
        return
    t = benchmark.stats.stats.median / inner
    MEDIANS[f"per_atom.{b.n_atoms}"] = t / b.n_atoms
    FIGURES.append(f"predict energy+forces per atom, {b.n_atoms} atoms: "
                   f"{t / b.n_atoms * 1e6:.0f} µs/atom")


@pytest.mark.unguarded
def test_cost_per_atom_flat(benchmark, models):
    """The cost per atom of ``test_predict_cost_per_atom`` at 21, 201 and 2,001 atoms, the three
    alternating in one process round after round (warm), so that the machine's changes of speed
    touch all three alike: per round max/min of the three, the median over the rounds (goal
    ≤ 1.5; the cold 20,001-atom call is set beside them in the figures)."""
    import statistics
    import time
    model = _frozen(models["cpu"])
    sizes = []
    for n_water in (7, 67, 667):
        numbers, coord = water_cluster(n_water)
        b = Batch.from_molecules([(numbers, coord)])

        def run(b=b):
            return _predict_one(model, b)
        sizes.append((b.n_atoms, run, max(1, 600 // b.n_atoms)))
    rounds = 1 if benchmark.disabled else 9
    costs: list[dict[int, float]] = []
    for _ in range(rounds + 1):       # the first round warms up, and is dropped
        per_atom = {}
        for n_atoms, run, inner in sizes:
            t = time.perf_counter()
            for _ in range(inner):
                run()
            per_atom[n_atoms] = (time.perf_counter() - t) / inner / n_atoms
        costs.append(per_atom)
    benchmark.pedantic(lambda: None, rounds=1)
    if benchmark.disabled:
        return
    costs = costs[1:]
    ratio = statistics.median(max(c.values()) / min(c.values()) for c in costs)
    medians = {n: statistics.median(c[n] for c in costs) for n, _, _ in sizes}
    MEDIANS["flat.ratio"] = ratio
    MEDIANS.update({f"flat.{n}": v for n, v in medians.items()})
    FIGURES.append("cost per atom, alternating in one process: " + ", ".join(
        f"{n} atoms {v * 1e6:.0f} µs" for n, v in medians.items())
        + f"; max/min {ratio:.2f} (median of {rounds} rounds, goal ≤ 1.5)")


def teardown_module():
    for what in ("predict", "train"):
        if f"{what}.torch" in MEDIANS and f"{what}.cpu" in MEDIANS:
            FIGURES.append(f"{what}: cpu backend {MEDIANS[f'{what}.torch'] / MEDIANS[f'{what}.cpu']:.2f}× "
                           f"the reference's speed (same run)")
    if "predict.cpu_torch_code" in MEDIANS and "predict.cpu" in MEDIANS:
        ratio = MEDIANS["predict.cpu_torch_code"] / MEDIANS["predict.cpu"]
        FIGURES.append(f"predict: native kernels {ratio:.2f}× the cpu backend's torch code's speed "
                       f"(same run)")
    if "forward.cpu" in MEDIANS and "predict.cpu" in MEDIANS:
        fwd = MEDIANS["forward.cpu"]
        FIGURES.append(f"predict on the cpu backend: backward {(MEDIANS['predict.cpu'] - fwd) / fwd:.2f}× "
                       f"its forward (goal ≤ 1.2)")
    per_atom = [v for k, v in MEDIANS.items() if k.startswith("per_atom.")]
    if len(per_atom) > 1:
        FIGURES.append(f"cost per atom, 21–20,001 atoms: max/min {max(per_atom) / min(per_atom):.2f} "
                       f"(goal ≤ 1.5)")
    if "flat.ratio" in MEDIANS and "per_atom.20001" in MEDIANS:
        warm = [v for k, v in MEDIANS.items() if k.startswith("flat.") and k != "flat.ratio"]
        for what, key in (("the 20,001-atom call", "per_atom.20001"),
                          ("its first call", "first_call.per_atom")):
            big = MEDIANS[key]
            FIGURES.append(f"with {what} ({big * 1e6:.0f} µs/atom): max/min "
                           f"{max(warm + [big]) / min(warm + [big]):.2f}")
    print("\n" + "\n".join(FIGURES))
