"""Large-file check of the packed cache: an ANI-1x-sized synthetic file (default 5M conformers of
13–19 atoms, real molecules of ../shared/data/ani1x_sample.h5 perturbed), packed group by group,
then memory-mapped. Each stage runs in a fresh process and reports its peak RSS (VmHWM) and, at its
end, its anonymous (RssAnon: private copies) and file-backed (RssFile: page cache of the memory map)
resident memory.

    python -m bench.synthetic_ani1x [--n 5000000] [--groups 3000] [--dir /tmp/aimnet_fast_synth] [--keep]

Writes only under --dir (never into the repository) and deletes it at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AIMNET_FAST_SHARED", REPO.parent / "shared"))


def mem() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[k + "_MB"] = round(int(v.split()[0]) / 1024, 1)
    return out


def stage(name: str, path: str, cache: str) -> dict:
    from aimnet_fast.data import BatchSampler, collate, fit_sae, load_dataset, split
    res = {"stage": name, "after_import": mem()}
    t = time.perf_counter()
    ds = load_dataset([{"path": path, "layout": "ani1x"}], cache_dir=cache)
    res["load_s"] = round(time.perf_counter() - t, 2)
    res["conformers"], res["atoms"] = ds.n_conf, int(ds.conf_offsets[-1])
    res["after_load"] = mem()
    if name == "load":
        t = time.perf_counter()
        tr, va = split(ds, 0.1, seed=0)
        res["split_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        s = BatchSampler(ds, tr, mols_per_batch=380, rank=0, world_size=4)
        s.set_epoch(1)
        res["sampler_epoch_plan_s"] = round(time.perf_counter() - t, 2)
        res["steps_per_epoch"] = len(s)
        batches = [b for _, b in zip(range(200), s)]
        n = sum(b.size for b in batches)
        for label in ("cold", "warm"):  # cold: first touch of the mapped pages in this process
            t = time.perf_counter()
            for b in batches:
                collate(ds, b)
            res[f"collate_mols_per_s_{label}"] = round(n / (time.perf_counter() - t))
        res["after_collate"] = mem()
        t = time.perf_counter()
        sae = fit_sae(ds, indices=tr)
        res["fit_sae_s"] = round(time.perf_counter() - t, 2)
        res["sae_Ha"] = [round(float(x), 5) for x in sae]
        res["after_epoch_work"] = mem()
        res["summary"] = ds.summary()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5_000_000)
    ap.add_argument("--groups", type=int, default=3000)
    ap.add_argument("--dir", default="/tmp/aimnet_fast_synth")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    a = ap.parse_args()
    d = Path(a.dir)
    h5, cache = d / "synthetic_ani1x.h5", d / "cache"
    if a.stage:
        print(json.dumps(stage(a.stage, str(h5), str(cache))))
        return
    from bench.synthetic import load_templates, write_synthetic_ani1x
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    try:
        t = time.perf_counter()
        info = write_synthetic_ani1x(h5, load_templates(SHARED / "data" / "ani1x_sample.h5"),
                                     a.n, a.groups, seed=0, nan_energy_every=1000)
        info["write_s"] = round(time.perf_counter() - t, 1)
        info["h5_MB"] = round(h5.stat().st_size / 2**20)
        print(json.dumps({"stage": "write", **info}), flush=True)
        for name in ("build", "load"):
            r = subprocess.run([sys.executable, "-m", "bench.synthetic_ani1x", "--dir", str(d),
                                "--stage", name], capture_output=True, text=True, check=True, cwd=REPO)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            if name == "build":
                res["cache_MB"] = round(sum(f.stat().st_size for f in cache.rglob("*")) / 2**20)
                res["build_s_per_million_conformers"] = round(res["load_s"] / (res["conformers"] / 1e6), 2)
            print(json.dumps(res), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
