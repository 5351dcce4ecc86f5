#!/usr/bin/env bash
# Shows that the guard catches a real slowdown and passes again once it is gone:
# bench/slowdown.patch sorts (and so copies) the neighbor candidates once more before the distance
# filter, ≈ 10 % more time in the reference neighbor search. Run from the repository root on a
# clean tree of the machine class the baseline was recorded on.
set -u
run() { python -m pytest bench/test_bench_ops.py -q -p no:cacheprovider -k neighbor_search 2>&1 \
        | grep -E "regression in|reference.neighbors|passed|failed"; }
echo "== unchanged tree (expect: passed)"; run
git apply bench/slowdown.patch || exit 1
echo "== with bench/slowdown.patch (expect: failed, naming reference.neighbors)"; run
git apply -R bench/slowdown.patch
echo "== patch removed (expect: passed)"; run
