"""Section 6: a real training run on the 06r configuration (aimnet_fast/configs/
ani1x_06r_gdb11_s01.yaml) through aimnet_fast.train.trainer.run, in a child process with a
timeout so that a hang or a crash cannot take the rest of the check with it. The YAML is read
with pyyaml into the config dataclasses (no load_config: the GPU image has no omegaconf); the
trainer's own time budget (``max_time``, 62 % of it at T=1 and 38 % at T=3) ends the run, which then
writes its test report of best.pt on the validation set."""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .bootstrap import REPO, SHARED

CONFIG = REPO / "aimnet_fast" / "configs" / "ani1x_06r_gdb11_s01.yaml"


def config_from_yaml(path: Path):
    """TrainConfig from a YAML file, filled by hand: nested mappings become the dataclasses of
    aimnet_fast.train.config; an unknown key is a TypeError naming it."""
    import yaml

    from aimnet_fast.train import config as C
    raw = yaml.safe_load(path.read_text()) or {}
    kw = {}
    for key, val in raw.items():
        if key == "data":
            val = dict(val)
            if val.get("sources") is not None:
                srcs = []
                for s in val["sources"]:
                    s = dict(s)
                    if s.get("properties"):
                        s["properties"] = {k: C.PropertyConfig(**v) for k, v in s["properties"].items()}
                    srcs.append(C.SourceConfig(**s))
                val["sources"] = srcs
            kw[key] = C.DataConfig(**val)
        elif key in ("model", "loss", "optim", "schedule"):
            cls = {"model": C.ModelConfig, "loss": C.LossConfig, "optim": C.OptimConfig,
                   "schedule": C.ScheduleConfig}[key]
            kw[key] = cls(**val)
        elif key == "curriculum":
            kw[key] = [C.PhaseConfig(**p) for p in val]
        else:
            kw[key] = val
    return C.TrainConfig(**kw)


def _resolve_paths(cfg):
    # The config names ../shared relative to the repository root.
    for s in cfg.data.sources or []:
        p = Path(s.path)
        if not p.is_absolute():
            p = (REPO / p).resolve()
            if not p.exists() and "shared" in p.parts:
                p = SHARED / Path(*p.parts[p.parts.index("shared") + 1:])
            s.path = str(p)


def child(argv) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--budget", type=float, required=True)
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--simulate-no-omegaconf", action="store_true")
    a = ap.parse_args(argv)
    from .bootstrap import check_omegaconf, map_kernels_without_install
    if os.environ.get("GPU_CHECK_MAP_KERNELS") == "1":
        map_kernels_without_install()
    have_omegaconf = check_omegaconf(simulate_absent=a.simulate_no_omegaconf)
    from aimnet_fast.train import config as C
    from aimnet_fast.train.dist import process_settings, setup_distributed, teardown
    from aimnet_fast.train.trainer import run
    cfg = config_from_yaml(CONFIG)
    _resolve_paths(cfg)
    cfg.run_dir, cfg.plot, cfg.tensorboard = a.run_dir, False, False
    cfg.device = "cpu" if a.dry else "cuda"
    info = {"omegaconf": have_omegaconf, "config": str(CONFIG.relative_to(REPO))}
    if a.dry:
        cfg.data.max_conformers, cfg.data.mols_per_batch = 96, 16
        cfg.max_steps_per_epoch, cfg.log_every = 2, 1
        cfg.curriculum = [C.PhaseConfig(n_pass=1, epochs=1, time_fraction=0.62),
                          C.PhaseConfig(n_pass=3, epochs=1, zero_update=True, time_fraction=0.38)]
        cfg.max_time = f"{a.budget:.0f}s"   # the same budget path; the epochs end first here
    else:
        # The config's curriculum (120 + 60 epochs) is far too long here: the time budget ends
        # each phase instead, 62 % of it at T=1 and the rest at T=3 (max_time, time_fraction).
        cfg.max_time = f"{a.budget:.0f}s"
        cfg.curriculum[0].time_fraction, cfg.curriculum[1].time_fraction = 0.62, 0.38
        info["max_time"] = cfg.max_time
    C.validate(cfg)
    info["epochs"] = [ph.epochs for ph in cfg.curriculum]
    info["backend"] = cfg.backend
    Path(a.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(a.run_dir) / "gpu_check_info.json").write_text(json.dumps(info))
    dist = setup_distributed(cfg.device)
    process_settings(cfg.num_threads, cfg.flush_denormal, dist.device)
    t0 = time.time()
    try:
        last = run(cfg, dist)
    finally:
        teardown(dist)
    info.update(train_wall_s=round(time.time() - t0, 1), last_row={k: str(v) for k, v in last.items()})
    (Path(a.run_dir) / "gpu_check_info.json").write_text(json.dumps(info))
    return 0


def _real_run(sec, ctx):
    from .common import CheckFailed, md_table
    run_dir = ctx.out / "real_run"
    budget = max(10.0, sec.left() - 8)
    # The child's own budget leaves time for its start-up, the last validation and the report.
    train_budget = budget * (0.5 if ctx.dry else 0.72)
    cmd = [sys.executable, "-m", "bench.gpu_check_lib.s6_realrun", "--run-dir", str(run_dir),
           "--budget", f"{train_budget:.0f}"] + (["--dry"] if ctx.dry else []) + \
        (["--simulate-no-omegaconf"] if ctx.simulate_no_omegaconf else [])
    log = ctx.out / "real_run.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=budget).returncode
            killed = False
        except subprocess.TimeoutExpired:
            rc, killed = None, True
    wall = time.perf_counter() - t0
    info_p = run_dir / "gpu_check_info.json"
    info = json.loads(info_p.read_text()) if info_p.exists() else {}
    rows = []
    mp = run_dir / "metrics.csv"
    if mp.exists():
        with open(mp) as f:
            rows = list(csv.reader(f))
    if rows:
        cols = ("time_s", "phase", "n_pass", "epoch", "lr", "train_loss", "val_loss",
                "val_energy_rmse_p1", "val_energy_rmse_p3", "val_charges_rmse_p1",
                "val_charges_rmse_p3", "bad_steps")
        keep = [i for i, h in enumerate(rows[0]) if h in cols] or list(range(len(rows[0])))
        body = md_table([rows[0][i] for i in keep], [[r[i] for i in keep] for r in rows[1:]])
        sec.block(f"real run: validation curve ({mp.relative_to(ctx.out)}, {len(rows) - 1} epochs)", body)
    tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
    figs = {"return_code": rc, "killed_at_timeout": killed, "wall_s": round(wall, 1),
            "epochs_done": max(len(rows) - 1, 0), **{k: v for k, v in info.items() if k != "last_row"}}
    if rows and len(rows) > 1:
        h = rows[0]
        vl = [float(r[h.index("val_loss")]) for r in rows[1:]]
        figs.update(val_loss_first=vl[0], val_loss_last=vl[-1], val_loss_best=min(vl))
    if rc != 0:
        raise CheckFailed(f"training child {'killed at the timeout' if killed else f'exit {rc}'}: "
                          f"{tail[0] if tail else ''} (see {log.name})", figs)
    return figs


def run(sec, ctx):
    f = sec.sub("train_06r", _real_run, sec, ctx) or {}
    sec.headline = (f"{f.get('epochs_done', '?')} epochs in {f.get('wall_s', '?')} s, val loss "
                    f"{f.get('val_loss_first', '?'):.4g} → {f.get('val_loss_last', '?'):.4g}"
                    if "val_loss_last" in f else "no completed run")


if __name__ == "__main__":
    sys.exit(child(sys.argv[1:]))
