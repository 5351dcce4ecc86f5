"""Train AIMNet, on one process or many (DistributedDataParallel).

One process (CPU or one GPU)::

    python -m aimnet_fast.train                       # embedded default data set, default config
    python -m aimnet_fast.train my.yaml optim.lr=5e-4 curriculum.1.epochs=50 run_dir=runs/x

Several processes on one machine (NCCL on CUDA, gloo on the CPU, chosen automatically)::

    torchrun --nproc_per_node=4 -m aimnet_fast.train my.yaml

Several machines (run the same command on every node; torchrun's c10d rendezvous)::

    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST_OF_NODE0:29500 --rdzv_id=JOB_ID -m aimnet_fast.train my.yaml

Continue a killed run exactly where its last checkpoint left it (model, optimizer, schedule, phase,
epoch, position in the epoch, random state)::

    python -m aimnet_fast.train run_dir=runs/x --resume        # or resume=true

Configuration: ``aimnet_fast.config.TrainConfig`` (YAML file + ``key=value`` overrides); examples in
``aimnet_fast/configs/``. Each run writes one folder: ``config.yaml`` (resolved), ``last.pt`` and
``best.pt`` (checkpoints in our format, loadable with ``aimnet_fast.checkpoint.load_model``),
``metrics.csv``, ``learning_curve.png`` (with matplotlib) and ``tb/`` (with tensorboard).

The batch of one rank is ``data.mols_per_batch`` molecules; gradients are averaged over ranks, so
the effective batch is that times the world size (the paper: 4 ranks × ~380 molecules). Every rank
divides its loss by the global number of labels, so N ranks compute exactly the gradient of one
process on the union of their batches.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from . import config as C
from ..checkpoint import checkpoint_dict, load_model, save_atomic
from ..cpu import tune_allocator
from ..errors import TrainingError
from .loss import Metrics, USER_UNITS, active_targets, loss_fn, predicted_forces
from ..model import AIMNet


# -- processes -------------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place in the job; collectives are no-ops with one process."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and tdist.is_available() and tdist.is_initialized()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            t = t.clone()
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj):
        if self.active:
            box = [obj]
            tdist.broadcast_object_list(box, src=0)
            return box[0]
        return obj

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...), or
    run alone. NCCL for CUDA devices, gloo for the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        dev = torch.device("cuda", local if device == "cuda" else torch.device(device).index or 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    backend = None
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not tdist.is_initialized():
            tdist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev, backend)


# -- model, optimizer, schedule --------------------------------------------------------------------
def unwrap(model: nn.Module) -> AIMNet:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def place(model: AIMNet, device: torch.device, dtype: torch.dtype) -> AIMNet:
    """Move the model to ``device`` and its weights to ``dtype``; the SAE stay float64 (a float32
    SAE would put errors of ~1e-6 Ha × atoms into every energy)."""
    sae = model.sae_Ha.detach().to(torch.float64).clone()
    model.to(device=device, dtype=dtype)
    model.sae_Ha = sae.to(device)
    return model


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def build_model(cfg: C.TrainConfig, log: Callable[[str], None] = print) -> AIMNet:
    """A fresh model (seeded by ``cfg.seed``, identical on every rank) or one started from
    ``model.init_from``; freezing and re-initialisation by name patterns."""
    torch.manual_seed(cfg.seed)
    mc = cfg.model
    if mc.init_from:
        src = load_model(mc.init_from)
        model = AIMNet(heads=mc.heads, n_pass=cfg.curriculum[0].n_pass, elements=src.elements,
                       sae_Ha=src.sae_Ha.tolist(), backend=cfg.backend)
        own = model.state_dict()
        loaded, skipped = [], []
        for k, v in src.state_dict().items():
            if k in own and own[k].shape == v.shape:
                own[k] = v.clone()
                loaded.append(k)
            else:
                skipped.append(k)
        model.load_state_dict(own)
        fresh = [k for k in own if k not in loaded]
        log(f"init_from {mc.init_from}: loaded {len(loaded)} tensors; fresh: "
            f"{', '.join(fresh) or 'none'}; not used: {', '.join(skipped) or 'none'}")
    else:
        model = AIMNet(heads=mc.heads, n_pass=cfg.curriculum[0].n_pass, backend=cfg.backend)
    if mc.reinit:
        for mname, module in model.named_modules():
            own_params = [f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False)]
            if own_params and any(_matches(n, mc.reinit) for n in own_params):
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                elif module is model:
                    nn.init.orthogonal_(model.afv_table)
                log(f"re-initialised {mname or 'afv_table'}")
    frozen = []
    for name, p in model.named_parameters():
        train = not _matches(name, mc.freeze)
        if mc.trainable is not None:
            train = train and _matches(name, mc.trainable)
        p.requires_grad_(train)
        if not train:
            frozen.append(name)
    if frozen:
        log(f"frozen parameters ({len(frozen)}): {', '.join(frozen)}")
    return model


def make_optimizer(params, oc: C.OptimConfig, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """Adam (AMSGrad by default), fused where this torch supports it for ``device``."""
    kw = dict(lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay,
              amsgrad=oc.name == "amsgrad")
    params = list(params)
    want = str(oc.fused).lower()
    name = "AMSGrad" if kw["amsgrad"] else "Adam"
    if want in ("auto", "true"):
        try:
            opt = torch.optim.Adam(params, fused=True, **kw)
            return opt, f"{name} (fused, {device.type})"
        except (RuntimeError, ValueError, TypeError) as e:
            if want == "true":
                raise TrainingError(f"optim.fused=true but fused Adam is not available: {e}") from e
            why = str(e).splitlines()[0]
            return torch.optim.Adam(params, foreach=True, **kw), f"{name} (foreach; fused unavailable: {why})"
    return torch.optim.Adam(params, foreach=True, **kw), f"{name} (foreach)"


class PlateauSchedule:
    """Multiply the lr by ``factor`` once ``patience`` epochs in a row have not improved the best
    validation loss (improve: loss < best · (1 − threshold)); the count then starts again.
    A NaN loss counts as no improvement. ``below_floor`` tells the phase to stop."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: float = 0.9, patience: int = 6,
                 threshold: float = 0.0, min_lr: float = 0.0):
        self.optimizer = optimizer
        self.factor, self.patience, self.threshold, self.min_lr = factor, patience, threshold, min_lr
        self.best = math.inf
        self.bad_epochs = 0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def below_floor(self) -> bool:
        return self.lr < self.min_lr

    def step(self, val_loss: float) -> bool:
        """Record one epoch's validation loss; True if the lr was reduced."""
        if val_loss < self.best * (1.0 - self.threshold):
            self.best = val_loss
            self.bad_epochs = 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr"] * self.factor
            self.bad_epochs = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "lr": self.lr}

    def load_state_dict(self, sd: dict) -> None:
        self.best, self.bad_epochs = sd["best"], sd["bad_epochs"]
        for g in self.optimizer.param_groups:
            g["lr"] = sd["lr"]


