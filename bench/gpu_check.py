"""One prepared command that proves the GPU path correct and measures it, for a GPU machine that
is lent rarely and briefly. Run from the repository root (about 6 minutes on one H100/H200):

    python3 -m bench.gpu_check --out /tmp/gpu_check

It works after ``pip install --no-deps --no-build-isolation -e .``; started without the package
installed it runs that install itself (offline, ``--no-index``) and starts again. It needs no
omegaconf (absent from the GPU image): its configs are built as dataclasses.

Sections (``--sections 1,2`` runs a subset): 1 environment and measured ceilings, 2 correctness
(the kernel tests on CUDA, the released model on the Triton backend against the original outputs,
MLP precision errors against float64, NaN propagation), 3 determinism of training gradients,
4 speed of the training step and of prediction, with MFU and a per-kernel profile, 5 CUDA-graph
capture, 6 a real training run of about a minute and a half. Each section has a time budget;
every sub-check is caught on its own and reported (pass / fail / info / skipped), so the check
never stops at the first failure. Writes ``OUT/gpu_check.md`` and ``OUT/gpu_check.json`` after
every section and prints a summary table last (the device tool keeps only the output's tail).

``--dry-run``: the same code on the CPU under TRITON_INTERPRET=1 at tiny sizes, so that the check
cannot rot in CI; what truly needs CUDA says so in one line. Its figures are not GPU figures.

Exit status: on the GPU 1 if any sub-check failed; in the dry run 1 only if the check's own code
broke (a section raised, or a sub-check raised something other than an assertion): a failed
assertion there is a finding about the kernels under the interpreter, reported like any other.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from bench.gpu_check_lib.bootstrap import REPO, check_omegaconf, ensure_installed
from bench.gpu_check_lib.common import CheckFailed, NeedsCuda, Skip

#: section number → (name, budget on the GPU in s, budget in the dry run in s). GPU sum 350 s,
#: plus start-up: under the 6 minutes. A sub-check starts only while its section has time left;
#: subprocesses (the kernel tests, the training run) get timeouts from what is left.
SECTIONS = {
    1: ("environment", 20, 15),
    2: ("correctness", 120, 75),
    3: ("determinism", 30, 60),
    4: ("speed", 70, 60),
    5: ("capture", 40, 15),
    6: ("real run", 70, 50),
}


def _last_line(e: BaseException) -> str:
    line = traceback.format_exception_only(type(e), e)[-1].strip()
    tb = traceback.extract_tb(e.__traceback__)
    where = f" [{Path(tb[-1].filename).name}:{tb[-1].lineno}]" if tb else ""
    return (line[:600] + "…" if len(line) > 600 else line) + where


class Section:
    def __init__(self, num: int, name: str, budget_s: float, ctx):
        self.num, self.name, self.budget_s, self.ctx = num, name, budget_s, ctx
        self.checks: list[dict] = []
        self.figures: dict = {}
        self.blocks: list[tuple[str, str]] = []   # (title, markdown) for the report
        self.headline = ""
        self.status = "pass"
        self.error = None
        self.t0 = time.perf_counter()
        self.seconds = 0.0

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def sub(self, name: str, fn, *args, **kw):
        """Run one sub-check; its exception becomes a failed record and the section goes on.
        ``fn`` returns a dict of figures (key ``_status`` may say "info" for report-only checks,
        ``_note`` one line of explanation); it raises CheckFailed(message, figures) to fail with its
        figures kept. Returns the figures, or None if it did not pass."""
        rec = {"name": name, "status": "pass", "seconds": 0.0, "figures": {}}
        self.checks.append(rec)
        t0 = time.perf_counter()
        try:
            if self.left() <= 0:
                raise Skip(f"section time budget ({self.budget_s:.0f} s) spent before it started")
            if f"{self.num}.{name}" in self.ctx.inject:
                raise RuntimeError(f"injected failure of {self.num}.{name} (--inject-failure)")
            figs = fn(*args, **kw) or {}
            rec["status"] = figs.pop("_status", "pass")
            if "_note" in figs:
                rec["note"] = figs.pop("_note")
            rec["figures"] = figs
            return figs
        except CheckFailed as e:
            rec["status"], rec["error"], rec["figures"] = "fail", _last_line(e), e.figures
            rec["kind"] = "finding"
        except NeedsCuda as e:
            rec["status"], rec["note"] = "skipped", f"needs CUDA: {e}"
        except Skip as e:
            rec["status"], rec["note"] = "skipped", str(e)
        except BaseException as e:  # noqa: B036 -- a KeyboardInterrupt would end the whole check
            if isinstance(e, KeyboardInterrupt):
                raise
            rec["status"], rec["error"] = "fail", _last_line(e)
            # An assertion is a finding about the GPU path; anything else may be the check's own
            # code breaking, which the dry run in CI exists to catch.
            rec["kind"] = "finding" if isinstance(e, AssertionError) else "error"
            rec["traceback"] = traceback.format_exc()[-3000:]
        finally:
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            print(f"  [{self.num}.{name}] {rec['status']} ({rec['seconds']:.1f} s)"
                  + (f": {rec.get('error') or rec.get('note')}" if rec["status"] != "pass" else ""),
                  flush=True)
        return None

    def block(self, title: str, markdown: str) -> None:
        self.blocks.append((title, markdown))

    def finish(self) -> None:
        self.seconds = round(time.perf_counter() - self.t0, 2)
        states = [c["status"] for c in self.checks]
        if self.error or "fail" in states:
            self.status = "fail"
        elif states and all(s == "skipped" for s in states):
            self.status = "skipped"
        else:
            self.status = "pass"

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "seconds": self.seconds,
                "budget_s": self.budget_s, "error": self.error, "headline": self.headline,
                "checks": self.checks, "figures": self.figures,
                "blocks": [{"title": t, "markdown": m} for t, m in self.blocks]}


def _section_fn(num: int):
    from bench.gpu_check_lib import (s1_environment, s2_correctness, s3_determinism, s4_speed,
                                     s5_capture, s6_realrun)
    return {1: s1_environment.run, 2: s2_correctness.run, 3: s3_determinism.run, 4: s4_speed.run,
            5: s5_capture.run, 6: s6_realrun.run}[num]


def write_reports(ctx, sections: list[Section], meta: dict) -> None:
    data = dict(meta, wall_s=round(time.time() - meta["_t0"], 1), notes=ctx.notes,
                sections={str(s.num): s.as_dict() for s in sections})
    data.pop("_t0", None)
    (ctx.out / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str))
    md = ["# GPU check" + (" — DRY RUN" if ctx.dry else ""), ""]
    if ctx.dry:
        md += ["**DRY RUN on the CPU under TRITON_INTERPRET=1 at tiny sizes: no figure below is a "
               "GPU figure.** It only shows that every section's code runs.", ""]
    md += [f"- command: `{data['command']}`", f"- started {data['started']}, wall {data['wall_s']} s",
           f"- host: {data['host']}", ""]
    if ctx.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in ctx.notes] + [""]
    md += ["## Summary", "", "| § | section | status | time / budget (s) | checks | headline |",
           "|---|---|---|---|---|---|"]
    for s in sections:
        cnt = {}
        for c in s.checks:
            cnt[c["status"]] = cnt.get(c["status"], 0) + 1
        md.append(f"| {s.num} | {s.name} | **{s.status}** | {s.seconds:.0f} / {s.budget_s:.0f} | "
                  f"{', '.join(f'{v} {k}' for k, v in sorted(cnt.items()))} | {s.headline} |")
    for s in sections:
        md += ["", f"## {s.num}. {s.name}: {s.status}", ""]
        if s.error:
            md += [f"Section error: `{s.error}`", ""]
        md += ["| sub-check | status | s | figures / reason |", "|---|---|---|---|"]
        for c in s.checks:
            figs = ", ".join(f"{k}={_short(v)}" for k, v in c["figures"].items()
                             if not isinstance(v, (list, dict)))
            why = c.get("error") or c.get("note") or ""
            txt = "; ".join(x for x in (figs, why) if x).replace("|", "\\|")
            md.append(f"| {c['name']} | {c['status']} | {c['seconds']} | {txt} |")
        for title, body in s.blocks:
            md += ["", f"### {title}", "", body]
    (ctx.out / "gpu_check.md").write_text("\n".join(md) + "\n")


def _short(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.md / gpu_check.json")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, TRITON_INTERPRET=1, tiny sizes: checks the check, not the GPU")
    ap.add_argument("--sections", default="1,2,3,4,5,6", help="comma-separated subset, e.g. 1,2")
    # For tests of the check itself: make a sub-check ("4.train_step") or a section ("4") fail.
    ap.add_argument("--inject-failure", action="append", default=[], help=argparse.SUPPRESS)
    # Exercise the path without omegaconf on a machine that has it.
    ap.add_argument("--simulate-no-omegaconf", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)
    # The interpreter switch must precede the first import of a kernel module.
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    notes: list[str] = []
    if not a.dry_run and os.environ.get("TRITON_INTERPRET") == "1":
        notes.append("TRITON_INTERPRET=1 was set in the environment: removed for the CUDA run")
        del os.environ["TRITON_INTERPRET"]
    ensure_installed(argv, notes)
    check_omegaconf(notes, simulate_absent=a.simulate_no_omegaconf)

    import torch

    from bench.gpu_check_lib.common import Ctx
    cuda = torch.cuda.is_available() and not a.dry_run
    if not a.dry_run and not cuda:
        print("gpu_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    if a.dry_run:
        torch.set_num_threads(1)   # a small shared CI machine: see bench/conftest.py
        torch.set_flush_denormal(True)
        # The interpreter's cost is per program and per operation, not per element: 256-wide MLP
        # tiles run the same masked code in a fraction of the programs (the released model's
        # forward + forces: 43 s → 16 s here). The kernel tests still run their own small tiles.
        from aimnet_fast.kernels import mlp
        mlp.BLOCKS.update(BLOCK_M=256, BLOCK_N=256, BLOCK_K=256)
        notes.append("dry run: Triton MLP tiles enlarged to 256 (fewer interpreted programs); "
                     "the kernel tests in section 2 use their own tiles")
    ctx = Ctx(out=out, dry=a.dry_run, device=torch.device("cuda" if cuda else "cpu"), notes=notes,
              inject=set(a.inject_failure), simulate_no_omegaconf=a.simulate_no_omegaconf)
    try:
        wanted = sorted({int(x) for x in a.sections.split(",") if x.strip()})
        bad = [n for n in wanted if n not in SECTIONS]
        if bad:
            raise ValueError(bad)
    except ValueError:
        ap.error(f"--sections: numbers out of {sorted(SECTIONS)}, got {a.sections!r}")
    meta = {"dry_run": a.dry_run, "command": "python -m bench.gpu_check " + " ".join(argv),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": f"{platform.node()} {platform.machine()} python {platform.python_version()}",
            "sections_run": wanted, "_t0": time.time()}
    done: list[Section] = []
    for num in wanted:
        name, gpu_s, dry_s = SECTIONS[num]
        sec = Section(num, name, dry_s if a.dry_run else gpu_s, ctx)
        print(f"== {num}. {name} (budget {sec.budget_s} s)", flush=True)
        try:
            if str(num) in ctx.inject:
                raise RuntimeError(f"injected failure of section {num} (--inject-failure)")
            _section_fn(num)(sec, ctx)
        except BaseException as e:  # noqa: B036
            if isinstance(e, KeyboardInterrupt):
                raise
            sec.error = _last_line(e)
            print(f"  section {num} raised: {sec.error}", flush=True)
        finally:
            if ctx.cuda:
                torch.cuda.empty_cache()
        sec.finish()
        done.append(sec)
        write_reports(ctx, done, meta)
    print_summary(ctx, done, time.time() - meta["_t0"])
    if ctx.dry:   # the dry run checks the check: only its own errors fail it
        broken = [s for s in done if s.error or any(c.get("kind") == "error" for c in s.checks)]
        return 1 if broken else 0
    return 0 if all(s.status != "fail" for s in done) else 1


def print_summary(ctx, done: list[Section], wall: float) -> None:
    print("\n" + "=" * 100)
    print(f"GPU CHECK SUMMARY{' (DRY RUN, CPU interpreter: not GPU figures)' if ctx.dry else ''}"
          f" — wall {wall:.0f} s — report {ctx.out / 'gpu_check.md'}")
    for s in done:
        bad = [c for c in s.checks if c["status"] == "fail"]
        print(f"{s.num} {s.name:<12} {s.status.upper():<7} {s.seconds:5.0f}/{s.budget_s:<4.0f}s "
              f"{s.headline}"[:220])
        if s.error:
            print(f"    section error: {s.error}"[:300])
        for c in bad:
            print(f"    FAIL {c['name']}: {c.get('error')}"[:300])
    print("=" * 100, flush=True)


if __name__ == "__main__":
    sys.exit(main())
