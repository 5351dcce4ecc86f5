"""Markdown table of the guard's figures for bench/RESULTS.md, from runs recorded with
``pytest bench/ --guard-record=PATH``: for each guarded benchmark, the side-by-side factor of every
run (working tree / base, the best process of each side; in brackets, where the benchmark was
measured again, the factor over all processes and over the fresh ones alone), and the instruction
counts against the committed ones of bench/baselines/base.json.

    for k in 1 2; do pytest bench/ -q --guard-record=/tmp/check$k.json; done
    python bench/guard_table.py /tmp/check*.json
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guard import Guard, load_baseline  # noqa: E402


def _time_cell(bench: dict | None) -> str:
    if not bench or bench.get("factor") is None:
        return "–"
    if bench.get("all_factor") is None:
        return f"{bench['factor']:.3f}"
    return f"{bench['factor']:.3f} ({bench['all_factor']:.3f} all, {bench['fresh_factor']:.3f} fresh)"


def main(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    sides = [r.get("side_by_side") or {} for r in runs]
    base = load_baseline()
    print("Runs: " + "; ".join(f"{s.get('ours')} against {str(s.get('base'))[:10]}, "
                               f"{s.get('processes')} processes per side" for s in sides) + "\n")
    print("| guarded figure | limit | factor of each run (where re-measured: over all processes, "
          "over the fresh ones) |")
    print("|---|---|---|")
    limit = max((s.get("threshold", 0.0) for s in sides), default=0.0)
    for name in sorted(set().union(*(s.get("benchmarks", {}) for s in sides))):
        cells = " ".join(_time_cell(s.get("benchmarks", {}).get(name)) for s in sides)
        print(f"| time {name} | {1 + limit:.3f} | {cells} |")
    for name, ref in sorted(base.get("instructions", {}).get("counts", {}).items()):
        cells = " ".join(f"{r['instructions'][name] / ref['count']:.4f}"
                         if name in r.get("instructions", {}) else "–" for r in runs)
        print(f"| instructions {name} ({ref['count'] / 1e6:,.0f} M) | "
              f"{1 + Guard.icount_limit(ref):.3f} | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1:])
