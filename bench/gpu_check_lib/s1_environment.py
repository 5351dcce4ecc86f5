"""Section 1: what machine this is, and its measured ceilings (the peaks MFU is taken against)."""
from __future__ import annotations

import platform
import shutil
import subprocess

import torch

from .common import NeedsCuda, median, time_fn


def _versions(ctx):
    import triton
    figs = {"python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "torch_cuda": torch.version.cuda or "none",
            "device": str(ctx.device)}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        figs.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                    memory_GiB=round(p.total_memory / 2**30, 1))
    else:
        figs["gpu"] = "none (dry run on the CPU)"
    return figs


def _nvidia_smi(ctx):
    if not ctx.cuda:
        raise NeedsCuda("nvidia-smi not queried in the dry run")
    if not shutil.which("nvidia-smi"):
        return {"_status": "info", "_note": "nvidia-smi not on PATH"}
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm",
                        "--format=csv"], capture_output=True, text=True, timeout=20)
    return {"nvidia_smi": " / ".join(r.stdout.strip().splitlines()[1:]) or r.stderr.strip()}


def _matmul_ceilings(ctx):
    """Dense products of random data (zeros would let a clever unit skip work). The TF32 switch
    is restored afterwards, whatever it was."""
    n = 64 if ctx.dry else 8192
    reps = 3 if ctx.dry else 8
    old = torch.backends.cuda.matmul.allow_tf32
    figs = {"n": n}
    try:
        for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                                  ("bf16", torch.bfloat16, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            g = torch.Generator(device=ctx.device).manual_seed(0)
            a = torch.randn(n, n, device=ctx.device, generator=g).to(dtype)
            b = torch.randn(n, n, device=ctx.device, generator=g).to(dtype)
            t = median(time_fn(ctx, lambda a=a, b=b: a @ b, warmup=2, reps=reps))
            flops = 2.0 * n ** 3 / t
            ctx.ceilings[name] = flops
            figs[f"{name}_TFLOPs"] = round(flops / 1e12, 2 if not ctx.dry else 4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return figs


def _copy_ceiling(ctx):
    n = (1 << 16) if ctx.dry else (1 << 28)       # float32 elements: 1 GiB per buffer on the GPU
    src = torch.randn(n, device=ctx.device)
    dst = torch.empty_like(src)
    t = median(time_fn(ctx, lambda: dst.copy_(src), warmup=2, reps=5 if ctx.dry else 10))
    bw = 2.0 * src.numel() * src.element_size() / t   # bytes read + bytes written
    ctx.ceilings["copy_Bps"] = bw
    return {"bytes_per_buffer": src.numel() * 4, "copy_GBps": round(bw / 1e9, 1)}


def run(sec, ctx):
    v = sec.sub("versions", _versions, ctx) or {}
    sec.sub("nvidia_smi", _nvidia_smi, ctx)
    m = sec.sub("matmul_ceilings", _matmul_ceilings, ctx) or {}
    c = sec.sub("copy_ceiling", _copy_ceiling, ctx) or {}
    sec.figures.update(ceilings=dict(ctx.ceilings))
    sec.headline = (f"{v.get('gpu', '?')}; torch {v.get('torch', '?')} triton {v.get('triton', '?')}; "
                    f"fp32 {m.get('fp32_TFLOPs', '?')} tf32 {m.get('tf32_TFLOPs', '?')} bf16 "
                    f"{m.get('bf16_TFLOPs', '?')} TFLOP/s; copy {c.get('copy_GBps', '?')} GB/s")


def ensure_ceilings(ctx):
    """Section 4 needs the ceilings even when run alone (--sections 4)."""
    if not {"fp32", "tf32", "bf16"} <= ctx.ceilings.keys():
        _matmul_ceilings(ctx)