def zero_last_update_layer(model: AIMNet) -> None:
    """The T=1 → T=3 switch: the first update then adds zero, so predictions do not change."""
    last = model.update_mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


# -- one step --------------------------------------------------------------------------------------
@dataclass
class StepResult:
    loss: float          # loss of the global batch
    ok: bool             # False: non-finite loss or gradient on some rank, the step was skipped
    n_mol: int           # molecules in the global batch


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k == "coord":
                v = v.to(dtype)
        out[k] = v
    return out


def forward(model: nn.Module, batch: dict, n_pass: int, need_forces: bool,
            create_graph: bool = True):
    """Model outputs for a collated batch, and −dE/dR (N, 3) Hartree/Å if ``need_forces``."""
    coord = batch["coord"]
    if need_forces:
        coord = coord.detach().requires_grad_(True)
    n_mol = int(batch["n_atoms"].numel())
    out = model(batch["numbers"], coord, batch["mol_idx"], n_mol, n_pass=n_pass)
    forces = predicted_forces(out, coord, create_graph=create_graph) if need_forces else None
    return out, forces


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
               loss_cfg: C.LossConfig, targets: list[str], n_pass: int, dist: Dist,
               grad_clip: float = 0.0) -> StepResult:
    """Forward, loss, backward (DDP averages the gradients), and an optimizer step unless the loss
    or a gradient is NaN/inf on any rank: that decision is all-reduced, so every rank skips alike
    and non-finite numbers never reach the weights."""
    optimizer.zero_grad(set_to_none=True)
    out, forces = forward(model, batch, n_pass, "forces" in targets)
    loss = loss_fn(out, batch, loss_cfg, targets, forces,
                   reduce_counts=dist.all_reduce_sum if dist.active else None,
                   world_size=dist.world_size)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = torch.isfinite(loss.detach())
    if grads:
        finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
    flags = torch.stack([loss.detach() / dist.world_size, (~finite).to(torch.float64),
                         torch.tensor(float(batch["n_atoms"].numel()), dtype=torch.float64,
                                      device=loss.device)])
    flags = dist.all_reduce_sum(flags).tolist()
    if flags[1] > 0:
        optimizer.zero_grad(set_to_none=True)
        return StepResult(flags[0], False, int(flags[2]))
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    optimizer.step()
    return StepResult(flags[0], True, int(flags[2]))


