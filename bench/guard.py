"""The throughput-regression guard behind ``pytest bench/``: two figures per guarded benchmark.

1. Time, side by side with a base commit in the same run (bench/guard_ab.py). The guarded
   benchmarks run in separate processes, alternately from the working tree and from a worktree of
   the base commit (by default the one ``bench/baselines/base.json`` names); a benchmark fails when
   its time is over ``DEFAULT_THRESHOLD`` of the base's, and again so in fresh processes. No figure
   recorded on another machine is compared with, so a fresh clone, a new CI machine or a user's own
   box needs no baseline of its own.

2. Instructions executed, counted by callgrind (bench/icount.py, bench/test_bench_instructions.py;
   where valgrind is installed). Independent of the machine's load, so the limit is a few percent:
   every regression that adds work is caught however noisy the machine is. The committed counts
   hold for the library builds they were counted with (``builds()``); where this machine's builds
   differ, the base commit is counted in the same run instead.

Options (``pytest bench/ ...``):
  --guard-base=REV        the base commit (default: the one bench/baselines/base.json names)
  --guard-processes=3     processes per side and round of the time comparison
  --guard-confirm-processes=N  fresh processes per side for a suspect (default 4 × processes)
  --guard-threshold=0.07  allowed slowdown in time before failing (fraction)
  --guard-off             time every benchmark in this process, report, never fail (the figures
                          of bench/RESULTS.md; CI's smoke run uses --benchmark-disable)
  --guard-record=PATH     also write this run's figures to PATH (JSON)
  --guard-no-confirm      fail on the first comparison (no fresh-process re-measurement)
  --guard-no-icount       skip the instruction counts

Naming a new base after an intended change: ``python bench/update_baseline.py`` on a clean tree
writes HEAD as the base, with the instruction counts of this machine's builds.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import icount

BENCH_DIR = Path(__file__).resolve().parent
BASELINE = BENCH_DIR / "baselines" / "base.json"
#: Allowed slowdown in time, ours against the base measured in the same run.
DEFAULT_THRESHOLD = 0.07
#: Allowed growth of a benchmark's instruction count; counts repeat to ~0.02 %, so a few percent is
#: far above noise and far below the 10 % a user would call a slowdown.
ICOUNT_THRESHOLD = 0.03
#: A committed count whose runs spread by s allows max(ICOUNT_THRESHOLD, ICOUNT_SPREAD_FACTOR × s).
ICOUNT_SPREAD_FACTOR = 3.0


def machine_class() -> str:
    """CPU runs are grouped by architecture and core count, GPU runs by the device's name."""
    if torch.cuda.is_available():
        return "cuda-" + torch.cuda.get_device_name().replace(" ", "_")
    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    """What the figures depend on besides our code: a baseline is only comparable where these
    match. Between two sessions on VMs of this class, each with a fresh install, some time ratios
    moved by 15–30 % (bench/RESULTS.md)."""
    import numpy
    try:
        import triton
        tv = triton.__version__
    except ImportError:  # pragma: no cover
        tv = None
    return {"torch": torch.__version__, "triton": tv, "numpy": numpy.__version__,
            "python": platform.python_version(), "processor": _cpu_model(), "cpus": os.cpu_count()}




def builds() -> dict:
    """What an instruction count depends on besides our code: the Python, torch and numpy builds,
    the C library, valgrind (which decides the CPU features the children see) and the architecture.
    Committed counts are compared only where all of these match."""
    import numpy
    vg = None
    if shutil.which("valgrind"):
        r = subprocess.run(["valgrind", "--version"], capture_output=True, text=True)
        vg = r.stdout.strip() or None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "libc": "-".join(platform.libc_ver()),
            "valgrind": vg, "arch": platform.machine()}


def load_baseline() -> dict:
    return json.loads(BASELINE.read_text()) if BASELINE.exists() else {}


