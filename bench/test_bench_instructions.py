"""Instruction counts of the guarded CPU benchmarks, counted by callgrind (bench/icount.py): the
half of the guard that machine noise cannot move. Fails, naming each benchmark, its factor and what
it was compared with, when a workload executes more instructions than allowed
(``ICOUNT_THRESHOLD`` in bench/guard.py). Compared with the committed counts of the base commit
(bench/baselines/base.json) where this machine's library builds are those they were counted with;
elsewhere with the base commit counted in the same run (a worktree, bench/guard_ab.py). Skips where
valgrind or a C compiler is missing.

    pytest bench/test_bench_instructions.py          # ≈ 3 min on the 2-core CPU (twice that
                                                     # where the base is counted too)
    pytest bench/ --guard-no-icount                  # the time figures only
    pytest bench/test_bench_instructions.py --guard-icount-k neighbor   # some benchmarks only

With ``--benchmark-disable`` (CI's smoke run) only the neighbor search is counted, to show that
the counting works; nothing is judged.
"""
import pytest

import icount


def test_instruction_counts(request, guard):
    if request.config.getoption("--guard-no-icount"):
        pytest.skip("--guard-no-icount")
    reason = icount.unavailable_reason()
    if reason:
        pytest.skip(reason)
    smoke = request.config.getoption("--benchmark-disable")
    k = "neighbor_search" if smoke else request.config.getoption("--guard-icount-k")
    select = ["-k", k] if k else None
    counts = icount.run(select)
    if smoke:
        assert set(counts) == {"reference.neighbors"} and counts["reference.neighbors"] > 10**6, counts
        return
    if request.config.getoption("--guard-off"):
        guard.judge_icounts(counts, {}, "nothing")
        return
    committed, drift = guard.committed_counts()
    base_rev = request.config.getoption("--guard-base")
    commit = guard.baseline.get("commit", "")
    if committed and not drift and not base_rev:
        reference = committed
        against = f"base {commit[:10]} (committed counts, bench/baselines/base.json)"
        if not k:
            # Every guarded benchmark of the committed counts must have been counted: a workload
            # that silently stopped reaching the guard would otherwise stop being guarded.
            assert set(reference) <= set(counts), f"not counted: {sorted(set(reference) - set(counts))}"
    else:
        from guard_ab import BaseTree
        base = BaseTree(base_rev or commit)
        reference = {n: {"count": c} for n, c in icount.run(select, root=base.ensure()).items()}
        why = f"builds differ from the committed counts' ({drift})" if drift else (
            "--guard-base" if base_rev else "no committed counts")
        against = f"base {base.short} counted in this run ({why})"
    failures = guard.judge_icounts(counts, reference, against)
    if failures:
        raise AssertionError("\n".join(failures) + "\nIf the extra work is intended, name a new base: "
                             "python bench/update_baseline.py")
