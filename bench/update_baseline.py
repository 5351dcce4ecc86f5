"""Refresh the guard's baseline for this machine class after an intended change.

    python bench/update_baseline.py [--runs 3] [pytest args ...]

Runs ``pytest bench/`` ``--runs`` times with the guard off, then writes the median ratio of each
benchmark and its run-to-run spread to ``bench/baselines/<machine class>.json``, with the machine,
torch, triton and Python versions and the date. Commit that file.
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
    p.add_argument("--runs", type=int, default=3)
    args, rest = p.parse_known_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.runs):
            rec = Path(tmp) / f"run{k}.json"
            cmd = [sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider",
                   "--guard-off", f"--guard-record={rec}", *rest]
            print(f"run {k + 1}/{args.runs}: {' '.join(cmd)}", flush=True)
            r = subprocess.run(cmd, cwd=HERE.parent)
            if r.returncode != 0:
                sys.exit(f"pytest bench/ failed (exit {r.returncode}); baseline not written")
            runs.append(json.loads(rec.read_text()))
    g = Guard(update=True, threshold=DEFAULT_THRESHOLD, off=True)
    path = g.write_baseline(runs)
    data = json.loads(path.read_text())
    for name, b in data["benchmarks"].items():
        print(f"  {name:<40s} ratio {b['ratio']:10.4g}  spread over {b['runs']} runs {b['spread'] * 100:5.1f} %")
    print(f"baseline written: {path}")


if __name__ == "__main__":
    main()
