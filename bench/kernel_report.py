"""Ahead-of-time compile every Triton kernel configuration for sm_90 and sm_80, without a GPU, and
write registers, spills and shared memory per kernel to bench/KERNELS.md.

The configurations live here, one builder per kernel module (``SPEC_BUILDERS``), with the block
sizes and warps the module's launch functions use; each is a dict ``{"name", "fn", "signature",
"constexprs"[, "num_warps", "num_stages"]}``. The signature is derived from the kernel's own
parameter list (``spec``), so a renamed, added or removed parameter is either picked up or refused
here, and a ``*_kernel`` of a module without any configuration is reported as an error. Each one is
compiled with ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc,
32))``.
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


def spec(name: str, fn, ptr: str, constexprs: dict, types: dict | None = None,
         num_warps: int = 4) -> dict:
    """A configuration of ``fn`` whose signature follows fn's parameters in order: constexpr
    parameters as such (``constexprs`` must give exactly those), the others from ``types``, else
    ``ptr`` (e.g. "*fp32") for names ending in ``_ptr`` and "i32" for scalars."""
    types = dict(types or {})
    params = fn.params
    wanted = {p.name for p in params if p.is_constexpr}
    if set(constexprs) != wanted:
        raise ValueError(f"{name}: constexprs {sorted(constexprs)} but {fn.__name__} has {sorted(wanted)}")
    unknown = set(types) - {p.name for p in params}
    if unknown:
        raise ValueError(f"{name}: {fn.__name__} has no parameter {sorted(unknown)}")
    sig = {}
    for p in params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        else:
            sig[p.name] = types.get(p.name, ptr if p.name.endswith("_ptr") else "i32")
    return {"name": name, "fn": fn, "signature": sig, "constexprs": dict(constexprs),
            "num_warps": num_warps}


def radial_specs(radial) -> list[dict]:
    idx = {"nbr_ptr": "*i64", "start_ptr": "*i64"}
    out = []
    for fp, fwd, bwd, bwd2 in (("fp32", radial.BLOCK_P, radial.BLOCK_P_BWD, radial.BLOCK_P_BWD2),
                               ("fp64", radial.BLOCK_P_FP64, radial.BLOCK_P_BWD_FP64,
                                radial.BLOCK_P_BWD2_FP64)):
        ptr, f = f"*{fp}", radial.BLOCK_F
        out.append(spec(f"radial_fwd_{fp}", radial.radial_fwd_kernel, ptr,
                        {"BLOCK_P": fwd, "BLOCK_F": f}, idx))
        # with forces (both gradients) and training on energies (no coordinate gradient)
        for suffix, need_coord in (("", True), ("_energy_only", False)):
            out.append(spec(f"radial_bwd{suffix}_{fp}", radial.radial_bwd_kernel, ptr,
                            {"BLOCK_P": bwd, "BLOCK_F": f, "NEED_COORD": need_coord,
                             "NEED_AFV": True}, idx))
        out.append(spec(f"radial_bwd2_{fp}", radial.radial_bwd2_kernel, ptr,
                        {"BLOCK_P": bwd2, "BLOCK_F": f}, idx))
    return out


def angular_specs(angular) -> list[dict]:
    idx = {"trip_ptr": "*i64", "tp_ptr": "*i64", "start_ptr": "*i64", "order_ptr": "*i64",
           "order_j_ptr": "*i64", "start_j_ptr": "*i64", "order_k_ptr": "*i64",
           "start_k_ptr": "*i64"}

    def typed(fn):
        return {k: v for k, v in idx.items() if k in {p.name for p in fn.params}}

    def tiled(label, fn, block, fp):
        return spec(f"angular_{label}_{fp}", fn, f"*{fp}",
                    {"BLOCK_T": block, "BLOCK_F": angular.BLOCK_F}, typed(fn))
    out = []
    for fp, fwd, bwd, bwd2 in (("fp32", angular.BLOCK_T, angular.BLOCK_T_BWD, angular.BLOCK_T_BWD2),
                               ("fp64", angular.BLOCK_T_FP64, angular.BLOCK_T_BWD_FP64,
                                angular.BLOCK_T_BWD2_FP64)):
        ptr, f = f"*{fp}", angular.BLOCK_F
        out += [tiled("fwd", angular.angular_fwd_kernel, fwd, fp),
                tiled("bwd_centre", angular.angular_bwd_centre_kernel, bwd, fp)]
        pair = angular.angular_bwd_pair_kernel
        for suffix, tangent, block in (("", False, bwd), ("_tangent", True, bwd2)):
            out.append(spec(f"angular_bwd_pair{suffix}_{fp}", pair, ptr,
                            {"BLOCK_T": block, "BLOCK_F": f, "TANGENT": tangent}, typed(pair)))
        gather = angular.angular_bwd_gather_kernel
        # the double backward launches the gather with its own block: a second configuration
        # where that differs
        for label, block in (("bwd_gather", bwd), ("bwd2_gather", bwd2))[:1 if bwd2 == bwd else 2]:
            out.append(spec(f"angular_{label}_{fp}", gather, ptr, {"BLOCK_T": block},
                            typed(gather)))
        out += [tiled("bwd2_centre", angular.angular_bwd2_centre_kernel, bwd2, fp),
                tiled("bwd2_gout", angular.angular_bwd2_gout_kernel, bwd2, fp)]
    return out


def mlp_specs(mlp) -> list[dict]:
    def one(name, dtype, **flags):
        constexprs = {"SPLIT_A": False, "HAS_BIAS": False, "EPILOGUE_ELU": False,
                      "PROLOGUE_ELU_GRAD": False, "BIAS_GRAD": False, "PRECISION": "ieee",
                      **mlp.BLOCKS, **flags}
        return spec(name, mlp._matmul_kernel, dtype, constexprs, num_warps=mlp.NUM_WARPS)
    return [
        one("mlp_fwd_bias_elu_ieee", "*fp32", HAS_BIAS=True, EPILOGUE_ELU=True),
        one("mlp_fwd_bias_elu_tf32", "*fp32", HAS_BIAS=True, EPILOGUE_ELU=True, PRECISION="tf32"),
        one("mlp_fwd_bias_elu_bf16", "*fp32", HAS_BIAS=True, EPILOGUE_ELU=True, PRECISION="bf16"),
        one("mlp_fwd_cat_bias_elu_tf32", "*fp32", SPLIT_A=True, HAS_BIAS=True, EPILOGUE_ELU=True,
            PRECISION="tf32"),
        one("mlp_fwd_bias_fp64", "*fp64", HAS_BIAS=True),
        one("mlp_bwd_input_elu_ieee", "*fp32", PROLOGUE_ELU_GRAD=True),
        one("mlp_bwd_input_elu_tf32", "*fp32", PROLOGUE_ELU_GRAD=True, PRECISION="tf32"),
        one("mlp_bwd_input_elu_bf16", "*fp32", PROLOGUE_ELU_GRAD=True, PRECISION="bf16"),
        one("mlp_bwd_weight_bias_elu_tf32", "*fp32", PROLOGUE_ELU_GRAD=True, BIAS_GRAD=True,
            PRECISION="tf32"),
        one("mlp_bwd_weight_bias_elu_ieee", "*fp32", PROLOGUE_ELU_GRAD=True, BIAS_GRAD=True),
        one("mlp_bwd_weight_bias_elu_bf16", "*fp32", PROLOGUE_ELU_GRAD=True, BIAS_GRAD=True,
            PRECISION="bf16"),
    ]


def neighbors_specs(nb) -> list[dict]:
    blocks, warps = dict(nb.BLOCKS), nb.NUM_WARPS
    return [
        spec("neighbors_count_fp32", nb._count_kernel, "*fp32", blocks,
             {"offsets_ptr": "*i32", "cut2_bits": "i64", "counts_ptr": "*i32"}, warps),
        spec("neighbors_write_fp32", nb._write_kernel, "*fp32", blocks,
             {"offsets_ptr": "*i32", "cut2_bits": "i64", "first_ptr": "*i64", "pairs_ptr": "*i64",
              "capacity": "i64"}, warps),
        spec("neighbors_triplets", nb._triplet_kernel, "*i64", {"BLOCK": nb.TRIPLET_BLOCK},
             {"n_pairs_cap": "i64", "n_trip_cap": "i64"}, num_warps=1),
    ]


#: kernel module (under aimnet_fast.kernels) → its configurations
SPEC_BUILDERS = {"angular": angular_specs, "mlp": mlp_specs, "neighbors": neighbors_specs,
                 "radial": radial_specs}


def kernel_specs():
    """(module name, specs or the exception that stopped them) per kernel module. Each module is
    imported on its own, so that one that does not import does not hide the others."""
    import aimnet_fast.kernels as pkg
    found = []
    for name in sorted(SPEC_BUILDERS):
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{name}")
            specs = SPEC_BUILDERS[name](mod)
        except Exception as err:
            found.append((name, err))
            continue
        covered = {id(s["fn"]) for s in specs}
        missing = sorted(k for k, v in vars(mod).items()
                         if k.endswith("_kernel") and isinstance(v, triton.runtime.jit.JITFunction)
                         and id(v) not in covered)
        if missing:
            found.append((name, LookupError(f"no configuration for {', '.join(missing)}")))
        found.append((name, specs))
    unlisted = sorted({m.name for m in pkgutil.iter_modules(pkg.__path__)
                       if not m.name.startswith("_")} - set(SPEC_BUILDERS))
    for name in unlisted:
        found.append((name, LookupError("a kernel module without a spec builder in "
                                        "bench/kernel_report.py")))
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
        for mod_name, specs in kernel_specs():
            if isinstance(specs, Exception):
                errors.append(f"`kernels/{mod_name}.py`: {specs!r}")
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
        f"{triton.__version__}: every configuration of `bench/kernel_report.py` (one builder per "
        f"module under `kernels/`), compiled "
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
