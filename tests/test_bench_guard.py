"""The throughput guard's own logic (bench/guard.py, bench/guard_ab.py, bench/guard_child.py,
bench/icount.py), without timing anything: callgrind dumps are parsed, limits applied, the
side-by-side verdicts judged from given per-process figures, the base worktree made and remade,
every child's modules checked to come from its own tree, and the instruction counter counts what an
analytic model says it should."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import guard as G  # noqa: E402
import guard_ab as AB  # noqa: E402
import icount  # noqa: E402

_NO_ICOUNT = icount.unavailable_reason()  # once: it may compile the shim
_NO_GIT = shutil.which("git") is None


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


def test_icount_limits_name_the_benchmark():
    g = G.Guard(threshold=0.07)
    reference = {"a": {"count": 1_000_000, "spread": 0.0}, "b": {"count": 1_000_000, "spread": 0.02}}
    # a: limit 3 %; b: its 2 % spread widens the limit to 3 × 2 % = 6 %.
    assert g.judge_icounts({"a": 1_029_000, "b": 1_059_000}, reference, "base X") == []
    fails = g.judge_icounts({"a": 1_031_000, "b": 1_061_000, "new": 5}, reference, "base X")
    assert len(fails) == 2
    assert fails[0].startswith("instruction-count regression in a: 1.031× the count of base X")
    assert "threshold 1.030×" in fails[0]
    assert fails[1].startswith("instruction-count regression in b: 1.061×")
    assert "threshold 1.060×" in fails[1]
    assert "factor" not in g.icounts["new"]  # no reference count: recorded, never judged
    # A base counted in the same run has no spread: the plain threshold.
    assert g.judge_icounts({"a": 1_031_000}, {"a": {"count": 1_000_000}}, "base Y")[0].endswith(
        "threshold 1.030×)")


def test_committed_counts_hold_only_for_their_builds():
    g = G.Guard()
    g.baseline = {"instructions": {"builds": G.builds(), "counts": {"a": {"count": 1}}}}
    assert g.committed_counts() == ({"a": {"count": 1}}, "")
    g.baseline["instructions"]["builds"] = dict(G.builds(), torch="0.0.1")
    counts, drift = g.committed_counts()
    assert counts == {"a": {"count": 1}} and drift.startswith("torch 0.0.1 → ")


def test_spread_drops_one_odd_run_from_five_on():
    assert G.Guard.spread([1.0, 1.2, 1.1]) == pytest.approx(0.2)
    # Five runs: the fastest (1.0) and the slowest (1.5) are dropped, 1.1 / 1.02 − 1 remains.
    assert G.Guard.spread([1.02, 1.5, 1.0, 1.1, 1.05]) == pytest.approx(1.1 / 1.02 - 1)


def test_update_baseline_summarises_counts():
    import update_baseline as U
    s = U.summarise([{"a": 100, "b": 7}, {"a": 104}, {"a": 101}])
    assert s["a"] == {"count": 101, "spread": pytest.approx(0.04), "runs": 3, "all": [100, 104, 101]}
    assert s["b"] == {"count": 7, "spread": 0.0, "runs": 1, "all": [7]}
    assert U.summarise([{"a": 10}, {"a": 20}])["a"]["count"] == 15  # even: mean of the middle two


# -- the side-by-side time comparison (bench/guard_ab.py), fed figures instead of processes -------
class _FakeBase:
    sha = "b" * 40
    short = "b" * 10

    def __init__(self, root: Path):
        self.root = root

    def ensure(self) -> Path:
        return self.root


def _ab(tmp_path, monkeypatch, times: dict, nodeids=("bench/t.py::test_x",), outcomes=None, **kw):
    """An ABRun whose children report ``times[side]`` = [per-process {name: min_s}] in call order,
    ``outcomes[side]`` their test outcomes (default: passed)."""
    base_root = tmp_path / "base"
    base_root.mkdir(exist_ok=True)
    calls = []
    left = {s: list(v) for s, v in times.items()}

    def run_child(root, nodeids, args=()):
        side = "base" if root == base_root else "ours"
        calls.append((side, tuple(nodeids)))
        figures = left[side].pop(0)
        node = nodeids[0]
        out = (outcomes or {}).get(side, {"outcome": "passed", "message": ""})
        return {"times": {n: {"min_s": t, "nodeid": node} for n, t in figures.items()},
                "outcomes": {node: out}}

    monkeypatch.setattr(AB, "run_child", run_child)
    run = AB.ABRun(_FakeBase(base_root), list(nodeids), repo=REPO, **kw)
    return run, calls


def test_side_by_side_passes_within_the_threshold(tmp_path, monkeypatch):
    run, calls = _ab(tmp_path, monkeypatch, {"base": [{"x": 1.00}, {"x": 1.02}, {"x": 1.01}],
                                             "ours": [{"x": 1.03}, {"x": 1.06}, {"x": 1.02}]},
                     processes=3)
    v = run.verdict("bench/t.py::test_x")
    assert v.status == "pass", v.message
    # Interleaved base, ours, ours, base, base, ours; the factor is min over ours / min over base.
    assert [c[0] for c in calls] == ["base", "ours", "ours", "base", "base", "ours"]
    assert "x: 1.020× the base's time" in v.message and "base bbbbbbbbbb" in v.message
    assert run.record()["benchmarks"]["x"]["factor"] == pytest.approx(1.02)


def test_side_by_side_confirms_in_fresh_processes(tmp_path, monkeypatch):
    # Over the threshold once; with two fresh processes per side the best times over all of a
    # side's processes are within it: noise, passes.
    run, calls = _ab(tmp_path, monkeypatch, {"base": [{"x": 1.0}, {"x": 1.01}, {"x": 1.0}],
                                             "ours": [{"x": 1.10}, {"x": 1.02}, {"x": 1.12}]},
                     processes=1, confirm_processes=2)
    v = run.verdict("bench/t.py::test_x")
    assert v.status == "pass", v.message
    assert "1.100× the base's time" in v.message
    assert "1.020× over all 3 processes per side with 2 fresh ones" in v.message and "noise" in v.message
    # base, ours (first), then ours, base / base, ours: the suspect alone, alternating
    assert [c[0] for c in calls] == ["base", "ours", "ours", "base", "base", "ours"]
    assert calls[2][1] == ("bench/t.py::test_x",)
    # One lucky base process in the first round does not decide: the fresh ones alone are even.
    run, _ = _ab(tmp_path, monkeypatch, {"base": [{"x": 0.90}, {"x": 1.0}, {"x": 1.0}],
                                         "ours": [{"x": 1.0}, {"x": 1.0}, {"x": 1.01}]},
                 processes=1, confirm_processes=2)
    v = run.verdict("bench/t.py::test_x")
    assert v.status == "pass" and "1.111× over all 3 processes" in v.message, v.message
    assert "1.000× over the fresh ones alone: noise" in v.message
    # Over it over all processes too: fails, naming the benchmark, both factors and both commits.
    run, _ = _ab(tmp_path, monkeypatch, {"base": [{"x": 1.0}, {"x": 1.0}],
                                         "ours": [{"x": 1.12}, {"x": 1.09}]},
                 processes=1, confirm_processes=1)
    v = run.verdict("bench/t.py::test_x")
    assert v.status == "fail"
    assert v.message.startswith("throughput regression in x: 1.120× the base's time (working tree ")
    assert "1.090× over all 2 processes per side with 1 fresh ones" in v.message
    assert "base bbbbbbbbbb" in v.message and "threshold 1.070×" in v.message
    assert run.record()["benchmarks"]["x"]["all_factor"] == pytest.approx(1.09)
    assert run.record()["benchmarks"]["x"]["fresh_factor"] == pytest.approx(1.09)
    # A first factor under the threshold but over 1.05 is a suspect too, judged on all processes:
    # a slowdown the first processes hid fails.
    # (here the first base process was slow: the best base time over all processes is lower)
    run, _ = _ab(tmp_path, monkeypatch, {"base": [{"x": 1.04}, {"x": 1.0}, {"x": 1.01}],
                                         "ours": [{"x": 1.10}, {"x": 1.10}, {"x": 1.09}]},
                 processes=1, confirm_processes=2)
    v = run.verdict("bench/t.py::test_x")
    assert v.status == "fail", v.message
    assert v.message.startswith("throughput regression in x: 1.058× the base's time")
    assert "1.090× over all 3 processes per side with 2 fresh ones" in v.message
    # ... and one that stays under it passes, with its fresh figures reported, not called noise.
    run, calls = _ab(tmp_path, monkeypatch, {"base": [{"x": 1.0}, {"x": 1.0}, {"x": 1.0}],
                                             "ours": [{"x": 1.06}, {"x": 1.01}, {"x": 1.04}]},
                     processes=1, confirm_processes=2)
    v = run.verdict("bench/t.py::test_x")
    assert v.status == "pass" and "1.010× over all 3 processes" in v.message and "noise" not in v.message
    assert len(calls) == 6
    # Under 1.05 nothing runs again.
    run, calls = _ab(tmp_path, monkeypatch, {"base": [{"x": 1.0}], "ours": [{"x": 1.045}]},
                     processes=1)
    assert run.verdict("bench/t.py::test_x").status == "pass" and len(calls) == 2
    # The default: four times as many fresh processes as first ones.
    run, calls = _ab(tmp_path, monkeypatch, {"base": [{"x": 1.0}] * 5, "ours": [{"x": 1.2}] * 5},
                     processes=1)
    assert run.verdict("bench/t.py::test_x").status == "fail" and len(calls) == 10
    # Without confirmation the first comparison decides, and nothing runs again.
    run, calls = _ab(tmp_path, monkeypatch, {"base": [{"x": 1.0}], "ours": [{"x": 1.08}]},
                     processes=1, confirm=False)
    assert run.verdict("bench/t.py::test_x").status == "fail" and len(calls) == 2


def test_side_by_side_never_passes_what_it_did_not_compare(tmp_path, monkeypatch):
    # A benchmark the base does not have is reported, not judged (a skip, not a pass).
    run, _ = _ab(tmp_path, monkeypatch, {"base": [{}], "ours": [{"x": 1.0}]}, processes=1,
                 outcomes={"base": {"outcome": "absent", "message": ""}})
    v = run.verdict("bench/t.py::test_x")
    assert v.status == "skip" and "not measured at base bbbbbbbbbb" in v.message
    # A benchmark that fails in the working tree fails here too, with its own message.
    run, _ = _ab(tmp_path, monkeypatch, {"base": [{"x": 1.0}], "ours": [{}]}, processes=1,
                 outcomes={"ours": {"outcome": "failed", "message": "AssertionError: boom"}})
    v = run.verdict("bench/t.py::test_x")
    assert v.status == "fail" and "boom" in v.message
    # A comparison that could not be made fails every guarded benchmark with the reason.
    monkeypatch.setattr(AB, "run_child", lambda *a, **k: (_ for _ in ()).throw(
        AB.GuardSetupError("git worktree add failed")))
    run = AB.ABRun(_FakeBase(tmp_path), ["bench/t.py::test_x", "bench/t.py::test_y"], repo=REPO)
    assert all(run.verdict(n).status == "fail" and "git worktree add failed" in run.verdict(n).message
               for n in ["bench/t.py::test_x", "bench/t.py::test_y"])


def test_provenance_of_a_childs_modules(tmp_path):
    root = tmp_path / "tree"
    (root / "aimnet_fast").mkdir(parents=True)
    AB.check_provenance(root, {"aimnet_fast": str(root / "aimnet_fast/__init__.py"),
                               "numpy": "/usr/lib/numpy/__init__.py"})
    with pytest.raises(AB.GuardSetupError, match=r"aimnet_fast\.kernels from /elsewhere"):
        AB.check_provenance(root, {"aimnet_fast": str(root / "aimnet_fast/__init__.py"),
                                   "aimnet_fast.kernels": "/elsewhere/kernels/__init__.py"})
    with pytest.raises(AB.GuardSetupError, match="no aimnet_fast module"):
        AB.check_provenance(root, {})


def _tiny_tree(root: Path, tag: str):
    """A project tree with the real one's package layout: aimnet_fast, and aimnet_fast.kernels in
    kernels/ (pyproject's package-dir), each saying which tree it is."""
    (root / "aimnet_fast").mkdir(parents=True)
    (root / "kernels").mkdir()
    (root / "bench").mkdir()
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / "aimnet_fast" / "__init__.py").write_text(f"TREE = {tag!r}\n")
    (root / "kernels" / "__init__.py").write_text(f"TREE = {tag!r}\n")
    (root / "bench" / "guard.py").write_text(f"TREE = {tag!r}\n")
    (root / "bench" / "test_where.py").write_text(textwrap.dedent(f"""
        import json, os, sys
        import aimnet_fast, aimnet_fast.kernels, guard
        def test_where():
            json.dump({{"trees": [aimnet_fast.TREE, aimnet_fast.kernels.TREE, guard.TREE],
                       "files": [aimnet_fast.__file__, aimnet_fast.kernels.__file__, guard.__file__],
                       "cwd": os.getcwd()}}, open({str(root / 'where.json')!r}, "w"))
    """))


