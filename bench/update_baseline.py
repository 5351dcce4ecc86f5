"""Refresh the guard's baseline for this machine class after an intended change.

    python bench/update_baseline.py [--runs 7] [--icount-runs 2] [pytest args ...]

Runs ``pytest bench/ --guard-no-icount`` ``--runs`` times with the guard off, then the
instruction counts (bench/test_bench_instructions.py) ``--icount-runs`` times, and writes the median
time ratio and the median instruction count of each benchmark, with their run-to-run spreads and
every run's figure, to ``bench/baselines/<machine class>.json``, together with the machine, the
torch, numpy, triton and Python versions and the date. Commit that file, and copy the spreads into
bench/RESULTS.md (``python bench/guard_table.py`` writes the table).

Each benchmark's time limit widens with its spread (bench/guard.py: max(threshold, 1.25 × spread),
the spread taken without the fastest and the slowest run from five runs on), so more runs give an
honest spread.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from guard import DEFAULT_THRESHOLD, Guard  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=7, help="timed runs of pytest bench/")
    p.add_argument("--icount-runs", type=int, default=2,
                   help="instruction-count runs (0: keep the committed counts)")
    p.add_argument("--records", default=None,
                   help="folder for every run's figures (default: a new temporary folder, kept)")
    p.add_argument("--from-records", nargs="+", default=None, metavar="JSON",
                   help="run nothing: summarise these --guard-record files (earlier refreshes, check "
                        "runs of pytest bench/ on the same tree) into the baseline")
    args, rest = p.parse_known_args(argv)
    if args.from_records:
        runs, icount_runs = [], []
        for path in args.from_records:
            data = json.loads(Path(path).read_text())
            if data["ratios"]:
                runs.append(data["ratios"])
            if data["instructions"]:
                icount_runs.append(data["instructions"])
        return write(runs, icount_runs, ", ".join(args.from_records))
    records = Path(args.records or tempfile.mkdtemp(prefix="aimnet_fast_baseline_"))
    records.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--guard-off"]
    plan = ([(f"time{k}", [str(HERE), "--guard-no-icount"]) for k in range(args.runs)]
            + [(f"icount{k}", [str(HERE / "test_bench_instructions.py")]) for k in range(args.icount_runs)])
    runs, icount_runs = [], []
    for k, (tag, what) in enumerate(plan):
        rec = records / f"{tag}.json"
        cmd = [*base, *what, f"--guard-record={rec}", *rest]
        print(f"run {k + 1}/{len(plan)}: {' '.join(cmd)}", flush=True)
        r = subprocess.run(cmd, cwd=HERE.parent)
        if r.returncode != 0:
            sys.exit(f"pytest failed (exit {r.returncode}); baseline not written")
        data = json.loads(rec.read_text())
        if tag.startswith("time"):
            runs.append(data["ratios"])
        elif data["instructions"]:
            icount_runs.append(data["instructions"])
    if args.icount_runs and not icount_runs:
        print("no instruction counts (valgrind missing?): the committed counts are kept")
    write(runs, icount_runs, str(records))


def write(runs: list[dict], icount_runs: list[dict], records: str) -> None:
    g = Guard(update=True, threshold=DEFAULT_THRESHOLD, off=True)
    path = g.write_baseline(runs, icount_runs or None)
    data = json.loads(path.read_text())
    for name, b in data["benchmarks"].items():
        each = " ".join(f"{x / b['ratio']:.3f}" for x in b["all"])
        print(f"  {name:<36s} ratio {b['ratio']:9.4g}  spread {b['spread'] * 100:5.1f} %  "
              f"runs/median: {each}")
    for name, b in data["instructions"].items():
        print(f"  {'icount ' + name:<36s} {b['count']:>15,}  spread over {b['runs']} runs "
              f"{b['spread'] * 100:6.3f} %")
    print(f"baseline written: {path}\nevery run's figures: {records}")


if __name__ == "__main__":
    main()