class Guard:
    """One session's figures. In this process it only times and records (``measure``); judging
    time is bench/guard_ab.py's, judging instruction counts is ``judge_icounts``."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        self.threshold = threshold
        self.machine = machine_class()
        self.baseline = load_baseline()
        self.results: dict[str, dict] = {}
        self.icounts: dict[str, dict] = {}
        # Inside the callgrind child (bench/icount.py) workloads are counted, not timed.
        self.counter = icount.Counter() if icount.in_child() else None

    def measure(self, benchmark, name: str, fn, rounds: int, device: str = "cpu",
                warmup_rounds: int = 1, inner: int = 1):
        """Time ``fn`` with pytest-benchmark: ``rounds`` rounds of ``inner`` calls (so that a round
        of a short workload lasts long enough, tens of ms, for timer and scheduler jitter not to
        matter); stats are per round. ``device`` is where ``fn`` runs (kept for the record)."""
        if self.counter is not None:
            return self.counter.measure(name, fn)
        if inner > 1:
            one = fn

            def fn():
                for _ in range(inner):
                    out = one()
                return out

        result = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup_rounds)
        if benchmark.disabled:
            return result
        data = benchmark.stats.stats.data
        self.results[name] = {"min_s": min(data), "median_s": benchmark.stats.stats.median,
                              "rounds": len(data), "inner": inner, "device": device,
                              "nodeid": benchmark.fullname}
        return result

    def measure_cuda(self, benchmark, fn, rounds: int = 20, inner: int = 5):
        """GPU benchmarks: one untimed call (compilation, autotuning), then ``rounds`` rounds of
        ``inner`` synchronized calls, under the name ``gpu.<test name>``. Returns the median time
        of one call (s), None when disabled."""
        def one():
            fn()
            torch.cuda.synchronize()

        one()
        self.measure(benchmark, f"gpu.{benchmark.name}", one, rounds=rounds, device="cuda",
                     inner=inner, warmup_rounds=2)
        return None if benchmark.disabled else benchmark.stats.stats.median / inner

    # -- instruction counts (bench/icount.py) ---------------------------------------------------
    def committed_counts(self) -> tuple[dict, str]:
        """The committed counts, and '' when they hold for this machine's builds, else how the
        builds differ."""
        inst = self.baseline.get("instructions", {})
        now, then = builds(), inst.get("builds", {})
        diffs = [f"{k} {then.get(k)} → {v}" for k, v in now.items() if then.get(k) != v]
        return inst.get("counts", {}), ", ".join(diffs)

    @staticmethod
    def icount_limit(ref: dict) -> float:
        return max(ICOUNT_THRESHOLD, ICOUNT_SPREAD_FACTOR * ref.get("spread", 0.0))

    def judge_icounts(self, counts: dict[str, int], reference: dict[str, dict],
                      against: str) -> list[str]:
        """Record this run's counts; return one message per benchmark over its limit.
        ``reference``: name → {"count", "spread"}; ``against``: what it is (named in messages)."""
        failures = []
        for name, n in sorted(counts.items()):
            ref = reference.get(name)
            self.icounts[name] = {"count": n}
            if ref is None:
                continue
            factor = n / ref["count"]
            self.icounts[name]["factor"] = factor
            self.icounts[name]["limit"] = self.icount_limit(ref)
            if factor > 1.0 + self.icount_limit(ref):
                failures.append(
                    f"instruction-count regression in {name}: {factor:.3f}× the count of {against} "
                    f"({n:,} vs {ref['count']:,} instructions per call, "
                    f"threshold {1 + self.icount_limit(ref):.3f}×)")
        return failures

    # -- records --------------------------------------------------------------------------------
    @staticmethod
    def spread(values: list[float]) -> float:
        """Run-to-run spread, max / min − 1; from five runs on, of the runs left after dropping the
        fastest and the slowest."""
        r = sorted(values)
        if len(r) >= 5:
            r = r[1:-1]
        return r[-1] / r[0] - 1.0

    def write_record(self, path: str | Path, **extra) -> None:
        Path(path).write_text(json.dumps(
            {"machine": self.machine, **versions(), "date": _dt.date.today().isoformat(),
             "times": self.results, "instructions": {k: v["count"] for k, v in self.icounts.items()},
             **extra}, indent=1))

    def report(self) -> str:
        rows = []
        for name, r in sorted(self.results.items()):
            rows.append(f"  {name:<44s} min {r['min_s'] * 1e3:9.2f} ms  median {r['median_s'] * 1e3:9.2f} ms"
                        f"  ({r['rounds']} rounds of {r['inner']})")
        for name, r in sorted(self.icounts.items()):
            f = r.get("factor")
            rows.append(f"  {'icount ' + name:<44s} {r['count']:>15,} instructions"
                        + (f"  {f:6.3f}× (limit {1 + r['limit']:.3f}×)" if f is not None
                           else "  (no reference count)"))
        return "\n".join(rows)


def project_modules(root: Path) -> dict[str, str]:
    """name → file of every loaded module of the project, or under ``root`` (a child's record:
    bench/guard_ab.py checks that each lies in the child's own tree)."""
    from guard_ab import PROJECT_PREFIXES
    out = {}
    root = root.resolve()
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if not f:
            continue
        p = Path(f).resolve()
        if name.startswith(PROJECT_PREFIXES) or p.is_relative_to(root):
            out[name] = str(p)
    return out
