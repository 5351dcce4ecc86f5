"""The throughput guard's own logic (bench/guard.py, bench/icount.py), without timing anything:
callgrind dumps are parsed, limits applied, baselines merged, and the instruction counter counts
what an analytic model says it should."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import guard as G  # noqa: E402
import icount  # noqa: E402

_NO_ICOUNT = icount.unavailable_reason()  # once: it may compile the shim


@pytest.fixture
def baseline_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "BASELINE_DIR", tmp_path)
    return tmp_path


def _dump(path: Path, name: str, total: int):
    path.write_text(f"version: 1\ncreator: callgrind-3.19.0\npid: 1\ncmd:  python -m pytest\npart: 1\n"
                    f"desc: I1 cache: \ndesc: Trigger: Client Request: {name}\n\npositions: line\n"
                    f"events: Ir\nsummary: {total}\n\nfl=(1) x.c\nfn=(1) f\n0 {total}\n\ntotals: {total}\n")


def test_read_dumps(tmp_path):
    _dump(tmp_path / "cg.7.1", "reference.neighbors", 123_456_789)
    _dump(tmp_path / "cg.7.2", "reference.cost_per_atom[12]", 42)
    # The final dump at exit has no client-request name and is ignored.
    (tmp_path / "cg.7").write_text("desc: Trigger: Program termination\ntotals: 10\n")
    assert icount.read_dumps(tmp_path) == {"reference.neighbors": 123_456_789,
                                           "reference.cost_per_atom[12]": 42}
    _dump(tmp_path / "cg.7.3", "reference.neighbors", 5)
    with pytest.raises(RuntimeError, match="two callgrind dumps"):
        icount.read_dumps(tmp_path)


def test_icount_limits_name_the_benchmark(baseline_dir):
    g = G.Guard(update=False, threshold=0.07, off=False)
    g.baseline = {"instructions": {"a": {"count": 1_000_000, "spread": 0.0, "runs": 2},
                                   "b": {"count": 1_000_000, "spread": 0.02, "runs": 2}}}
    # a: limit 3 %; b: its 2 % spread widens the limit to 3 × 2 % = 6 %.
    assert g.judge_icounts({"a": 1_029_000, "b": 1_059_000}) == []
    fails = g.judge_icounts({"a": 1_031_000, "b": 1_061_000, "new": 5})
    assert len(fails) == 2
    assert fails[0].startswith("instruction-count regression in a: 1.031×")
    assert "threshold 1.030×" in fails[0]
    assert fails[1].startswith("instruction-count regression in b: 1.061×")
    assert "threshold 1.060×" in fails[1]
    assert "factor" not in g.icounts["new"]  # no baseline: recorded, never judged


def test_time_limit_and_fresh_process_confirmation(baseline_dir, monkeypatch):
    g = G.Guard(update=False, threshold=0.07, off=False)
    g.baseline = {"benchmarks": {"x": {"ratio": 10.0, "spread": 0.02, "runs": 5},
                                 "y": {"ratio": 10.0, "spread": 0.12, "runs": 5}}}
    assert g.limit(g.baseline["benchmarks"]["x"]) == pytest.approx(0.07)
    assert g.limit(g.baseline["benchmarks"]["y"]) == pytest.approx(0.15)
    g.results = {"x": {"ratio": 10.8}, "y": {"ratio": 11.4}}
    g.judge("y", 11.4, "node")  # 1.14 ≤ 1.15: passes without re-measuring
    seen = []
    # Over the limit once, within it in the fresh process: noise, passes.
    monkeypatch.setattr(g, "remeasure", lambda nodeid, name: seen.append(nodeid) or 10.3)
    g.judge("x", 10.8, "bench/test_x.py::test_x")
    assert seen == ["bench/test_x.py::test_x"] and g.results["x"]["confirm_factor"] == pytest.approx(1.03)
    # Over the limit in both processes: fails, naming the benchmark and both factors.
    monkeypatch.setattr(g, "remeasure", lambda nodeid, name: 10.9)
    with pytest.raises(AssertionError, match=r"regression in x: 1\.080× the baseline time; 1\.090× again"):
        g.judge("x", 10.8, "bench/test_x.py::test_x")
    # Without confirmation the first measurement decides.
    g.confirm = False
    monkeypatch.setattr(g, "remeasure", lambda nodeid, name: pytest.fail("must not re-measure"))
    with pytest.raises(AssertionError, match="regression in x: 1.080×"):
        g.judge("x", 10.8, "bench/test_x.py::test_x")


def test_write_baseline_keeps_the_other_section(baseline_dir):
    g = G.Guard(update=True, threshold=0.07, off=True)
    path = g.write_baseline([{"a": 1.0, "b": 4.0}, {"a": 3.0, "b": 5.0}, {"a": 2.0}], [])
    data = json.loads(path.read_text())
    assert data["benchmarks"]["a"] == {"ratio": 2.0, "spread": 2.0, "runs": 3, "all": [1.0, 3.0, 2.0]}
    assert data["benchmarks"]["b"] == {"ratio": 4.5, "spread": 0.25, "runs": 2, "all": [4.0, 5.0]}
    assert data["instructions"] == {}
    assert data["torch"] and data["numpy"] and data["date"]
    # Counts only: the ratios written above stay.
    path = g.write_baseline([], [{"a": 100}, {"a": 101}])
    data = json.loads(path.read_text())
    assert data["benchmarks"]["a"]["ratio"] == 2.0
    assert data["instructions"]["a"] == {"count": 100, "spread": pytest.approx(0.01), "runs": 2,
                                         "all": [100, 101]}


def test_spread_drops_one_odd_run_from_five_on():
    assert G.Guard.spread([1.0, 1.2, 1.1]) == pytest.approx(0.2)
    # Five runs: the fastest (1.0) and the slowest (1.5) are dropped, 1.1 / 1.02 − 1 remains.
    assert G.Guard.spread([1.02, 1.5, 1.0, 1.1, 1.05]) == pytest.approx(1.1 / 1.02 - 1)


@pytest.mark.skipif(_NO_ICOUNT is not None, reason=str(_NO_ICOUNT))
def test_counter_counts_work_linearly(tmp_path):
    """Under callgrind, a Python loop of n additions costs a + b·n instructions: two identical
    regions count alike, and the 3n loop's excess over the n loop is twice the 2n loop's."""
    script = tmp_path / "work.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(BENCH)!r})
        import icount
        c = icount.Counter()
        def loop(n):
            return lambda: sum(i & 7 for i in range(n))  # small ints: the same cost per step
        for name, n in [("n1", 20000), ("n1again", 20000), ("n2", 40000), ("n3", 60000)]:
            c.measure(name, loop(n))
    """))
    subprocess.run([shutil.which("valgrind"), "--tool=callgrind", "--instr-atstart=no",
                    f"--callgrind-out-file={tmp_path}/cg.%p", sys.executable, str(script)],
                   env={"AIMNET_FAST_ICOUNT_CHILD": "1", "PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin"},
                   check=True, capture_output=True, timeout=600)
    n = icount.read_dumps(tmp_path)
    assert set(n) == {"n1", "n1again", "n2", "n3"}
    assert abs(n["n1again"] / n["n1"] - 1) < 1e-3
    assert (n["n3"] - n["n1"]) / (n["n2"] - n["n1"]) == pytest.approx(2.0, rel=1e-2)
    assert n["n2"] > 1.8 * n["n1"]  # the loop, not the start/stop overhead, dominates
