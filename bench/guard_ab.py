"""The time half of the throughput guard: the working tree against a base commit, side by side in
one run, so that no figure recorded on another machine (or another day of this one) is ever
compared with.

How a run goes (``pytest bench/``, see bench/conftest.py):

1. The base commit, by default the one ``bench/baselines/base.json`` names (``--guard-base REV``
   for another, e.g. ``$(git merge-base HEAD main)``), is checked out as a detached git worktree
   under the repository's git folder (``.git/aimnet_fast-guard/<sha>``), made once and reused while
   it stays clean.
2. The guarded benchmarks selected in this session run in separate processes, alternately from the
   two trees: base, ours, ours, base, base, ours (``--guard-processes`` per side, default 3; a
   process's best round moves by 5–10 % between processes on a 2-core VM, so the best of two was
   not enough to see a 10 % slowdown reliably: bench/RESULTS.md). Each process is
   ``python bench/guard_child.py ROOT <node ids> --guard-child``: every project module, the Triton
   kernels included, is imported from ROOT's own files (guard_child.py says how), each process
   records the file of every project module it loaded, and a module from outside its tree makes the
   comparison an error. The benchmarks run as each tree defines them: a guarded benchmark keeps its
   name only while its workload stays the same.
3. For each benchmark: its time on each side is the minimum over that side's processes of the
   minimum over the process's rounds (interference only ever adds time), the factor is
   ours / base, and the spread of a side is max / min − 1 over its processes. Over 1 + SUSPECT
   (5 %, below the threshold), the benchmark alone is measured again in fresh processes
   (``--guard-confirm-processes`` per side, default four times as many, alternating) and fails
   when both the minima over all of a side's processes, first and fresh, and those over the fresh
   ones alone are over the threshold (an unchanged tree once failed on one base process 9 % faster
   than the other 14); the failure names the benchmark, both factors and both commits. Why
   so many: a process's best time is heavy-tailed here (median 4 %, 90th percentile 28 % over the
   best of its run, bench/RESULTS.md), so the best of three can show a real 10 % slowdown as 1.05
   or none as 1.11, and a process that runs a few benchmarks costs seconds.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CHILD = BENCH_DIR / "guard_child.py"
#: Module names of the project, as a child records them (bench/conftest.py: _project_modules).
PROJECT_PREFIXES = ("aimnet_fast", "bench", "guard", "icount", "conftest", "synthetic", "test_bench")


#: First factors above 1 + SUSPECT are measured again in fresh processes before they are judged.
SUSPECT = 0.05


class GuardSetupError(RuntimeError):
    """The comparison cannot be made (no git, unknown commit, a child that could not start)."""


def git(*args: str, cwd: Path = REPO) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise GuardSetupError(f"git {' '.join(args)} failed in {cwd}: {r.stderr.strip()[-400:]}")
    return r.stdout.strip()


def describe_tree(repo: Path = REPO) -> str:
    """The working tree as a commit: its short sha, with '+changes' when files differ from it."""
    sha = git("rev-parse", "--short=10", "HEAD", cwd=repo)
    dirty = git("status", "--porcelain", "--untracked-files=no", cwd=repo)
    return sha + ("+changes" if dirty else "")


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@dataclass
class BaseTree:
    """A detached worktree of the base commit, under the repository's git folder."""
    rev: str
    repo: Path = REPO
    sha: str = ""

    def __post_init__(self):
        try:
            self.sha = git("rev-parse", "--verify", "--quiet", f"{self.rev}^{{commit}}", cwd=self.repo)
        except GuardSetupError:
            shallow = git("rev-parse", "--is-shallow-repository", cwd=self.repo) == "true"
            raise GuardSetupError(
                f"base commit {self.rev!r} is not in this repository"
                + (" (a shallow clone: git fetch --unshallow)" if shallow else "")
                + "; name another with --guard-base REV") from None

    @property
    def short(self) -> str:
        return self.sha[:10]

    @property
    def path(self) -> Path:
        common = Path(git("rev-parse", "--git-common-dir", cwd=self.repo))
        if not common.is_absolute():
            common = (self.repo / common).resolve()
        return common / "aimnet_fast-guard" / self.sha[:12]

    def ensure(self) -> Path:
        """The worktree's root, created (or re-created when it has changed) under a lock."""
        path = self.path
        with _locked(path.parent / ".lock"):
            if (path / ".git").exists():
                try:
                    head = git("rev-parse", "HEAD", cwd=path)
                    dirty = git("status", "--porcelain", "--untracked-files=no", cwd=path)
                except GuardSetupError:
                    head, dirty = "", "?"
                if head == self.sha and not dirty:
                    return path
                git("worktree", "remove", "--force", str(path), cwd=self.repo)
            git("worktree", "prune", cwd=self.repo)
            git("worktree", "add", "--detach", "--force", str(path), self.sha, cwd=self.repo)
        return path


def child_env(extra: dict | None = None) -> dict:
    # The shared material beside this tree: a worktree under .git has none beside it.
    shared = Path(os.environ.get("AIMNET_FAST_SHARED", REPO.parent / "shared")).resolve()
    return dict(os.environ, AIMNET_FAST_SHARED=str(shared), PYTHONHASHSEED="0", **(extra or {}))


