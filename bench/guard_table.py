"""Markdown table of the guard's figures for bench/RESULTS.md: the committed baseline of this
machine class (median, spread, limit) and the factors of check runs recorded with
``pytest bench/ --guard-record=PATH``.

    for k in 1 2 3 4 5; do pytest bench/ -q --guard-record=/tmp/check$k.json; done
    python bench/guard_table.py /tmp/check*.json
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guard import Guard  # noqa: E402


def main(paths: list[str]) -> None:
    g = Guard(update=False, threshold=0.07, off=True)
    base = g.baseline or {}
    checks = [json.loads(Path(p).read_text()) for p in paths]
    print(f"Baseline {g.path.name}: {base.get('date')}, torch {base.get('torch')}, "
          f"numpy {base.get('numpy')}, triton {base.get('triton')}, {base.get('processor')}\n")
    print("| guarded figure | baseline spread (runs) | limit | factors of the check runs |")
    print("|---|---|---|---|")
    for name, ref in sorted(base.get("benchmarks", {}).items()):
        f = " ".join(f"{c['ratios'][name] / ref['ratio']:.3f}" if name in c["ratios"] else "–"
                     for c in checks)
        print(f"| time {name} | {ref['spread'] * 100:.1f} % ({ref['runs']}) | "
              f"{1 + g.limit(ref):.3f} | {f} |")
    for name, ref in sorted(base.get("instructions", {}).items()):
        f = " ".join(f"{c['instructions'][name] / ref['count']:.4f}" if name in c["instructions"]
                     else "–" for c in checks)
        print(f"| instructions {name} ({ref['count'] / 1e6:,.0f} M) | {ref['spread'] * 100:.3f} % "
              f"({ref['runs']}) | {1 + g.icount_limit(ref):.3f} | {f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