# -- data ------------------------------------------------------------------------------------------
def load_data(cfg: C.TrainConfig, dist: Dist, log: Callable[[str], None]):
    """The packed data set and the train/validation conformer indices (same on every rank)."""
    from .. import data as D
    sources = cfg.data.sources if cfg.data.sources is not None else D.default_sources()
    # Rank 0 builds any cache first so ranks never write the same file at once.
    if not dist.is_main:
        dist.barrier()
    ds = D.load_dataset(sources, cache_dir=cfg.data.cache_dir)
    if dist.is_main:
        dist.barrier()
    if cfg.data.split == "group":
        train_idx, val_idx = D.split(ds, val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed)
    else:
        rng = np.random.default_rng(cfg.data.split_seed)
        perm = rng.permutation(int(ds.n_conf))
        n_val = max(1, int(round(cfg.data.val_fraction * len(perm))))
        train_idx, val_idx = np.sort(perm[n_val:]), np.sort(perm[:n_val])
    train_idx, val_idx = np.asarray(train_idx, np.int64), np.asarray(val_idx, np.int64)
    if cfg.data.max_conformers is not None and len(train_idx) + len(val_idx) > cfg.data.max_conformers:
        rng = np.random.default_rng(cfg.data.split_seed + 1)
        frac = cfg.data.max_conformers / (len(train_idx) + len(val_idx))
        n_tr = max(1, int(round(frac * len(train_idx))))
        n_va = max(1, int(round(frac * len(val_idx))))
        train_idx = np.sort(rng.choice(train_idx, n_tr, replace=False))
        val_idx = np.sort(rng.choice(val_idx, n_va, replace=False))
    return ds, train_idx, val_idx


def split_digest(train_idx: np.ndarray, val_idx: np.ndarray) -> str:
    """A fingerprint of the split, kept in checkpoints (the indices follow from data and config)."""
    h = hashlib.sha256(np.ascontiguousarray(train_idx, np.int64).tobytes())
    h.update(b"|" + np.ascontiguousarray(val_idx, np.int64).tobytes())
    return h.hexdigest()


def val_batches(val_idx: np.ndarray, dist: Dist, mols: int):
    """This rank's share of the validation set, in batches of ``mols`` conformers (no padding,
    so every conformer is counted once over all ranks)."""
    mine = val_idx[dist.rank::dist.world_size]
    return [mine[i:i + mols] for i in range(0, len(mine), mols)]