def run_child(root: Path, nodeids: list[str], args: list[str] = (), timeout_s: float = 1800) -> dict:
    """Run ``nodeids`` in one fresh process with ROOT's files; return its record (bench/guard.py:
    Guard.write_record) with ``log``: the end of its output."""
    with tempfile.TemporaryDirectory(prefix="aimnet_fast_guard_") as tmp:
        rec = Path(tmp) / "record.json"
        cmd = [sys.executable, str(CHILD), str(root), *nodeids, "-q", "-p", "no:cacheprovider",
               "--guard-child", "--guard-no-icount", f"--guard-record={rec}", *args]
        try:
            r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise GuardSetupError(f"a benchmark process ran past {timeout_s:.0f} s: "
                                  f"{' '.join(cmd)}") from None
        log = (r.stdout + r.stderr)[-3000:]
        # 0: all passed; 1: some failed (their outcomes are in the record); 5: nothing selected
        if r.returncode not in (0, 1, 5) or not rec.exists():
            hint = (" (does that commit predate the side-by-side guard? name a later one with "
                    "--guard-base REV)" if "--guard-child" in log else "")
            raise GuardSetupError(f"the benchmark process in {root} failed to run (exit "
                                  f"{r.returncode}){hint}: {' '.join(cmd)}\n{log}")
        data = json.loads(rec.read_text())
    data["log"] = log
    check_provenance(root, data.get("modules", {}))
    return data


def check_provenance(root: Path, modules: dict[str, str]) -> None:
    """Every project module a child loaded must come from its own tree."""
    root = root.resolve()
    wrong = {m: f for m, f in modules.items()
             if m.startswith(PROJECT_PREFIXES) and not Path(f).resolve().is_relative_to(root)}
    if wrong:
        listing = ", ".join(f"{m} from {f}" for m, f in sorted(wrong.items())[:6])
        raise GuardSetupError(f"the benchmark process of {root} imported project modules from "
                              f"another tree: {listing}")
    if "aimnet_fast" not in modules:
        raise GuardSetupError(f"the benchmark process of {root} recorded no aimnet_fast module")


@dataclass
class Figure:
    """One benchmark's per-process minima (s) on each side."""
    ours: list[float] = field(default_factory=list)
    base: list[float] = field(default_factory=list)

    @staticmethod
    def spread(xs: list[float]) -> float:
        return max(xs) / min(xs) - 1.0 if xs else float("nan")

    @property
    def factor(self) -> float:
        return min(self.ours) / min(self.base)


@dataclass
class Verdict:
    status: str            # "pass", "fail" or "skip"
    message: str = ""


