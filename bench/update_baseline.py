"""Name a new base commit for the guard after an intended change (a slowdown accepted, a benchmark
renamed or added), with the instruction counts of this machine's builds.

    python bench/update_baseline.py [--icount-runs 2] [--runs 1] [pytest args ...]

On a clean tree only (the figures must be HEAD's): counts the guarded CPU benchmarks under
callgrind ``--icount-runs`` times (bench/test_bench_instructions.py) and writes, to
``bench/baselines/base.json``:

- ``commit``: HEAD, the base that ``pytest bench/`` compares time with side by side from then on;
- ``instructions``: the median count of each benchmark with its run-to-run spread and every run's
  figure, and ``builds`` (bench/guard.py: builds()), the library builds they hold for;
- ``history``: this run's times appended (``--runs`` timed runs of ``pytest bench/ --guard-off``,
  the minimum of each benchmark), with the machine and versions: figures for bench/RESULTS.md,
  never compared with.

Commit that file; the commit after it then compares with HEAD-at-update.
"""
import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from guard import BASELINE, DEFAULT_THRESHOLD, ICOUNT_THRESHOLD, Guard, builds, load_baseline, \
    machine_class, versions  # noqa: E402
from guard_ab import describe_tree, git  # noqa: E402


def summarise(runs: list[dict]) -> dict:
    """name → {count: median over runs, spread, runs, all}."""
    out = {}
    for name in sorted(set().union(*runs)):
        r = sorted(run[name] for run in runs if name in run)
        mid = r[len(r) // 2] if len(r) % 2 else (r[len(r) // 2 - 1] + r[len(r) // 2]) // 2
        out[name] = {"count": int(mid), "spread": Guard.spread(r), "runs": len(r),
                     "all": [int(run[name]) for run in runs if name in run]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--icount-runs", type=int, default=2,
                   help="instruction-count runs (0: keep the committed counts)")
    p.add_argument("--runs", type=int, default=1, help="timed runs for the history (0: none)")
    args, rest = p.parse_known_args(argv)
    label = describe_tree()
    if label.endswith("+changes"):
        sys.exit("the tree has uncommitted changes: commit them first, the base must be a commit")
    sha = git("rev-parse", "HEAD")
    records = Path(tempfile.mkdtemp(prefix="aimnet_fast_baseline_"))
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--guard-off"]
    plan = ([(f"icount{k}", [str(HERE / "test_bench_instructions.py")]) for k in range(args.icount_runs)]
            + [(f"time{k}", [str(HERE), "--guard-no-icount"]) for k in range(args.runs)])
    icount_runs, time_runs = [], []
    for k, (tag, what) in enumerate(plan):
        rec = records / f"{tag}.json"
        cmd = [*base, *what, f"--guard-record={rec}", *rest]
        print(f"run {k + 1}/{len(plan)}: {' '.join(cmd)}", flush=True)
        r = subprocess.run(cmd, cwd=HERE.parent)
        if r.returncode != 0:
            sys.exit(f"pytest failed (exit {r.returncode}); baseline not written")
        data = json.loads(rec.read_text())
        (icount_runs if tag.startswith("icount") else time_runs).append(data)
    old = load_baseline()
    counts = [d["instructions"] for d in icount_runs if d["instructions"]]
    if args.icount_runs and not counts:
        print("no instruction counts (valgrind missing?): the committed counts are kept")
    instructions = ({"builds": builds(), "threshold": ICOUNT_THRESHOLD, "counts": summarise(counts)}
                    if counts else old.get("instructions", {}))
    history = list(old.get("history", []))
    if time_runs:
        times = {}
        for d in time_runs:
            for name, t in d["times"].items():
                times[name] = min(times.get(name, t["min_s"]), t["min_s"])
        history.append({"commit": sha, "date": dt.date.today().isoformat(), "machine": machine_class(),
                        **versions(), "runs": len(time_runs), "min_s": times})
    data = {"commit": sha, "date": dt.date.today().isoformat(), "threshold": DEFAULT_THRESHOLD,
            "instructions": instructions, "history": history}
    BASELINE.parent.mkdir(exist_ok=True)
    BASELINE.write_text(json.dumps(data, indent=1) + "\n")
    for name, b in instructions.get("counts", {}).items():
        print(f"  {'icount ' + name:<44s} {b['count']:>15,}  spread over {b['runs']} runs "
              f"{b['spread'] * 100:6.3f} %")
    print(f"base commit {sha[:10]} written to {BASELINE}\nevery run's figures: {records}")


if __name__ == "__main__":
    main()