def test_child_imports_every_project_module_from_its_own_tree(tmp_path):
    """Run through bench/guard_child.py, a tree's aimnet_fast, its kernels (another folder, mapped by
    pyproject's package-dir, which an editable install of the working tree would otherwise answer)
    and its bench/ modules are all that tree's own."""
    other = tmp_path / "other"
    _tiny_tree(other, "other")
    r = subprocess.run([sys.executable, str(AB.CHILD), str(other), "bench/test_where.py", "-q",
                        "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    where = json.loads((other / "where.json").read_text())
    assert where["trees"] == ["other"] * 3, where
    assert all(Path(f).resolve().is_relative_to(other.resolve()) for f in where["files"]), where
    assert Path(where["cwd"]).resolve() == other.resolve()


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(_NO_GIT, reason="git not found")
def test_base_worktree_is_made_once_and_remade_when_touched(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "f.txt").write_text("one\n")
    _git(repo, "add", "f.txt")
    _git(repo, "commit", "-q", "-m", "one")
    first = _git(repo, "rev-parse", "HEAD")
    (repo / "f.txt").write_text("two\n")
    _git(repo, "commit", "-q", "-am", "two")

    base = AB.BaseTree("HEAD~1", repo=repo)
    assert base.sha == first
    path = base.ensure()
    assert (path / "f.txt").read_text() == "one\n" and path.is_relative_to((repo / ".git").resolve())
    assert AB.describe_tree(repo) == _git(repo, "rev-parse", "--short=10", "HEAD")
    (path / "f.txt").write_text("changed by a benchmark\n")
    assert base.ensure() == path and (path / "f.txt").read_text() == "one\n"
    (repo / "f.txt").write_text("three\n")
    assert AB.describe_tree(repo).endswith("+changes")
    with pytest.raises(AB.GuardSetupError, match="'nosuchrev' is not in this repository"):
        AB.BaseTree("nosuchrev", repo=repo)


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
