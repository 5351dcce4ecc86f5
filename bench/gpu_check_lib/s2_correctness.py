"""Section 2: the kernels are right on this device, against the float64 reference path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import torch

from .bootstrap import REPO, SHARED
from .common import CheckFailed, md_table, rel_fro

KERNEL_TEST_FILES = ["tests/test_kernel_radial.py", "tests/test_kernel_angular.py",
                     "tests/test_kernel_mlp.py", "tests/test_kernel_neighbors.py",
                     "tests/test_model_triton.py", "tests/test_ops.py"]
#: Dry run: one or two fast tests per kernel file (each a few seconds in the interpreter).
DRY_SELECTION = ["tests/test_kernel_radial.py::test_int32_pairs",
                 "tests/test_kernel_angular.py::test_int32_indices",
                 "tests/test_kernel_mlp.py::test_dispatch_through_ops",
                 "tests/test_kernel_mlp.py::test_zero_rows",
                 "tests/test_kernel_neighbors.py::test_counts_match_reference_and_isolated_atoms_have_none",
                 "tests/test_ops.py::test_unknown_backend_is_refused_when_built_and_when_set"]
EMBEDDING = [768, 512, 256, 256]
#: Loose bounds: the figures are the point; these catch only a broken precision path.
BOUND_OUT = {"ieee": 1e-5, "tf32": 1e-2, "bf16": 3e-2}
BOUND_GRAD = {"ieee": 1e-4, "tf32": 2e-2, "bf16": 6e-2}


def _kernel_tests(sec, ctx):
    junit = ctx.out / "kernel_tests_junit.xml"
    jsonl = ctx.out / "kernel_tests_devices.jsonl"
    for p in (junit, jsonl):
        p.unlink(missing_ok=True)
    sel = DRY_SELECTION if ctx.dry else KERNEL_TEST_FILES
    env = dict(os.environ, GPU_CHECK_DEVICES_JSONL=str(jsonl),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if ctx.dry:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)   # tests/conftest.py must decide this from CUDA alone
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
           "bench.gpu_check_lib.pytest_devices", f"--junitxml={junit}", "-o", "junit_family=xunit1",
           *sel]
    # What is left after the pytest run: the released model, the MLP errors and the NaN check.
    timeout = max(10.0, sec.left() - (30 if not ctx.dry else 40))
    log = ctx.out / "kernel_tests.log"
    timed_out = False
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures, per_test, session = [], [], {}
    if junit.exists():
        root = ET.parse(junit).getroot()
        for tc in root.iter("testcase"):
            name = f"{tc.get('file') or tc.get('classname')}::{tc.get('name')}"
            kind = next((c.tag for c in tc if c.tag in ("failure", "error", "skipped")), "passed")
            counts["failed" if kind == "failure" else kind] += 1
            if kind in ("failure", "error"):
                el = tc.find(kind)
                failures.append((name, (el.get("message") or "").splitlines()[0][:300]
                                 if el is not None else ""))
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            d = json.loads(line)
            if "session" in d:
                session = d["session"]
            else:
                per_test.append(d)
        if not junit.exists():  # cut short: count what the plugin saw
            for d in per_test:
                counts[d["outcome"]] = counts.get(d["outcome"], 0) + 1
                if d["outcome"] in ("failed", "error"):
                    failures.append((d["nodeid"], d.get("message", "")))
    interp = session.get("TRITON_INTERPRET")
    interp_ok = (interp == "1") if ctx.dry else (interp is None and session.get("cuda_available"))
    cpu_tests = sorted(d["nodeid"] for d in per_test if d.get("devices", {}).get("cpu"))
    cpu_files = sorted({n.split("::")[0] for n in cpu_tests})
    if ctx.cuda:
        sec.figures["tests_launching_kernels_on_cpu_tensors"] = cpu_tests
        body = ("Tests that handed CPU tensors to a Triton kernel while CUDA was available (they "
                "need to choose the CUDA device; a change in the test files):\n\n"
                + ("\n".join(f"- `{n}`" for n in cpu_tests) or "- none"))
    else:
        body = (f"Dry run: every launch is on the CPU by construction ({len(cpu_tests)} tests "
                "launched kernels); the list is meaningful only on CUDA.")
    sec.block("Kernel tests: device of the kernel launches", body)
    if failures:
        sec.block("Kernel tests: failures", md_table(["test", "message"], failures[:80]))
    figs = dict(counts, selection="dry subset" if ctx.dry else "full", return_code=rc,
                timed_out=timed_out, timeout_s=round(timeout), TRITON_INTERPRET_in_tests=interp,
                files_with_cpu_launches=cpu_files, log=str(log.name))
    if not interp_ok:
        raise CheckFailed(f"tests/conftest.py left TRITON_INTERPRET={interp!r} "
                             f"(CUDA available: {session.get('cuda_available')})", figs)
    if timed_out:
        raise CheckFailed(f"pytest cut off after {timeout:.0f} s: {counts} so far (see {log.name})",
                          figs)
    if counts["failed"] or counts["error"] or rc not in (0, 5):
        raise CheckFailed(f"{counts['failed']} failed, {counts['error']} errors of "
                          f"{sum(counts.values())}: first {failures[:1]} (rc {rc})", figs)
    return figs


def _reference_outputs_triton(ctx):
    """The released cv0 model on backend="triton" against the original implementation's outputs,
    with tests/test_reference_outputs.py's tolerances (its ``check``)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_reference_outputs import TOL, check

    from aimnet_fast.batch import Batch
    from aimnet_fast.checkpoint import convert_released
    ref = json.loads((SHARED / "reference" / "aimnet_original_outputs.json").read_text())["molecules"]
    if ctx.dry:   # the interpreter costs seconds per atom: the smallest molecule only
        ref = sorted(ref, key=lambda m: len(m["numbers"]))[:1]
    d = SHARED / "aimnet_pretrained"
    model = convert_released(d / "aimnet_cv0.pt", d / "aimnet_mt_cv0.pt").eval()
    model.backend = "triton"
    model = model.to(ctx.device)
    b = Batch.from_molecules([(m["numbers"], m["coord_A"]) for m in ref]).validate().to(ctx.device)
    coord = b.coord.clone().requires_grad_(True)
    out = model(b.numbers, coord, b.mol_idx, b.n_mol)
    forces = -torch.autograd.grad(out["energy"].sum(), coord)[0]
    worst = {"energy": 0.0, "forces": 0.0, "elmoments": 0.0, "volumes": 0.0}
    for k, m in enumerate(ref):
        a, e = int(b.offsets[k]), int(b.offsets[k + 1])
        got = {"energy": out["energy"][k].item(), "forces": forces[a:e].detach().cpu().double(),
               "elmoments": out["elmoments"][a:e].detach().cpu().double(),
               "volumes": out["volumes"][a:e].detach().cpu().double()}
        r = m["models"][0]
        worst["energy"] = max(worst["energy"], abs(got["energy"] - r["energy_Ha"]))
        worst["forces"] = max(worst["forces"], float((got["forces"] - torch.tensor(
            r["forces_Ha_per_A"], dtype=torch.float64)).abs().max()))
        worst["elmoments"] = max(worst["elmoments"], float((got["elmoments"] - torch.tensor(
            r["elmoments"], dtype=torch.float64)[0]).abs().max()))
        worst["volumes"] = max(worst["volumes"], float((got["volumes"] - torch.tensor(
            r["volumes_bohr3"], dtype=torch.float64)[0]).abs().max()))
        got["forces"], got["elmoments"], got["volumes"] = (got[x].float() for x in
                                                            ("forces", "elmoments", "volumes"))
        check(got, r)
    return {"molecules": len(ref), **{f"max_err_{k}": v for k, v in worst.items()},
            "tolerances": "tests/test_reference_outputs.py TOL " + json.dumps(TOL)}