# -- the run ---------------------------------------------------------------------------------------
class Trainer:
    """Holds one run: model (DDP-wrapped with several ranks), data, optimizer, schedule, state."""

    def __init__(self, cfg: C.TrainConfig, dist: Optional[Dist] = None, out=None):
        self.cfg = cfg
        self.dist = dist or setup_distributed(cfg.device)
        self.out = out if out is not None else sys.stdout
        self.t0 = time.time()
        self._elapsed_base = 0.0
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if self.dist.device.type == "cpu" and cfg.flush_denormal:
            torch.set_flush_denormal(True)
        if self.dist.device.type == "cpu":
            tune_allocator()
        self.dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        self.run_dir = self._run_dir()
        self.ckpt_last = self.run_dir / "last.pt"
        self.ckpt_best = self.run_dir / "best.pt"
        self.metrics_path = self.run_dir / "metrics.csv"
        if cfg.resume and not self.ckpt_last.exists():
            raise TrainingError(f"resume: no checkpoint {self.ckpt_last}")

        from .. import data as D
        self.D = D
        self.ds, self.train_idx, self.val_idx = load_data(cfg, self.dist, self.log)
        self.model = place(build_model(cfg, self.log), self.dist.device, self.dtype)
        labels = set(self.ds.labels.keys())
        self.targets = active_targets(cfg.loss, self.model.heads.keys(), labels)
        if not self.targets:
            raise TrainingError(f"nothing to fit: loss.targets={cfg.loss.targets}, heads="
                                f"{list(self.model.heads)}, labels in the data={sorted(labels)}")
        self.train_sampler = D.BatchSampler(
            self.ds, self.train_idx, mols_per_batch=cfg.data.mols_per_batch,
            atoms_per_batch=cfg.data.atoms_per_batch, shuffle=True, seed=cfg.seed,
            rank=self.dist.rank, world_size=self.dist.world_size)
        self.val_mols = cfg.data.val_mols_per_batch or 2 * cfg.data.mols_per_batch
        if not cfg.resume and not (cfg.model.init_from and cfg.model.keep_sae):
            sae = D.fit_sae(self.ds, elements=self.model.elements, indices=self.train_idx)
            with torch.no_grad():
                self.model.sae_Ha.copy_(torch.as_tensor(np.asarray(sae, np.float64)))
        self.ddp = self.model
        if self.dist.active:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
                find_unused_parameters=True)  # T=1 leaves update_mlp unused; unused heads too
        self.state = {"phase": 0, "phase_started": False, "epoch": 0, "step": 0, "global_epoch": 0,
                      "global_step": 0, "bad_steps": 0, "consecutive_bad": 0, "best_val": math.inf,
                      "train_loss_sum": 0.0, "train_steps": 0, "elapsed_s": 0.0}
        self.optimizer = None
        self.schedule = None
        self.opt_desc = ""
        self.tb = None
        self.rows: list[dict] = []
        self.max_pass = max(ph.n_pass for ph in cfg.curriculum)

    # -- bookkeeping ---------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, file=self.out, flush=True)

    def _run_dir(self) -> Path:
        cfg = self.cfg
        if cfg.run_dir:
            path = cfg.run_dir
        elif cfg.resume:
            runs = sorted(p for p in Path("runs").glob("*") if (p / "last.pt").exists())
            if not runs:
                raise TrainingError("resume: no run_dir given and no runs/*/last.pt found")
            path = str(runs[-1])
        else:
            path = f"runs/{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
        path = self.dist.broadcast_object(path)
        if self.dist.is_main:
            Path(path).mkdir(parents=True, exist_ok=True)
            for tmp in Path(path).glob(".*.tmp"):  # left by a crash inside save_atomic
                tmp.unlink()
        self.dist.barrier()
        return Path(path)

    def _new_phase(self, n: int) -> None:
        ph = self.cfg.curriculum[n]
        self.model.n_pass = ph.n_pass
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.opt_desc = make_optimizer(params, self.cfg.optim, self.dist.device)
        sc = self.cfg.schedule
        self.schedule = PlateauSchedule(self.optimizer, sc.factor, sc.patience, sc.threshold, sc.min_lr)

    def _start_phase(self, n: int) -> None:
        """Cold restart: fresh optimizer moments and lr; the T=1 → T=3 switch zeroes the last
        update_mlp layer first (``zero_update``)."""
        ph = self.cfg.curriculum[n]
        if ph.zero_update:
            zero_last_update_layer(self.model)
        self._new_phase(n)
        self.state.update(phase=n, phase_started=True, epoch=0, step=0, best_val=math.inf,
                          train_loss_sum=0.0, train_steps=0)
        self.log(f"== phase {n + 1}/{len(self.cfg.curriculum)}: T={ph.n_pass}, up to {ph.epochs} "
                 f"epochs{', update_mlp last layer zeroed' if ph.zero_update else ''}; optimizer "
                 f"{self.opt_desc}, lr {self.schedule.lr:.3g}")

    def checkpoint(self, path: Path) -> dict:
        training = {
            "config": C.to_dict(self.cfg), "state": dict(self.state),
            "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
            "sampler": self.train_sampler.state_dict() if hasattr(self.train_sampler, "state_dict") else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "split": split_digest(self.train_idx, self.val_idx), "targets": self.targets,
        }
        return checkpoint_dict(self.model, training=training)

    def save(self, best: bool = False) -> None:
        self.state["elapsed_s"] = self._elapsed()
        if self.dist.is_main:
            ck = self.checkpoint(self.ckpt_last)
            save_atomic(ck, self.ckpt_last)
            if best:
                save_atomic(ck, self.ckpt_best)
        self.dist.barrier()

    def _elapsed(self) -> float:
        return self._elapsed_base + time.time() - self.t0

    def restore(self) -> None:
        ck = torch.load(self.ckpt_last, map_location="cpu", weights_only=False)
        tr = ck["training"]
        self.model.load_state_dict(ck["state_dict"])
        self.state.update(tr["state"])
        if tr["split"] != split_digest(self.train_idx, self.val_idx):
            raise TrainingError(f"resume: the train/validation split of {self.ckpt_last} differs from "
                                f"the one the data and config give now; did the data change?")
        if tr["targets"] != self.targets:
            raise TrainingError(f"resume: targets were {tr['targets']}, now {self.targets}")
        if self.state["phase_started"]:
            self._new_phase(self.state["phase"])
            self.optimizer.load_state_dict(tr["optimizer"])
            self.schedule.load_state_dict(tr["schedule"])
        rng = tr["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.log(f"resumed {self.ckpt_last}: phase {self.state['phase'] + 1}, epoch "
                 f"{self.state['epoch'] + 1}, step {self.state['step']}")

    # -- metrics -------------------------------------------------------------------------------
    def _columns(self) -> list[str]:
        cols = ["time_s", "phase", "n_pass", "epoch", "lr", "train_loss", "val_loss", "bad_steps"]
        for t in self.targets:
            tags = ["last"] if t == "forces" else [f"p{p + 1}" for p in range(self.max_pass)]
            for tag in tags:
                cols += [f"val_{t}_mae_{tag}", f"val_{t}_rmse_{tag}"]
        return cols

    def _load_rows(self) -> None:
        """Rows of epochs the checkpoint covers (a killed run may have written one more)."""
        self.rows = []
        if self.metrics_path.exists():
            with open(self.metrics_path) as f:
                for row in csv.DictReader(f):
                    if int(row["epoch"]) <= self.state["global_epoch"]:
                        self.rows.append(row)

    def _write_rows(self) -> None:
        if not self.dist.is_main:
            return
        cols = self._columns()
        tmp = self.metrics_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow(r)
        os.replace(tmp, self.metrics_path)

    def _plot(self) -> None:
        if not (self.cfg.plot and self.dist.is_main and self.rows):
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        ep = [int(r["epoch"]) for r in self.rows]
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        a1.semilogy(ep, [float(r["train_loss"]) for r in self.rows], label="train")
        a1.semilogy(ep, [float(r["val_loss"]) for r in self.rows], label="validation")
        for r0, r1 in zip(self.rows[:-1], self.rows[1:]):
            if r0["phase"] != r1["phase"]:
                a1.axvline(int(r1["epoch"]) - 0.5, color="gray", ls=":")
        a1.set_ylabel("loss")
        a1.legend()
        a2.semilogy(ep, [float(r["lr"]) for r in self.rows], color="C2")
        a2.set_ylabel("learning rate")
        a2.set_xlabel("epoch")
        fig.tight_layout()
        fig.savefig(self.run_dir / "learning_curve.png", dpi=100)
        plt.close(fig)

    def _tensorboard(self):
        if self.tb is None and self.cfg.tensorboard and self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                self.tb = False
                self.log("tensorboard not importable: no TensorBoard logs (metrics.csv has it all)")
        return self.tb or None

    # -- loops ---------------------------------------------------------------------------------
    def collate(self, idx) -> dict:
        return to_device(self.D.collate(self.ds, idx), self.dist.device, self.dtype)

    def batches(self, it, n: int, prefetch: Optional[bool] = None):
        """The batches of the next ``n`` index arrays of ``it``, on the device. With ``prefetch``
        (default: on CUDA) the next batch is assembled by a background thread (in pinned memory on
        CUDA) while the current step runs."""
        cuda = self.dist.device.type == "cuda"
        if not (cuda if prefetch is None else prefetch):
            for _ in range(n):
                yield self.collate(next(it))
            return
        from concurrent.futures import ThreadPoolExecutor

        def load(idx):
            return {k: v.pin_memory() if cuda and isinstance(v, torch.Tensor) else v
                    for k, v in self.D.collate(self.ds, idx).items()}

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(load, next(it)) if n else None
            for k in range(n):
                batch = pending.result()
                if k + 1 < n:
                    pending = pool.submit(load, next(it))
                yield to_device(batch, self.dist.device, self.dtype)

    def validate(self, n_pass: int) -> dict:
        m = Metrics(self.targets, n_pass, self.cfg.loss, device=self.dist.device)
        need_forces = "forces" in self.targets
        for idx in val_batches(self.val_idx, self.dist, self.val_mols):
            batch = self.collate(idx)
            with torch.set_grad_enabled(need_forces):
                out, forces = forward(self.model, batch, n_pass, need_forces, create_graph=False)
            m.update(out, batch, forces)
        m.sums = self.dist.all_reduce_sum(m.sums)
        return m.summary()

    def train_epoch(self, ph: C.PhaseConfig) -> None:
        """Train one epoch (or the rest of one after a resume, or ``max_steps_per_epoch`` steps);
        ``last.pt`` every ``checkpoint_every`` steps."""
        cfg, st = self.cfg, self.state
        self.train_sampler.set_epoch(st["global_epoch"])
        n_steps = len(self.train_sampler)
        if cfg.max_steps_per_epoch is not None:
            n_steps = min(n_steps, cfg.max_steps_per_epoch)
        it = iter(self.train_sampler)
        for _ in range(st["step"]):  # resume mid-epoch: the epoch's order is fixed by set_epoch
            next(it)
        t_last, mols = time.time(), 0
        for batch in self.batches(it, n_steps - st["step"]):
            res = train_step(self.ddp, self.optimizer, batch, cfg.loss, self.targets, ph.n_pass,
                             self.dist, cfg.optim.grad_clip)
            st["step"] += 1
            st["global_step"] += 1
            mols += res.n_mol
            if res.ok:
                st["consecutive_bad"] = 0
                st["train_loss_sum"] += res.loss
                st["train_steps"] += 1
            else:
                st["bad_steps"] += 1
                st["consecutive_bad"] += 1
                self.log(f"step {st['global_step']}: non-finite loss or gradient ({res.loss}); "
                         f"step skipped ({st['bad_steps']} skipped so far)")
                if st["consecutive_bad"] >= cfg.max_bad_steps:
                    raise TrainingError(
                        f"{st['consecutive_bad']} consecutive steps had a NaN/inf loss or gradient "
                        f"(max_bad_steps={cfg.max_bad_steps}); stopping. The weights never saw them: "
                        f"the last good checkpoint is {self.ckpt_last}. Lower optim.lr, set "
                        f"optim.grad_clip, or check the data for bad labels.")
            if st["step"] % cfg.log_every == 0 or st["step"] == n_steps:
                dt = time.time() - t_last
                self.log(f"phase {st['phase'] + 1} T={ph.n_pass} epoch {st['epoch'] + 1}/{ph.epochs} "
                         f"step {st['step']}/{n_steps} loss {res.loss:.4g} lr {self.schedule.lr:.3g} "
                         f"{mols / max(dt, 1e-9):.1f} mol/s")
                t_last, mols = time.time(), 0
                tb = self._tensorboard()
                if tb:
                    tb.add_scalar("train/loss_step", res.loss, st["global_step"])
            if (cfg.checkpoint_every and st["step"] % cfg.checkpoint_every == 0 and st["step"] < n_steps
                    and st["consecutive_bad"] == 0):  # keep the last good checkpoint good
                self.save()

    def end_epoch(self, ph: C.PhaseConfig) -> None:
        st = self.state
        val = self.validate(ph.n_pass)
        train_loss = st["train_loss_sum"] / max(st["train_steps"], 1)
        lr_used = self.schedule.lr
        self.schedule.step(val["loss"])
        improved = val["loss"] < st["best_val"]
        if improved:
            st["best_val"] = val["loss"]
        st["epoch"] += 1
        st["global_epoch"] += 1
        st["step"] = 0
        st["train_loss_sum"], st["train_steps"] = 0.0, 0
        row = {"time_s": f"{self._elapsed():.1f}", "phase": st["phase"] + 1, "n_pass": ph.n_pass,
               "epoch": st["global_epoch"], "lr": lr_used, "train_loss": train_loss,
               "val_loss": val["loss"], "bad_steps": st["bad_steps"]}
        parts = []
        for t in self.targets:
            unit = USER_UNITS[t][0]
            tags = ["last"] if t == "forces" else [f"p{p + 1}" for p in range(ph.n_pass)]
            vals = []
            for tag in tags:
                row[f"val_{t}_mae_{tag}"] = val[f"{t}_mae_{tag}"]
                row[f"val_{t}_rmse_{tag}"] = val[f"{t}_rmse_{tag}"]
                vals.append(f"{tag} {val[f'{t}_mae_{tag}']:.4g}/{val[f'{t}_rmse_{tag}']:.4g}")
            parts.append(f"{t} MAE/RMSE ({unit}) " + ", ".join(vals))
        self.rows.append(row)
        self.save(best=improved)
        self._write_rows()
        self._plot()
        tb = self._tensorboard()
        if tb:
            for k, v in row.items():
                if k not in ("phase", "epoch", "time_s"):
                    tb.add_scalar(f"epoch/{k}", float(v), st["global_epoch"])
            tb.flush()
        self.log(f"epoch {st['global_epoch']} (phase {st['phase'] + 1} T={ph.n_pass} epoch "
                 f"{st['epoch']}/{ph.epochs}) train loss {train_loss:.4g} val loss {val['loss']:.4g}"
                 f"{' *' if improved else ''} lr {lr_used:.3g} skipped {st['bad_steps']} "
                 f"[{self._elapsed():.0f} s]\n    val " + "\n    val ".join(parts))

    def fit(self) -> dict:
        cfg = self.cfg
        self._elapsed_base = 0.0
        if cfg.resume:
            self.restore()
            self._elapsed_base = self.state.get("elapsed_s", 0.0)
            self._load_rows()
        elif self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(C.dump_yaml(cfg))
        n_par = sum(p.numel() for p in self.model.parameters())
        n_tr = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log(f"run {self.run_dir}: {self.dist.world_size} process(es), backend "
                 f"{self.dist.backend or 'none'}, device {self.dist.device}, {cfg.dtype}; "
                 f"{len(self.train_idx)} train / {len(self.val_idx)} validation conformers; "
                 f"batch {cfg.data.mols_per_batch} molecules per rank × {self.dist.world_size} = "
                 f"{cfg.data.mols_per_batch * self.dist.world_size}; targets {', '.join(self.targets)}; "
                 f"{n_tr}/{n_par} parameters train")
        self.log("SAE (Ha): " + ", ".join(f"Z={z} {e:.6f}" for z, e in
                                          zip(self.model.elements, self.model.sae_Ha.tolist())))
        st = self.state
        last_val = None
        while st["phase"] < len(cfg.curriculum):
            ph = cfg.curriculum[st["phase"]]
            if not st["phase_started"]:
                self._start_phase(st["phase"])
            elif self.optimizer is None:
                self._new_phase(st["phase"])
            while st["epoch"] < ph.epochs and not self.schedule.below_floor:
                self.train_epoch(ph)
                self.end_epoch(ph)
                last_val = self.rows[-1]
            if self.schedule.below_floor:
                self.log(f"phase {st['phase'] + 1}: lr {self.schedule.lr:.3g} below the floor "
                         f"{cfg.schedule.min_lr:.3g}; phase done")
            st["phase"] += 1
            st["phase_started"] = False
            st["epoch"] = 0
        if self.tb:
            self.tb.close()
        self.log(f"done in {self._elapsed():.0f} s; {st['bad_steps']} steps skipped; checkpoints "
                 f"{self.ckpt_last} and {self.ckpt_best}")
        return last_val or {}


