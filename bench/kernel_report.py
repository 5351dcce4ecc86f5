"""Ahead-of-time compile every Triton kernel configuration for sm_90 and sm_80, without a GPU, and
write registers, spills and shared memory per kernel to bench/KERNELS.md.

Every module under kernels/ that defines ``AOT_SPECS`` is picked up: a list of dicts
``{"name", "fn", "signature", "constexprs"[, "num_warps", "num_stages"]}``. Each one is compiled
with ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))``.
The tools bundled in triton's wheel then read the result:
- ``cuobjdump --dump-resource-usage`` on the cubin: registers, stack, local and static shared memory;
- the ptxas Triton itself runs for the arch, with Triton's flags, ``-v`` on the PTX: spill stores
  and spill loads (its register count must equal the cubin's; a mismatch is flagged);
- Triton's own metadata: the dynamic shared memory the launch reserves (pipelining buffers).

Usage: python bench/kernel_report.py [--out bench/KERNELS.md] [--arch 90 80] [--only NAME_SUBSTRING]
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default of triton 3.9, stated

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def kernel_modules():
    """(module name, AOT_SPECS) of every module of aimnet_fast.kernels that defines them."""
    import aimnet_fast.kernels as pkg
    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception as err:  # a half-written module must not hide the others
            found.append((info.name, err))
            continue
        if hasattr(mod, "AOT_SPECS"):
            found.append((info.name, mod.AOT_SPECS))
    return found


def _resource_usage(cubin: bytes, tmp: Path) -> dict:
    path = tmp / "k.cubin"
    path.write_bytes(cubin)
    text = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", str(path)],
                          capture_output=True, text=True, check=True).stdout
    out = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        out[key] = int(m.group(1)) if m else None
    return out


def _spills(ptx: str, cc: int, tmp: Path) -> dict:
    """Rerun the ptxas that Triton itself runs for this arch, with its flags (triton 3.9,
    backends/nvidia/compiler.py make_cubin: legacy ptxas below sm_90, ptxas-blackwell from sm_90,
    -lineinfo -v --regAllocOptLevel=2), and read the spills from its log; its register count is
    checked against the cubin's so a different compile would show."""
    path = tmp / "k.ptx"
    path.write_text(ptx)
    cmd = [get_ptxas(cc).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
           f"--gpu-name={sm_arch_from_capability(cc)}", str(path), "-o", str(tmp / "check.cubin")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    text = res.stdout + res.stderr
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    r = re.search(r"Used (\d+) registers", text)
    if not m:
        return {"spill_st": None, "spill_ld": None, "ptxas_regs": None,
                "ptxas": text.strip()[-300:]}
    return {"spill_st": int(m.group(1)), "spill_ld": int(m.group(2)),
            "ptxas_regs": int(r.group(1)) if r else None}


def compile_spec(spec: dict, cc: int, tmp: Path) -> dict:
    options = {"num_warps": spec.get("num_warps", 4)}
    if "num_stages" in spec:
        options["num_stages"] = spec["num_stages"]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernel = triton.compile(ASTSource(spec["fn"], spec["signature"], spec["constexprs"]),
                                target=GPUTarget("cuda", cc, 32), options=options)
    row = {"compile_s": time.perf_counter() - t0, "num_warps": options["num_warps"],
           "num_stages": getattr(kernel.metadata, "num_stages", None),
           "dyn_shared": kernel.metadata.shared}
    row.update(_resource_usage(kernel.asm["cubin"], tmp))
    row.update(_spills(kernel.asm["ptx"], cc, tmp))
    return row


def blocks_per_sm(r: dict) -> int | None:
    """Resident blocks per SM from registers, shared memory and warps (an estimate)."""
    if r.get("REG") is None:
        return None
    warps = r["num_warps"]
    regs_per_warp = -(-r["REG"] * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    smem = (r.get("SHARED") or 0) + (r.get("dyn_shared") or 0) + 1024
    by_smem = ({90: 228, 80: 164}[r["cc"]] * 1024) // smem
    return min(by_regs, by_smem, 64 // warps, 32)


def _fmt_constexprs(c: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in c.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "KERNELS.md"))
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--only", default=None, help="compile only specs whose name contains this")
    args = ap.parse_args(argv)

    rows, errors = [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for mod_name, specs in kernel_modules():
            if isinstance(specs, Exception):
                errors.append(f"`kernels/{mod_name}.py` did not import: {specs!r}")
                continue
            for spec in specs:
                if args.only and args.only not in spec["name"]:
                    continue
                for cc in args.arch:
                    label = f"{mod_name}:{spec['name']} sm_{cc}"
                    try:
                        row = compile_spec(spec, cc, tmp)
                    except Exception as err:
                        errors.append(f"{label}: {type(err).__name__}: {str(err)[:300]}")
                        print(f"FAIL {label}: {err}", file=sys.stderr)
                        traceback.print_exc(limit=1)
                        continue
                    row.update(module=mod_name, name=spec["name"], cc=cc,
                               constexprs=_fmt_constexprs(spec["constexprs"]))
                    rows.append(row)
                    print(f"{label}: {row['REG']} regs, spills {row['spill_st']}/{row['spill_ld']} B, "
                          f"shared {row['dyn_shared']} B ({row['compile_s']:.1f} s)", flush=True)

    spilled = [r for r in rows if (r["spill_st"] or 0) or (r["spill_ld"] or 0) or (r["LOCAL"] or 0)]
    lines = [
        "# Triton kernels: registers, spills and shared memory (ahead-of-time, no GPU)",
        "",
        f"Written by `python bench/kernel_report.py` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with triton "
        f"{triton.__version__}: every `AOT_SPECS` entry of every module under `kernels/`, compiled "
        f"for {', '.join(f'sm_{a}' for a in args.arch)} (sm_90 as Triton targets it, sm_90a).",
        "",
        "- regs, stack, local, static shared: `cuobjdump --dump-resource-usage` on Triton's cubin",
        "- spill stores / loads (bytes): `ptxas -v` on Triton's PTX, the same ptxas binary and flags "
        "Triton uses for that arch (bundled `ptxas` for sm_80, `ptxas-blackwell` for sm_90; "
        "`-lineinfo --regAllocOptLevel=2`); regs marked * differ from the cubin's (should not happen)",
        "- dyn shared: the dynamic shared memory Triton reserves at launch (pipeline buffers)",
        "- blocks/SM: an estimate of resident blocks per SM, the least of the register limit "
        "(65,536 per SM, allocated per warp in units of 256), the shared-memory limit (228 KiB on "
        "sm_90, 164 KiB on sm_80, 1 KiB reserved per block) and 64 warps per SM (32 blocks at most)",
        "",
        f"Kernels that spill: {', '.join(sorted({r['name'] for r in spilled})) or 'none'}.",
        "",
        "| module | kernel | arch | warps | stages | regs | spill st | spill ld | stack | local | "
        "static shared | dyn shared | blocks/SM | constexprs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = "" if r.get("ptxas_regs") == r["REG"] else "*"
        lines.append(f"| {r['module']} | {r['name']} | sm_{r['cc']} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r['REG']}{mark} | {r['spill_st']} | {r['spill_ld']} | "
                     f"{r['STACK']} | {r['LOCAL']} | {r['SHARED']} | {r['dyn_shared']} | "
                     f"{blocks_per_sm(r)} | {r['constexprs']} |")
    if errors:
        lines += ["", "## Did not compile", ""] + [f"- {e}" for e in errors]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {len(rows)} compiled, {len(errors)} failed, {len(spilled)} spilling")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