def _embedding_pair(ctx):
    from aimnet_fast.model import build_elu_mlp
    sizes = [64, 32, 32, 16] if ctx.dry else EMBEDDING
    rows = 32 if ctx.dry else 4096
    torch.manual_seed(0)
    net = build_elu_mlp(sizes, last_activation=True).to(ctx.device)
    g = torch.Generator().manual_seed(1)
    x = (0.5 * torch.randn(rows, sizes[0], generator=g)).to(ctx.device)
    gy = torch.randn(rows, sizes[-1], generator=g).to(ctx.device)
    return sizes, net, x, gy


def _mlp_precision(ctx):
    """Relative Frobenius error of the output and of the first layer's weight gradient against
    the float64 reference (the same layers in float64 on the same inputs)."""
    import copy

    from aimnet_fast import ops
    sizes, net, x, gy = _embedding_pair(ctx)
    ref_net = copy.deepcopy(net).double()
    ref = ref_net(x.double())
    ref.backward(gy.double())
    ref_gw = ref_net[0].weight.grad
    figs, bad = {"sizes": "→".join(map(str, sizes)), "rows": x.shape[0]}, []
    for p in ("ieee", "tf32", "bf16"):
        net.zero_grad(set_to_none=True)
        out = ops.elu_mlp(x, net, backend="triton", precision=p)
        out.backward(gy)
        eo, eg = rel_fro(out, ref), rel_fro(net[0].weight.grad, ref_gw)
        figs[f"{p}_out_rel_err"], figs[f"{p}_wgrad_rel_err"] = eo, eg
        if not (eo < BOUND_OUT[p] and eg < BOUND_GRAD[p]):
            bad.append(f"{p}: out {eo:.2e} (bound {BOUND_OUT[p]:g}), weight grad {eg:.2e} "
                       f"(bound {BOUND_GRAD[p]:g})")
    if ctx.dry:
        figs["_note"] = "interpreter: tf32 runs as full float32 there, bf16 is emulated"
    if bad:
        raise CheckFailed("; ".join(bad), figs)
    return figs


