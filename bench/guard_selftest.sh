#!/usr/bin/env bash
# Shows that both halves of the guard catch a real slowdown and pass again once it is gone:
# bench/slowdown.patch sorts (and so copies) the neighbor candidates once more before the distance
# filter, ≈ 10 % more time in the reference neighbor search. Run from the repository root, on any
# machine: time is compared side by side with the base commit (bench/guard_ab.py), instructions with
# the committed counts or, where the library builds differ, with the base counted in the same run.
set -u
show() { grep -E "regression in|reference.neighbors|passed|failed|skipped" | cut -c1-700; }
run() {
  echo "-- time: pytest bench/test_bench_ops.py -k neighbor_search"
  python -m pytest bench/test_bench_ops.py -q -p no:cacheprovider -k neighbor_search 2>&1 | show
  echo "-- instructions: pytest bench/test_bench_instructions.py --guard-icount-k neighbor_search"
  python -m pytest bench/test_bench_instructions.py -q -p no:cacheprovider \
    --guard-icount-k neighbor_search 2>&1 | show
}
git diff --quiet -- aimnet_fast/neighbors.py || { echo "aimnet_fast/neighbors.py has local changes"; exit 1; }
echo "== unchanged tree (expect: passed, passed)"; run
git apply bench/slowdown.patch || exit 1
trap 'git apply -R bench/slowdown.patch' EXIT
echo "== with bench/slowdown.patch (expect: failed, failed, each naming reference.neighbors)"; run
git apply -R bench/slowdown.patch && trap - EXIT
echo "== patch removed (expect: passed, passed)"; run
