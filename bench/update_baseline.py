"""Refresh the guard's baseline for this machine class after an intended change.

    python bench/update_baseline.py [--runs 7] [--icount-runs 2] [pytest args ...]

Runs ``pytest bench/`` ``--runs`` times with the guard off (the instruction counts in the first
``--icount-runs`` of them), then writes the median time ratio and the median instruction count of
each benchmark, with their run-to-run spreads, to ``bench/baselines/<machine class>.json``, together
with the machine, the torch, triton and Python versions and the date. Commit that file, and copy
the spreads into bench/RESULTS.md.

Each benchmark's time limit widens with its spread (bench/guard.py: max(threshold, 1.25 × spread)),
so more runs give an honest spread: five is the least that caught the slow processes here.
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
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--icount-runs", type=int, default=2,
                   help="runs that also count instructions (0: keep the committed counts)")
    args, rest = p.parse_known_args(argv)
    runs, icount_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.runs):
            rec = Path(tmp) / f"run{k}.json"
            cmd = [sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider",
                   "--guard-off", f"--guard-record={rec}", *rest]
            if k >= args.icount_runs:
                cmd.append("--guard-no-icount")
            print(f"run {k + 1}/{args.runs}: {' '.join(cmd)}", flush=True)
            r = subprocess.run(cmd, cwd=HERE.parent)
            if r.returncode != 0:
                sys.exit(f"pytest bench/ failed (exit {r.returncode}); baseline not written")
            data = json.loads(rec.read_text())
            runs.append(data["ratios"])
            if data["instructions"]:
                icount_runs.append(data["instructions"])
    if args.icount_runs and not icount_runs:
        print("no instruction counts (valgrind missing?): the committed counts are kept")
    g = Guard(update=True, threshold=DEFAULT_THRESHOLD, off=True)
    path = g.write_baseline(runs, icount_runs or None)
    data = json.loads(path.read_text())
    for name, b in data["benchmarks"].items():
        print(f"  {name:<40s} ratio {b['ratio']:10.4g}  spread over {b['runs']} runs {b['spread'] * 100:5.1f} %")
    for name, b in data["instructions"].items():
        print(f"  {'icount ' + name:<40s} {b['count']:>15,}  spread over {b['runs']} runs {b['spread'] * 100:6.3f} %")
    print(f"baseline written: {path}")


if __name__ == "__main__":
    main()
