"""Peak memory of one energy+forces batch, per atom, triplet and triplet pair: the coefficients of
``aimnet_fast.predict.batch_bytes``.

    python -m bench.predict_memory [--backend cpu]

Each case runs in a fresh process: the released cv0 model, one batch (S66x8 conformers or one water
droplet), its neighbor list built first; the peak resident memory during forward and the forces'
backward is sampled every 0.5 ms, less the resident memory just before. A least-squares fit of
bytes = a·atoms + b·triplets + c·pairs (unique triplet pairs) over the cases is printed beside the
committed coefficients, and each case's estimate beside its measurement.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CASES = [("s66", 100), ("s66", 400), ("s66", 1000), ("water", 300), ("water", 1500)]
ROOT = Path(__file__).resolve().parent.parent


def measure(backend: str, kind: str, n: int) -> dict:
    import threading
    import time

    import torch

    from aimnet_fast import ops
    from aimnet_fast.batch import Batch
    from aimnet_fast.checkpoint import convert_released
    from aimnet_fast.cpu import flush_denormals, tune_allocator
    from aimnet_fast.constants import PERIODIC_TABLE
    from bench.synthetic import water_cluster
    flush_denormals()
    tune_allocator()
    d = ROOT.parent / "shared" / "aimnet_pretrained"
    model = convert_released(d / "aimnet_cv0.pt", d / "aimnet_mt_cv0.pt").eval()
    model.requires_grad_(False)
    model.backend = backend
    if kind == "s66":
        import h5py
        mols = []
        with h5py.File(ROOT.parent / "shared" / "data" / "comp6_s66x8.h5", "r") as f:
            for name in sorted(f["s66x8"]):
                g = f["s66x8"][name]
                numbers = [PERIODIC_TABLE.index(s.decode()) for s in g["species"][:]]
                mols.extend((numbers, xyz) for xyz in g["coordinates"][:])
        batch = Batch.from_molecules((mols * 4)[:n])
    else:
        batch = Batch.from_molecules([water_cluster(n)])
    nb = ops.build_neighbors(batch.coord, batch.mol_idx, backend)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    base = rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)
    th = threading.Thread(target=sample)
    th.start()
    c = batch.coord.clone().requires_grad_(True)
    out = model(batch.numbers, c, batch.mol_idx, batch.n_mol, neighbors=nb, all_passes=False)
    torch.autograd.grad(out["energy"].sum(), c)
    done.set()
    th.join()
    return {"kind": kind, "n": n, "atoms": batch.n_atoms, "triplets": nb.triplets.shape[1],
            "pairs": nb.pairs.shape[1], "bytes": peak[0] - base}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.predict_memory")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.backend, args.child[0], int(args.child[1]))))
        return 0
    import numpy as np

    from aimnet_fast import predict as P
    rows = []
    for kind, n in CASES:
        r = subprocess.run([sys.executable, "-m", "bench.predict_memory", "--backend", args.backend,
                            "--child", kind, str(n)], capture_output=True, text=True, cwd=ROOT,
                           check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    X = np.array([[r["atoms"], r["triplets"], r["pairs"]] for r in rows], dtype=float)
    y = np.array([r["bytes"] for r in rows], dtype=float)
    fit, *_ = np.linalg.lstsq(X, y, rcond=None)
    committed = np.array([P.BYTES_PER_ATOM, P.BYTES_PER_TRIPLET, P.BYTES_PER_PAIR], dtype=float)
    print(f"fit ({args.backend}): {fit[0]:,.0f} B/atom, {fit[1]:,.0f} B/triplet, {fit[2]:,.0f} B/pair"
          f"; committed: {committed[0]:,.0f}, {committed[1]:,.0f}, {committed[2]:,.0f}")
    for r, est in zip(rows, X @ committed):
        print(f"  {r['kind']:5s} {r['atoms']:6d} atoms {r['triplets']:7d} triplets {r['pairs']:6d} pairs:"
              f" measured {r['bytes'] / 1e6:7.1f} MB, estimated {est / 1e6:7.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
