"""The throughput-regression guard behind ``pytest bench/``: two figures per guarded benchmark.

1. Time against a calibration workload. Absolute times on shared machines drift by tens of percent
   between runs, so the guard never compares them. Every guarded benchmark is timed in rounds, and
   before each round (untimed, through pytest-benchmark's ``setup`` hook) the guard times a fixed
   calibration workload: a float32 matrix product, a gather, a scatter-add and transcendental
   functions, the same kinds of work as a training step. The guarded figure is

       ratio = min over rounds (benchmark time) / min over rounds (calibration time)

   Minima, because interference from other processes only ever adds time; interleaving, because a
   slow phase of the machine then slows both sides. The ratio is compared with the committed
   baseline of the same machine class (``bench/baselines/<class>.json``). A benchmark over its limit
   is measured once more in a fresh process (``pytest <its node id>``), since what remains of the
   noise after taking minima is mostly per process (memory layout, the neighbour's load); it fails,
   naming itself and both factors, only when the fresh process is over the limit too.

2. Instructions executed, counted by callgrind (bench/icount.py, bench/test_bench_instructions.py;
   where valgrind is installed). Independent of the machine's load, so the limit is a few percent:
   every regression that adds work is caught however noisy the machine is. A slowdown that executes
   the same instructions more slowly (cache misses, layout) is seen by the time figure only.

Options (``pytest bench/ ...``):
  --guard-update          write this run's figures as the new baseline of this machine class
  --guard-threshold=0.07  allowed slowdown in time before failing (fraction)
  --guard-off             measure and report, never fail (CI's smoke run uses --benchmark-disable)
  --guard-record=PATH     also write this run's figures to PATH (JSON)
  --guard-no-confirm      fail on the first measurement (no fresh-process re-measurement)
  --guard-no-icount       skip the instruction counts

Refreshing the baseline after an intended change: ``python bench/update_baseline.py`` runs the
suite several times and commits the median ratio and instruction count of each benchmark, with
their run-to-run spread, the machine, the torch and triton versions and the date
(``pytest bench/ --guard-update`` does the same from one run).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import icount

BENCH_DIR = Path(__file__).resolve().parent
BASELINE_DIR = BENCH_DIR / "baselines"
DEFAULT_THRESHOLD = 0.07
#: A benchmark whose baseline runs spread by s fails only beyond max(threshold, SPREAD_FACTOR × s).
SPREAD_FACTOR = 1.25
#: Allowed growth of a benchmark's instruction count; counts repeat to ~0.1 %, so a few percent is
#: far above noise and far below the 10 % a user would call a slowdown.
ICOUNT_THRESHOLD = 0.03
#: As SPREAD_FACTOR, for the (much smaller) run-to-run spread of instruction counts.
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


class Calibration:
    """A fixed mixed workload, about 10 ms on a 2-core CPU."""

    def __init__(self, device: str = "cpu"):
        g = torch.Generator().manual_seed(0)
        scale = 4 if device == "cuda" else 1
        self.a = torch.randn(256 * scale, 512, generator=g).to(device)
        self.w = torch.randn(512, 512, generator=g).to(device)
        n = 200_000 * scale
        self.idx = torch.randint(0, n // 16, (n,), generator=g).to(device)
        self.x = torch.randn(n, generator=g).to(device)
        self.device = device

    def run(self) -> None:
        y = torch.nn.functional.elu(self.a @ self.w)
        z = torch.exp(-self.x[self.idx].square())
        s = torch.zeros(self.x.numel() // 16, device=self.device).index_add_(0, self.idx, z)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return y, s

    def time(self) -> float:
        t = time.perf_counter()
        self.run()
        return time.perf_counter() - t


class Guard:
    def __init__(self, update: bool, threshold: float, off: bool, confirm: bool = True):
        self.update = update
        self.threshold = threshold
        self.off = off
        self.confirm = confirm
        self.machine = machine_class()
        self.path = BASELINE_DIR / f"{self.machine}.json"
        self.baseline = json.loads(self.path.read_text()) if self.path.exists() else None
        self.results: dict[str, dict] = {}
        self.icounts: dict[str, dict] = {}
        self._calibrations: dict[str, Calibration] = {}
        # Inside the callgrind child (bench/icount.py) workloads are counted, not timed.
        self.counter = icount.Counter() if icount.in_child() else None

    def calibration(self, device: str) -> Calibration:
        if device not in self._calibrations:
            cal = Calibration(device)
            for _ in range(3):
                cal.run()
            self._calibrations[device] = cal
        return self._calibrations[device]

    def measure(self, benchmark, name: str, fn, rounds: int, device: str = "cpu",
                warmup_rounds: int = 1, inner: int = 1):
        """Time ``fn`` with pytest-benchmark, a calibration before each round; then judge.

        ``inner`` calls of ``fn`` make one round, so that a round of a short workload lasts long
        enough (tens of ms) for timer and scheduler jitter not to matter; stats are per round."""
        if self.counter is not None:
            return self.counter.measure(name, fn)
        cal = self.calibration(device)
        if inner > 1:
            one = fn

            def fn():
                for _ in range(inner):
                    out = one()
                return out
        cal_times: list[float] = []

        def setup():
            cal_times.append(min(cal.time(), cal.time()))

        result = benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds)
        if benchmark.disabled:
            return result
        t_min = min(benchmark.stats.stats.data)
        ratio = t_min / min(cal_times)
        benchmark.extra_info.update(guard_ratio=ratio, calibration_s=min(cal_times))
        self.results[name] = {"ratio": ratio, "min_s": t_min, "cal_s": min(cal_times),
                              "median_s": benchmark.stats.stats.median}
        self.judge(name, ratio, benchmark.fullname)
        return result

    def measure_cuda(self, benchmark, fn, rounds: int = 20, inner: int = 5):
        """GPU benchmarks: one untimed call (compilation, autotuning), then ``rounds`` rounds of
        ``inner`` synchronized calls, judged like the CPU ones under the name
        ``gpu.<test name>``. Returns the median time of one call (s), None when disabled."""
        import torch

        def one():
            fn()
            torch.cuda.synchronize()

        one()
        self.measure(benchmark, f"gpu.{benchmark.name}", one, rounds=rounds, device="cuda",
                     inner=inner, warmup_rounds=2)
        return None if benchmark.disabled else benchmark.stats.stats.median / inner

    def drift(self) -> str:
        """How this environment differs from the baseline's ('' when it does not)."""
        now = versions()
        diffs = [f"{k} {self.baseline.get(k)} → {v}" for k, v in now.items()
                 if self.baseline and k in self.baseline and self.baseline[k] != v]
        return ", ".join(diffs)

    def _ref(self, section: str, name: str) -> dict | None:
        return (self.baseline or {}).get(section, {}).get(name)

    def judge(self, name: str, ratio: float, nodeid: str | None = None) -> None:
        ref = self._ref("benchmarks", name)
        if ref is None:
            return
        factor = ratio / ref["ratio"]
        self.results[name]["factor"] = factor
        if self.update or self.off:
            return
        limit = self.limit(ref)
        if factor <= 1.0 + limit:
            return
        again = self.remeasure(nodeid, name) if (self.confirm and nodeid) else None
        if again is not None:
            self.results[name]["confirm_factor"] = again / ref["ratio"]
            if again / ref["ratio"] <= 1.0 + limit:
                return
        confirmed = (f"; {again / ref['ratio']:.3f}× again in a fresh process" if again is not None
                     else "")
        drift = self.drift()
        raise AssertionError(
            f"throughput regression in {name}: {factor:.3f}× the baseline time{confirmed} "
            f"(ratio to calibration {ratio:.4g} vs {ref['ratio']:.4g} in "
            f"{self.path.name}, threshold {1 + limit:.3f}×)"
            + (f"; the baseline was recorded with {drift}: if that change is intended, refresh it "
               f"with python bench/update_baseline.py" if drift else ""))

    def remeasure(self, nodeid: str, name: str) -> float | None:
        """The ratio of ``name`` measured by ``pytest <nodeid>`` in a fresh process (guard off);
        None when that run failed or did not measure it."""
        with tempfile.TemporaryDirectory(prefix="aimnet_fast_guard_") as tmp:
            rec = Path(tmp) / "record.json"
            cmd = [sys.executable, "-m", "pytest", nodeid, "-q", "-p", "no:cacheprovider",
                   "--guard-off", "--guard-no-icount", f"--guard-record={rec}"]
            r = subprocess.run(cmd, cwd=BENCH_DIR.parent, capture_output=True, text=True)
            if r.returncode != 0 or not rec.exists():
                return None
            return json.loads(rec.read_text())["ratios"].get(name)

    def limit(self, ref: dict) -> float:
        """The allowed slowdown of one benchmark: the threshold, or more where the baseline runs
        themselves spread wider (a benchmark never fails on its own measured noise)."""
        return max(self.threshold, SPREAD_FACTOR * ref.get("spread", 0.0))

    # -- instruction counts (bench/icount.py) ---------------------------------------------------
    @staticmethod
    def icount_limit(ref: dict) -> float:
        return max(ICOUNT_THRESHOLD, ICOUNT_SPREAD_FACTOR * ref.get("spread", 0.0))

    def judge_icounts(self, counts: dict[str, int]) -> list[str]:
        """Record this run's instruction counts; return one message per benchmark over its limit."""
        failures = []
        for name, n in sorted(counts.items()):
            ref = self._ref("instructions", name)
            self.icounts[name] = {"count": n}
            if ref is None:
                continue
            factor = n / ref["count"]
            self.icounts[name]["factor"] = factor
            if factor > 1.0 + self.icount_limit(ref):
                failures.append(
                    f"instruction-count regression in {name}: {factor:.3f}× the baseline count "
                    f"({n:,} vs {ref['count']:,} instructions per call in {self.path.name}, "
                    f"threshold {1 + self.icount_limit(ref):.3f}×)")
        return failures

    # -- baselines and records ------------------------------------------------------------------
    @staticmethod
    def spread(values: list[float]) -> float:
        """Run-to-run spread, max / min − 1; from five runs on, of the runs left after dropping the
        fastest and the slowest. A single odd process must not widen a limit for good: at check
        time it is caught by the re-measurement in a fresh process instead."""
        r = sorted(values)
        if len(r) >= 5:
            r = r[1:-1]
        return r[-1] / r[0] - 1.0

    @classmethod
    def _summarise(cls, runs: list[dict], key: str) -> dict:
        """name → {key: median over runs, spread, runs: how many, all: every run's value}."""
        out = {}
        for name in sorted(set().union(*runs)):
            r = sorted(run[name] for run in runs if name in run)
            mid = r[len(r) // 2] if len(r) % 2 else 0.5 * (r[len(r) // 2 - 1] + r[len(r) // 2])
            out[name] = {key: mid, "spread": cls.spread(r), "runs": len(r),
                         "all": [round(run[name], 5) for run in runs if name in run]}
        return out

    def write_baseline(self, runs: list[dict] | None = None,
                       icount_runs: list[dict] | None = None) -> Path:
        """Write the baseline of this machine class: the median ratio over ``runs`` (each a
        name → ratio dict; default this run alone) and the median instruction count over
        ``icount_runs`` (name → count; default this run's, if it counted), each with its run-to-run
        spread (``Guard.spread``) and every run's figure. A section with no new runs keeps its
        committed figures."""
        runs = runs if runs is not None else (
            [{k: v["ratio"] for k, v in self.results.items()}] if self.results else [])
        icount_runs = icount_runs if icount_runs is not None else (
            [{k: v["count"] for k, v in self.icounts.items()}] if self.icounts else [])
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        data = {"machine": self.machine, **versions(), "date": _dt.date.today().isoformat(),
                "threshold": self.threshold, "icount_threshold": ICOUNT_THRESHOLD,
                "benchmarks": self._summarise(runs, "ratio") if runs else old.get("benchmarks", {}),
                "instructions": ({k: {**v, "count": int(v["count"]), "all": [int(x) for x in v["all"]]}
                                  for k, v in self._summarise(icount_runs, "count").items()}
                                 if icount_runs else old.get("instructions", {}))}
        BASELINE_DIR.mkdir(exist_ok=True)
        self.path.write_text(json.dumps(data, indent=1) + "\n")
        return self.path

    def write_record(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(
            {"ratios": {k: v["ratio"] for k, v in self.results.items()},
             "instructions": {k: v["count"] for k, v in self.icounts.items()}}, indent=1))

    def report(self) -> str:
        rows = []
        for name, r in sorted(self.results.items()):
            f = r.get("factor")
            ref = self._ref("benchmarks", name)
            again = (f", {r['confirm_factor']:.3f}× in a fresh process"
                     if "confirm_factor" in r else "")
            rows.append(f"  {name:<40s} {r['min_s'] * 1e3:9.2f} ms / cal {r['cal_s'] * 1e3:6.2f} ms"
                        f" = ratio {r['ratio']:9.4g}"
                        + (f"  {f:6.3f}× baseline (limit {1 + self.limit(ref):.3f}×){again}"
                           if f is not None else "  (no baseline)"))
        for name, r in sorted(self.icounts.items()):
            f = r.get("factor")
            ref = self._ref("instructions", name)
            rows.append(f"  {'icount ' + name:<40s} {r['count']:>15,} instructions"
                        + (f"  {f:6.3f}× baseline (limit {1 + self.icount_limit(ref):.3f}×)"
                           if f is not None else "  (no baseline)"))
        drift = self.drift()
        if drift:
            rows.insert(0, f"  baseline recorded with {drift}")
        return "\n".join(rows)