class ABRun:
    """The guarded benchmarks of one session, measured side by side; ``verdict(nodeid)`` for each."""

    def __init__(self, base: BaseTree, nodeids: list[str], processes: int = 3,
                 threshold: float = 0.07, confirm: bool = True, child_args: list[str] = (),
                 repo: Path = REPO, confirm_processes: int | None = None,
                 suspect: float | None = None):
        self.base, self.nodeids, self.processes = base, list(nodeids), max(1, processes)
        self.threshold, self.confirm, self.child_args, self.repo = threshold, confirm, list(child_args), repo
        self.confirm_processes = max(1, confirm_processes or 4 * self.processes)
        #: A first factor over 1 + suspect (below the threshold too) is measured again: the best of
        #: three processes showed a real 10 % slowdown as 1.055 once (bench/RESULTS.md); 3 %
        #: made three or four suspects of an unchanged tree and a run of 10 minutes.
        self.suspect = min(threshold, SUSPECT if suspect is None else suspect)
        self.ours_label = describe_tree(repo)
        self.first: dict[str, Figure] = {}
        self.again: dict[str, Figure] = {}
        self.node_of: dict[str, str] = {}        # benchmark name → node id
        self.outcomes: dict[str, dict[str, list]] = {"ours": {}, "base": {}}
        self._verdicts: dict[str, Verdict] | None = None
        self.error: str | None = None

    def _round(self, order: tuple[str, ...], nodeids: list[str], into: dict[str, Figure]) -> None:
        roots = {"ours": self.repo, "base": self.base.ensure()}
        for side in order:
            rec = run_child(roots[side], nodeids, self.child_args)
            for node, out in rec.get("outcomes", {}).items():
                self.outcomes[side].setdefault(node, []).append(out)
            for name, t in rec.get("times", {}).items():
                if side == "ours":
                    self.node_of.setdefault(name, t["nodeid"])
                getattr(into.setdefault(name, Figure()), side).append(t["min_s"])

    def run(self) -> dict[str, Verdict]:
        if self._verdicts is not None:
            return self._verdicts
        try:
            for k in range(self.processes):
                self._round(("base", "ours") if k % 2 == 0 else ("ours", "base"), self.nodeids, self.first)
            suspects = sorted({self.node_of[n] for n, f in self.first.items()
                               if f.ours and f.base and f.factor > 1 + self.suspect})
            if suspects and self.confirm:
                for k in range(self.confirm_processes):
                    self._round(("ours", "base") if k % 2 == 0 else ("base", "ours"), suspects, self.again)
        except GuardSetupError as e:
            self.error = str(e)
        self._verdicts = {node: self._judge(node) for node in self.nodeids}
        return self._verdicts

    def verdict(self, nodeid: str) -> Verdict:
        return self.run().get(nodeid, Verdict("skip", f"{nodeid} was not part of the comparison"))

    @staticmethod
    def _all(first: Figure, again: Figure) -> Figure:
        return Figure(first.ours + again.ours, first.base + again.base)

    def _fmt(self, xs: list[float]) -> str:
        return (f"min {min(xs) * 1e3:.2f} ms over {len(xs)} process{'es' if len(xs) > 1 else ''}, "
                f"spread {Figure.spread(xs) * 100:.1f} %")

    def _judge(self, node: str) -> Verdict:
        if self.error:
            return Verdict("fail", f"time not compared: {self.error}")
        ours = self.outcomes["ours"].get(node, [])
        failed = [o for o in ours if o["outcome"] == "failed"]
        if failed:
            return Verdict("fail", "the benchmark failed in the working tree's process:\n"
                           + failed[0]["message"])
        if not ours:
            return Verdict("fail", f"the working tree's process did not run {node}")
        if all(o["outcome"] == "skipped" for o in ours):
            return Verdict("skip", ours[0]["message"])
        names = sorted(n for n, nd in self.node_of.items() if nd == node)
        if not names:
            return Verdict("skip", f"{node} timed nothing (benchmarks disabled?)")
        lines, failures, unjudged = [], [], []
        for name in names:
            f = self.first[name]
            if not f.base:
                base_out = self.outcomes["base"].get(node, [{"outcome": "absent", "message": ""}])[0]
                unjudged.append(f"{name}: not measured at base {self.base.short} "
                                f"({base_out['outcome']}: a benchmark new since then is not judged)")
                continue
            line = (f"{name}: {f.factor:.3f}× the base's time (working tree {self.ours_label}: "
                    f"{self._fmt(f.ours)}; base {self.base.short}: {self._fmt(f.base)})")
            g = self.again.get(name)
            if g is not None and g.ours and g.base:
                both = self._all(f, g)
                again = (f"{both.factor:.3f}× over all {len(both.ours)} processes per side with "
                         f"{len(g.ours)} fresh ones (working tree {self._fmt(both.ours)}; "
                         f"base {self._fmt(both.base)})")
                again += f"; {g.factor:.3f}× over the fresh ones alone"
                # Both: the best of all processes, and the fresh ones on their own (a replication
                # that one lucky process of the first round cannot decide).
                if both.factor > 1 + self.threshold and g.factor > 1 + self.threshold:
                    failures.append(f"{line}; {again}")
                else:
                    line += f"; {again}" + (": noise" if f.factor > 1 + self.threshold else "")
            elif f.factor > 1 + self.threshold:
                if self.confirm:
                    line += "; not measured again"
                failures.append(line)
            lines.append(line)
        if failures:
            return Verdict("fail", "\n".join(
                f"throughput regression in {line}; threshold {1 + self.threshold:.3f}×" for line in failures)
                + "\nIf the slowdown is intended, name a new base: python bench/update_baseline.py")
        if not lines:
            return Verdict("skip", "; ".join(unjudged))
        return Verdict("pass", "\n".join(lines + unjudged))

    def table(self) -> str:
        head = (f"  time, side by side: working tree {self.ours_label} against base {self.base.short} "
                f"({self.processes} process{'es' if self.processes > 1 else ''} per side, "
                f"threshold {1 + self.threshold:.3f}×)")
        if self.error:
            return head + f"\n  not compared: {self.error}"
        rows = [head]
        for name in sorted(self.first):
            f = self.first[name]
            ours = f"{min(f.ours) * 1e3:9.2f} ms ±{Figure.spread(f.ours) * 100:4.1f}%" if f.ours else " " * 19
            if not f.base:
                rows.append(f"  {name:<44s} {ours}   (not at base)")
                continue
            g = self.again.get(name)
            rows.append(f"  {name:<44s} {ours}  base {min(f.base) * 1e3:9.2f} ms "
                        f"±{Figure.spread(f.base) * 100:4.1f}%  {f.factor:6.3f}×"
                        + (f", with {len(g.ours)} fresh processes {self._all(f, g).factor:.3f}×"
                           if g and g.ours and g.base else ""))
        return "\n".join(rows)

    def record(self) -> dict:
        out = {"ours": self.ours_label, "base": self.base.sha, "processes": self.processes,
               "threshold": self.threshold, "error": self.error, "benchmarks": {}}
        for name, f in sorted(self.first.items()):
            g = self.again.get(name)
            again = g is not None and bool(g.ours) and bool(g.base)
            out["benchmarks"][name] = {
                "ours_s": f.ours, "base_s": f.base,
                "factor": f.factor if f.ours and f.base else None,
                "again_ours_s": g.ours if again else [], "again_base_s": g.base if again else [],
                "fresh_factor": g.factor if again else None,
                "all_factor": self._all(f, g).factor if again else None}
        return out
