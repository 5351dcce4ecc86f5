"""Shared fixtures of the benchmarks: real molecules (read in place from ../shared/data) and the
released model. Throughput figures are attached to each benchmark as extra_info."""
import os
from pathlib import Path

import pytest
import torch

try:
    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread unless asked otherwise: on a small shared machine two OpenMP threads that
# wait on each other's barriers turn a 20 ms operation into 1 s whenever another process runs,
# which no number of rounds averages away. Single-thread figures are also comparable across
# machines with different core counts.
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
# As the trainer does on the CPU: without it, glibc mmaps and page-faults every large activation
# buffer afresh each step, which made figures vary by 20 % between processes.
from aimnet_fast.cpu import tune_allocator  # noqa: E402

tune_allocator()
torch.set_flush_denormal(True)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AIMNET_FAST_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared material not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def s66x8_molecules(shared):
    """All 528 conformers of COMP6 S66x8 (6–34 atoms, H C N O) as (numbers, coord_A) pairs."""
    import h5py
    from aimnet_fast.constants import PERIODIC_TABLE
    mols = []
    with h5py.File(shared / "data" / "comp6_s66x8.h5", "r") as f:
        for name in sorted(f["s66x8"]):
            g = f["s66x8"][name]
            numbers = [PERIODIC_TABLE.index(s.decode()) for s in g["species"][:]]
            for xyz in g["coordinates"][:]:
                mols.append((numbers, torch.as_tensor(xyz)))
    return mols


@pytest.fixture(scope="session")
def released_model(shared):
    from aimnet_fast.checkpoint import convert_released
    d = shared / "aimnet_pretrained"
    m = convert_released(d / "aimnet_cv0.pt", d / "aimnet_mt_cv0.pt")
    m.backend = "torch"
    return m


# -- the throughput-regression guard (see bench/guard.py) -------------------------------------
def pytest_addoption(parser):
    g = parser.getgroup("guard", "throughput-regression guard")
    g.addoption("--guard-update", action="store_true",
                help="write this run's ratios as the baseline of this machine class")
    g.addoption("--guard-threshold", type=float, default=None,
                help="allowed slowdown before a guarded benchmark fails (fraction, default 0.07)")
    g.addoption("--guard-off", action="store_true", help="measure and report, never fail")
    g.addoption("--guard-record", default=None, help="write this run's figures to this JSON file")
    g.addoption("--guard-no-confirm", action="store_true",
                help="fail on the first measurement, without re-measuring in a fresh process")
    g.addoption("--guard-no-icount", action="store_true", help="skip the instruction counts")
    g.addoption("--guard-icount-k", default=None, metavar="EXPR",
                help="count only the benchmarks that pytest's -k EXPR selects")


def pytest_collection_modifyitems(config, items):
    """The instruction counts go last: their two callgrind children keep both cores busy for
    minutes, and no timed benchmark should follow them. In the callgrind children
    (bench/icount.py) only the guarded one-process CPU benchmarks run, and cost per atom up to 300
    atoms (larger clusters only repeat the same work, at minutes each)."""
    import icount
    if not icount.in_child():
        items.sort(key=lambda item: item.name == "test_instruction_counts")  # stable
        return
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        guarded = ("guard" in getattr(item, "fixturenames", ()) and params.get("world", 1) == 1
                   and params.get("n_water", 0) <= 100)
        (keep if guarded and "instruction" not in item.name else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


_GUARD = None


@pytest.fixture(scope="session")
def guard(request):
    global _GUARD
    from guard import DEFAULT_THRESHOLD, Guard
    thr = request.config.getoption("--guard-threshold")
    _GUARD = Guard(update=request.config.getoption("--guard-update"),
                   threshold=DEFAULT_THRESHOLD if thr is None else thr,
                   off=request.config.getoption("--guard-off"),
                   confirm=not request.config.getoption("--guard-no-confirm"))
    return _GUARD


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _GUARD is None or not (_GUARD.results or _GUARD.icounts):
        return
    terminalreporter.section(f"throughput guard ({_GUARD.machine})")
    terminalreporter.write_line(_GUARD.report())
    if config.getoption("--guard-record"):
        _GUARD.write_record(config.getoption("--guard-record"))
    if _GUARD.update:
        path = _GUARD.write_baseline()
        terminalreporter.write_line(f"baseline written: {path}")