def _nan_propagation(ctx):
    """A NaN input must give a NaN output row, not a silently finite one. Compiled
    tl.minimum/tl.maximum drop NaNs unless told otherwise, which the ELU epilogue may do."""
    from aimnet_fast import ops
    sizes, net, x, _ = _embedding_pair(ctx)
    x = x.clone()
    row = 3
    x[row, 0] = float("nan")
    figs, bad = {}, []
    with torch.no_grad():
        for p in ("ieee", "tf32", "bf16"):
            out = ops.elu_mlp(x, net, backend="triton", precision=p)
            nan_in_row = int(torch.isnan(out[row]).sum())
            others_finite = bool(torch.isfinite(torch.cat([out[:row], out[row + 1:]])).all())
            figs[f"{p}_nan_in_row"] = f"{nan_in_row}/{out.shape[1]}"
            if nan_in_row != out.shape[1] or not others_finite:
                bad.append(f"{p}: {nan_in_row} of {out.shape[1]} outputs of the NaN row are NaN"
                           + ("" if others_finite else "; other rows not finite"))
        ref = net(x)
        figs["torch_reference_nan_in_row"] = f"{int(torch.isnan(ref[row]).sum())}/{ref.shape[1]}"
    if bad:
        raise CheckFailed("NaN dropped by the Triton MLP: " + "; ".join(bad), figs)
    return figs


def run(sec, ctx):
    sec.sub("kernel_tests", _kernel_tests, sec, ctx)
    r = sec.sub("reference_outputs_triton", _reference_outputs_triton, ctx) or {}
    sec.sub("mlp_precision_vs_float64", _mlp_precision, ctx)
    sec.sub("nan_propagation", _nan_propagation, ctx)
    kt = next((c for c in sec.checks if c["name"] == "kernel_tests"), {})
    sec.headline = (f"kernel tests: {kt.get('figures', {}).get('passed', '?')} passed, "
                    f"{kt.get('figures', {}).get('failed', '?')} failed; reference outputs: "
                    f"{'ok' if r else 'FAIL'}")
