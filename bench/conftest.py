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


# -- the throughput-regression guard (bench/guard.py, bench/guard_ab.py) --------------------------
def pytest_addoption(parser):
    g = parser.getgroup("guard", "throughput-regression guard")
    g.addoption("--guard-base", default=None, metavar="REV",
                help="the commit to compare time with (default: the one bench/baselines/base.json names)")
    g.addoption("--guard-processes", type=int, default=3,
                help="processes per side and round of the side-by-side time comparison (default 3)")
    g.addoption("--guard-confirm-processes", type=int, default=None,
                help="fresh processes per side for a benchmark over the threshold (default 4 × "
                     "--guard-processes)")
    g.addoption("--guard-threshold", type=float, default=None,
                help="allowed slowdown before a guarded benchmark fails (fraction, default 0.07)")
    g.addoption("--guard-off", action="store_true",
                help="time every benchmark in this process and report; compare nothing")
    g.addoption("--guard-record", default=None, help="write this run's figures to this JSON file")
    g.addoption("--guard-no-confirm", action="store_true",
                help="fail on the first comparison, without measuring again in fresh processes")
    g.addoption("--guard-no-icount", action="store_true", help="skip the instruction counts")
    g.addoption("--guard-icount-k", default=None, metavar="EXPR",
                help="count only the benchmarks that pytest's -k EXPR selects")
    g.addoption("--guard-child", action="store_true",
                help="(internal) one side's process of the time comparison: time and record")


_GUARD = None
_AB = None
_AB_USED = False
_OUTCOMES: dict[str, dict] = {}


def get_guard(config):
    global _GUARD
    if _GUARD is None:
        from guard import DEFAULT_THRESHOLD, Guard
        thr = config.getoption("--guard-threshold")
        _GUARD = Guard(threshold=DEFAULT_THRESHOLD if thr is None else thr)
    return _GUARD


@pytest.fixture(scope="session")
def guard(request):
    return get_guard(request.config)


def is_guarded(item) -> bool:
    """A guarded benchmark: it takes the ``guard`` fixture and is not marked ``unguarded`` (a figure
    that is reported, not judged: a single long round, or a side of a ratio)."""
    return ("guard" in getattr(item, "fixturenames", ()) and "instruction" not in item.name
            and item.get_closest_marker("unguarded") is None)


def pytest_configure(config):
    config.addinivalue_line("markers", "unguarded: a benchmark timed and reported, never judged")


def _compares_time(config) -> bool:
    import icount
    return not (config.getoption("--guard-off") or config.getoption("--guard-child")
                or config.getoption("--benchmark-disable") or icount.in_child())


class SideBySide(pytest.Item):
    """A guarded benchmark in the parent session: its verdict comes from bench/guard_ab.py, which
    runs it in separate processes of both trees (the first of these items starts them all)."""

    def __init__(self, *, nodeid_in_tree: str, where: tuple, **kw):
        super().__init__(**kw)
        self.nodeid_in_tree = nodeid_in_tree
        self.where = where  # the benchmark's own (path, line, name): skips are reported there

    def runtest(self):
        global _AB_USED
        _AB_USED = True
        v = _AB.verdict(self.nodeid_in_tree)
        if v.status == "skip":
            pytest.skip(v.message)
        if v.status == "fail":
            raise SideBySideFailure(v.message)
        self.add_report_section("call", "guard", v.message)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, SideBySideFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.where


class SideBySideFailure(AssertionError):
    pass


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The instruction counts go last: their two callgrind children keep both cores busy for
    minutes, and no timed benchmark should follow them. In the callgrind children
    (bench/icount.py) only the guarded one-process CPU benchmarks run, and cost per atom up to 300
    atoms (larger clusters only repeat the same work, at minutes each). In a run that compares time,
    each guarded benchmark becomes a SideBySide item (runs last = after -k and -m deselection)."""
    global _AB
    import icount
    if icount.in_child():
        keep, drop = [], []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            ok = is_guarded(item) and params.get("world", 1) == 1 and params.get("n_water", 0) <= 100
            (keep if ok else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
        return
    items.sort(key=lambda item: item.name == "test_instruction_counts")  # stable
    if not _compares_time(config):
        return
    from guard import DEFAULT_THRESHOLD, load_baseline
    from guard_ab import ABRun, BaseTree, GuardSetupError
    swapped = []
    for k, item in enumerate(items):
        if not is_guarded(item):
            continue
        rel = item.path.resolve().relative_to(REPO).as_posix() + "::" + item.name
        items[k] = SideBySide.from_parent(item.parent, name=item.name, nodeid_in_tree=rel,
                                          where=item.reportinfo())
        items[k].own_markers.extend(item.own_markers)  # skipif of the benchmark holds here too
        swapped.append(rel)
    if not swapped:
        return
    thr = config.getoption("--guard-threshold")
    rev = config.getoption("--guard-base") or load_baseline().get("commit")
    try:
        if not rev:
            raise GuardSetupError("bench/baselines/base.json names no base commit: give --guard-base REV")
        base = BaseTree(rev)
    except GuardSetupError as e:
        _AB = _Unavailable(str(e))
        return
    _AB = ABRun(base, swapped, processes=config.getoption("--guard-processes"),
                threshold=DEFAULT_THRESHOLD if thr is None else thr,
                confirm=not config.getoption("--guard-no-confirm"),
                confirm_processes=config.getoption("--guard-confirm-processes"))


class _Unavailable:
    """No comparison possible (not a git checkout, unknown base): each guarded benchmark fails
    with the reason, since a guard that silently compares nothing would pass every slowdown."""

    def __init__(self, why: str):
        self.why = why

    def verdict(self, nodeid):
        from guard_ab import Verdict
        return Verdict("fail", f"time not compared: {self.why}")

    def table(self):
        return f"  time not compared: {self.why}"

    def record(self):
        return {"error": self.why}


def pytest_runtest_logreport(report):
    """A child's outcome of each test, for the parent (bench/guard_ab.py)."""
    seen = _OUTCOMES.setdefault(report.nodeid, {"outcome": "passed", "message": ""})
    if report.failed and seen["outcome"] != "failed":
        seen.update(outcome="failed", message=report.longreprtext[-2000:])
    elif report.skipped and seen["outcome"] == "passed":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        seen.update(outcome="skipped", message=reason)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    guard = _GUARD
    record = config.getoption("--guard-record")
    if config.getoption("--guard-child"):
        if record:
            from guard import project_modules
            try:  # so that the kernels' provenance is checked even where no benchmark used them
                import aimnet_fast.kernels  # noqa: F401
            except ImportError:
                pass
            get_guard(config).write_record(record, outcomes=_OUTCOMES, modules=project_modules(REPO))
        return
    ab = _AB if _AB_USED else None
    if ab is None and (guard is None or not (guard.results or guard.icounts)):
        return
    terminalreporter.section(f"throughput guard ({get_guard(config).machine})")
    if ab is not None:
        terminalreporter.write_line(ab.table())
    if guard is not None and (guard.results or guard.icounts):
        terminalreporter.write_line(get_guard(config).report())
    if record:
        get_guard(config).write_record(record, side_by_side=ab.record() if ab is not None else None)
