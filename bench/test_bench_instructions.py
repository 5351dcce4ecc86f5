"""Instruction counts of the guarded CPU benchmarks, counted by callgrind in one child process
(bench/icount.py): the half of the guard that machine noise cannot move. Fails, naming each
benchmark and its factor, when a workload executes more instructions than its baseline allows
(``ICOUNT_THRESHOLD`` in bench/guard.py). Skips where valgrind or a C compiler is missing.

    pytest bench/test_bench_instructions.py          # ≈ 5 min on the 2-core CPU
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
    counts = icount.run(["-k", k] if k else None)
    if smoke:
        assert set(counts) == {"reference.neighbors"} and counts["reference.neighbors"] > 10**6, counts
        return
    if not k:
        # Every guarded CPU benchmark of the baseline must have been counted: a workload that
        # silently stopped reaching the guard would otherwise stop being guarded.
        expected = set((guard.baseline or {}).get("instructions", {}))
        assert expected <= set(counts), f"not counted: {sorted(expected - set(counts))}"
    failures = guard.judge_icounts(counts)
    if failures and not (guard.update or guard.off):
        drift = guard.drift()
        raise AssertionError("\n".join(failures) + (
            f"\nthe baseline was recorded with {drift}: if that change is intended, refresh it with "
            f"python bench/update_baseline.py" if drift else ""))
