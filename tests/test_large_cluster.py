"""A 2,001-atom water cluster runs on the reference path in a few GB: neighbor search, energy and
forces. Runs in a fresh process so that its peak memory (VmHWM) is its own; the figure is printed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys, time, torch
from aimnet_fast.checkpoint import convert_released
from aimnet_fast.batch import Batch
from aimnet_fast.neighbors import build_neighbors
from bench.synthetic import water_cluster

d = sys.argv[1]
model = convert_released(d + "/aimnet_cv0.pt", d + "/aimnet_mt_cv0.pt")
model.backend = "torch"
numbers, coord = water_cluster(667)
b = Batch.from_molecules([(numbers, coord)]).validate()
t = time.perf_counter()
nb = build_neighbors(b.coord, b.mol_idx)
c = b.coord.clone().requires_grad_(True)
out = model(b.numbers, c, b.mol_idx, 1, neighbors=nb)
f = -torch.autograd.grad(out["energy"].sum(), c)[0]
sec = time.perf_counter() - t
# Brute-force count of radial pairs, to check the cell list found them all.
brute = int(((torch.cdist(b.coord.double(), b.coord.double()) < 4.6).sum() - b.n_atoms))
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"atoms": b.n_atoms, "pairs": nb.radial.shape[1], "brute_pairs": brute,
                  "triplets": nb.triplets.shape[1], "energy_Ha": out["energy"].item(),
                  "fmax": f.abs().max().item(), "finite": bool(torch.isfinite(f).all()),
                  "seconds": sec, "peak_rss_MB": hwm / 1024}))
"""


@pytest.mark.slow
def test_water_cluster_2000_atoms(shared):
    # cwd: the repository root, where the child finds bench/synthetic.py
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(shared / "aimnet_pretrained")],
                       capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print("\n2001-atom water cluster:", res)
    assert res["atoms"] == 2001
    assert res["pairs"] == res["brute_pairs"]
    assert res["finite"]
    # 667 waters near the released model's per-water energy (O + 2 H SAE ≈ −76.4 Ha each).
    assert -77.0 < res["energy_Ha"] / 667 < -76.0
    assert res["peak_rss_MB"] < 4096
