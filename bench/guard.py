"""The throughput-regression guard behind ``pytest bench/``.

Absolute times on shared machines drift by tens of percent between runs, so the guard never compares
them. Every guarded benchmark is timed in rounds, and before each round (untimed, through
pytest-benchmark's ``setup`` hook) the guard times a fixed calibration workload: a float32 matrix
product, a gather, a scatter-add and transcendental functions, the same kinds of work as a training
step. The guarded figure is

    ratio = min over rounds (benchmark time) / min over rounds (calibration time)

Minima, because interference from other processes only ever adds time; interleaving, because a
slow phase of the machine then slows both sides. The ratio is compared with the committed baseline of
the same machine class (``bench/baselines/<class>.json``); the test fails, naming itself and the
factor, when the ratio exceeds ``baseline × (1 + threshold)``.

Options (``pytest bench/ ...``):
  --guard-update          write this run's ratios as the new baseline of this machine class
  --guard-threshold=0.07  allowed slowdown before failing (fraction)
  --guard-off             measure and report, never fail (CI's smoke run uses --benchmark-disable)
  --guard-record=PATH     also write this run's ratios to PATH (JSON)

Refreshing the baseline after an intended change: ``python bench/update_baseline.py`` runs the
suite several times and commits the median ratio of each benchmark, with the machine, the torch and
triton versions and the date (``pytest bench/ --guard-update`` does the same from one run).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

import torch

BASELINE_DIR = Path(__file__).resolve().parent / "baselines"
DEFAULT_THRESHOLD = 0.07
#: A benchmark whose baseline runs spread by s fails only beyond max(threshold, SPREAD_FACTOR × s).
SPREAD_FACTOR = 1.25


def machine_class() -> str:
    """CPU runs are grouped by architecture and core count, GPU runs by the device's name."""
    if torch.cuda.is_available():
        return "cuda-" + torch.cuda.get_device_name().replace(" ", "_")
    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


def versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except ImportError:  # pragma: no cover
        tv = None
    return {"torch": torch.__version__, "triton": tv, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}


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
    def __init__(self, update: bool, threshold: float, off: bool):
        self.update = update
        self.threshold = threshold
        self.off = off
        self.machine = machine_class()
        self.path = BASELINE_DIR / f"{self.machine}.json"
        self.baseline = json.loads(self.path.read_text()) if self.path.exists() else None
        self.results: dict[str, dict] = {}
        self._calibrations: dict[str, Calibration] = {}

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
        self.judge(name, ratio)
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

    def judge(self, name: str, ratio: float) -> None:
        ref = (self.baseline or {}).get("benchmarks", {}).get(name)
        if ref is None:
            return
        factor = ratio / ref["ratio"]
        self.results[name]["factor"] = factor
        if self.update or self.off:
            return
        limit = self.limit(ref)
        if factor > 1.0 + limit:
            raise AssertionError(
                f"throughput regression in {name}: {factor:.3f}× the baseline time "
                f"(ratio to calibration {ratio:.4g} vs {ref['ratio']:.4g} in "
                f"{self.path.name}, threshold {1 + limit:.3f}×)")

    def limit(self, ref: dict) -> float:
        """The allowed slowdown of one benchmark: the threshold, or more where the baseline runs
        themselves spread wider (a benchmark never fails on its own measured noise)."""
        return max(self.threshold, SPREAD_FACTOR * ref.get("spread", 0.0))

    def write_baseline(self, runs: list[dict] | None = None) -> Path:
        """Write the baseline of this machine class: the median ratio over ``runs`` (each a
        name → ratio dict; default this run alone) and each benchmark's run-to-run spread
        (max / min − 1)."""
        runs = runs or [{k: v["ratio"] for k, v in self.results.items()}]
        names = sorted(set().union(*runs))
        bench = {}
        for name in names:
            r = sorted(run[name] for run in runs if name in run)
            bench[name] = {"ratio": r[len(r) // 2] if len(r) % 2 else 0.5 * (r[len(r) // 2 - 1] + r[len(r) // 2]),
                           "spread": r[-1] / r[0] - 1.0, "runs": len(r)}
        BASELINE_DIR.mkdir(exist_ok=True)
        data = {"machine": self.machine, **versions(),
                "date": _dt.date.today().isoformat(), "threshold": self.threshold,
                "benchmarks": bench}
        self.path.write_text(json.dumps(data, indent=1) + "\n")
        return self.path

    def write_record(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({k: v["ratio"] for k, v in self.results.items()}, indent=1))

    def report(self) -> str:
        rows = []
        for name, r in sorted(self.results.items()):
            f = r.get("factor")
            ref = (self.baseline or {}).get("benchmarks", {}).get(name)
            rows.append(f"  {name:<40s} {r['min_s'] * 1e3:9.2f} ms / cal {r['cal_s'] * 1e3:6.2f} ms"
                        f" = ratio {r['ratio']:9.4g}"
                        + (f"  {f:6.3f}× baseline (limit {1 + self.limit(ref):.3f}×)"
                           if f is not None else "  (no baseline)"))
        return "\n".join(rows)