def run(cfg: C.TrainConfig, dist: Optional[Dist] = None, out=None) -> dict:
    """Train with ``cfg``; returns the metrics row of the last epoch."""
    trainer = Trainer(cfg, dist, out)
    return trainer.fit()


def parse_args(argv, prog: str = "python -m aimnet_fast.train") -> C.TrainConfig:
    ap = argparse.ArgumentParser(
        prog=prog, description="Train AIMNet (one process, or many under torchrun).",
        epilog="Overrides are dotted keys of aimnet_fast.config.TrainConfig, e.g. optim.lr=5e-4 "
               "data.mols_per_batch=64 curriculum.1.epochs=10 run_dir=runs/x. Multi-GPU: "
               "torchrun --nproc_per_node=N -m aimnet_fast.train [CONFIG] [key=value ...]")
    ap.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    ap.add_argument("--resume", action="store_true", help="continue the run in run_dir from last.pt")
    a = ap.parse_intermixed_args(argv)
    files = [x for x in a.items if "=" not in x]
    overrides = [x for x in a.items if "=" in x]
    if len(files) > 1:
        ap.error(f"one config file at most, got {files}")
    if a.resume:
        overrides.append("resume=true")
    cfg = C.load_config(files[0] if files else None, overrides)
    if cfg.resume:
        # Continue with the run's own resolved config; command-line overrides still apply on top.
        run_dir = cfg.run_dir
        if run_dir and (Path(run_dir) / "config.yaml").exists():
            cfg = C.load_config(Path(run_dir) / "config.yaml", overrides)
    return cfg


def main(argv=None, prog: str = "python -m aimnet_fast.train") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(argv, prog)
    except C.ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return 2
    from ..data import DataError
    dist = setup_distributed(cfg.device)
    try:
        run(cfg, dist)
    except (TrainingError, DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.active:
            tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
