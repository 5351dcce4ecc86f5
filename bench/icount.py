"""Instruction counts of the guarded CPU benchmarks under callgrind: the noise-free half of the guard.

Time on a shared 2-core VM moves by several percent between processes however many rounds are
taken (memory layout, the neighbour's load, frequency), so a time limit tight enough to catch 10 %
on a small workload also fires on noise. The number of instructions a workload executes, counted by
valgrind's callgrind on its simulated CPU, does not depend on what else the machine is doing and
repeats to about 0.1 % between processes. It catches every regression that adds work (an extra copy,
a sort, a Python loop, a lost fast path, a kernel that no longer vectorises) at a few percent; it
cannot see one that runs the same instructions slower (more cache misses, a worse memory layout,
contention), which stays the time guard's job.

How ``pytest bench/`` gets the counts (bench/test_bench_instructions.py): one child process

    valgrind --tool=callgrind --instr-atstart=no python -m pytest <the guarded CPU benchmarks>

with ``AIMNET_FAST_ICOUNT_CHILD=1``. In the child, ``Guard.measure`` hands each workload to
``Counter.measure``: one uninstrumented warm-up call (lazy initialisation, oneDNN's JIT, the
allocator's free lists), then one call between ``icount_start``/``icount_stop`` (bench/icount_shim.c)
with Python's garbage collector off, so that a collection never lands inside one run's region and
not another's. Callgrind writes one dump per benchmark, named after it; ``run`` reads their totals.
Everything outside the regions runs uninstrumented; the cost is about a minute for importing
torch plus roughly 50× the native time of one call of each workload, split over two children.

The counts depend on the torch build and on the CPU features valgrind presents (it hides AVX-512):
the committed ones (bench/baselines/base.json) hold for the builds named beside them, and where
this machine's differ, the base commit is counted in the same run (``run(root=worktree)``).
"""
from __future__ import annotations

import ctypes
import gc
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM_SOURCE = HERE / "icount_shim.c"
ENV_CHILD = "AIMNET_FAST_ICOUNT_CHILD"

#: The guarded CPU benchmarks, in two children that run side by side (one core each), of about
#: equal work. The children count the benchmark bodies as they are, except the S66x8 batch of
#: test_bench_reference.py (32 molecules instead of 128) and cost per atom (up to 300 atoms; see
#: bench/conftest.py): callgrind runs ~50× slower than native.
CHILD_GROUPS = (
    ("test_bench_reference.py::test_forward_backward", "test_bench_ops.py",
     "test_bench_data.py::test_bench_collate"),
    ("test_bench_reference.py::test_predict_with_forces", "test_bench_reference.py::test_forward",
     "test_bench_reference.py::test_cost_per_atom", "test_bench_train.py::test_bench_train_step"),
)


def in_child() -> bool:
    return os.environ.get(ENV_CHILD) == "1"


def _shim_path() -> Path:
    digest = hashlib.sha256(SHIM_SOURCE.read_bytes()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"aimnet_fast_icount_shim_{digest}.so"


def build_shim() -> Path:
    """Compile bench/icount_shim.c once per source version (into the temp dir) and return the .so.

    Raises RuntimeError naming the compiler's complaint (usually: valgrind's headers missing)."""
    so = _shim_path()
    if so.exists():
        return so
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) to build bench/icount_shim.c")
    tmp = so.with_suffix(f".{os.getpid()}.tmp")
    r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SHIM_SOURCE)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cannot build bench/icount_shim.c (are valgrind's headers installed?): "
                           f"{r.stderr.strip()[-300:]}")
    os.replace(tmp, so)  # atomic: a concurrent build never loads a half-written file
    return so


def unavailable_reason() -> str | None:
    """Why instruction counting cannot run here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "instruction counts need valgrind (Linux)"
    if shutil.which("valgrind") is None:
        return "valgrind not found (Debian: apt-get install valgrind)"
    try:
        build_shim()
    except RuntimeError as e:
        return str(e)
    return None


class Counter:
    """The child's side: counts one call of a workload between the shim's start and stop."""

    def __init__(self):
        self.lib = ctypes.CDLL(str(build_shim()))
        self.lib.icount_stop.argtypes = [ctypes.c_char_p]
        if not self.lib.icount_on_valgrind():
            raise RuntimeError(f"{ENV_CHILD}=1 but this process is not running under valgrind")

    def measure(self, name: str, fn):
        fn()  # warm-up, uninstrumented
        gc.collect()
        gc.disable()
        try:
            self.lib.icount_start()
            out = fn()
            self.lib.icount_stop(name.encode())
        finally:
            gc.enable()
        return out


#: Valgrind 3.19 runs AVX2's fused multiply-adds through slow helpers: MKL's AVX2 sgemm ran at
#: ~3 M instructions/s under callgrind, 90× slower than its SSE4.2 path. The children therefore
#: ask MKL, oneDNN and ATen for their SSE paths. The counts are of that code path, a deterministic
#: proxy for the work our code asks for, not of what runs natively.
SSE_ONLY = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41",
            "ATEN_CPU_CAPABILITY": "default"}

_DESC = re.compile(r"^desc: Trigger: Client Request: (.+)$")
_TOTALS = re.compile(r"^totals: (\d+)")


def read_dumps(out_dir: Path) -> dict[str, int]:
    """name → instructions (Ir) from the callgrind dumps in ``out_dir``."""
    counts: dict[str, int] = {}
    for path in sorted(out_dir.glob("cg.*")):
        name = total = None
        with open(path, errors="replace") as f:
            for line in f:
                m = _DESC.match(line)
                if m:
                    name = m.group(1).strip()
                m = _TOTALS.match(line)
                if m:
                    total = int(m.group(1))
        if name is not None and total is not None:
            if name in counts:
                raise RuntimeError(f"two callgrind dumps are named {name!r}")
            counts[name] = total
    return counts


def run(select: list[str] | None = None, timeout_s: float = 1800,
        root: Path | None = None) -> dict[str, int]:
    """Run the guarded CPU benchmarks once under callgrind; return name → instructions per call.

    ``select``: extra pytest arguments for the children (``["-k", "neighbor_search"]``).
    ``root``: the source tree to count (default this one), its modules imported from its own files
    by bench/guard_child.py."""
    from guard_ab import CHILD, child_env
    root = (root or HERE.parent).resolve()
    env = child_env({ENV_CHILD: "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                     "BENCH_THREADS": "1", **SSE_ONLY})
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="aimnet_fast_icount_") as tmp:
        children = []
        for k, group in enumerate(CHILD_GROUPS):
            out = Path(tmp) / f"group{k}"
            out.mkdir()
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-line=no",
                   f"--callgrind-out-file={out}/cg.%p", sys.executable, str(CHILD), str(root),
                   *(f"bench/{node}" for node in group),
                   "-q", "-p", "no:cacheprovider", "--benchmark-disable", *(select or [])]
            log = open(out / "log.txt", "w+")
            children.append((cmd, out, log, subprocess.Popen(cmd, cwd=root, env=env,
                                                             stdout=log, stderr=subprocess.STDOUT)))
        for cmd, out, log, proc in children:
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                for *_, p in children:
                    p.kill()
                raise RuntimeError(f"a callgrind child ran past {timeout_s:.0f} s: {' '.join(cmd)}") from None
            log.seek(0)
            text = log.read()
            log.close()
            # 5: pytest selected no test in this group (a -k that matches the other group only)
            if rc not in (0, 5):
                raise RuntimeError(f"a callgrind child failed (exit {rc}): {' '.join(cmd)}\n{text[-3000:]}")
            found = read_dumps(out)
            if set(found) & set(counts):
                raise RuntimeError(f"counted twice: {sorted(set(found) & set(counts))}")
            counts.update(found)
    return counts
