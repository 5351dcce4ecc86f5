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

Configuration: ``aimnet_fast.train.config.TrainConfig`` (YAML file + ``key=value`` overrides); examples in
``aimnet_fast/configs/``. Each run writes one folder: ``config.yaml`` (resolved), ``last.pt`` and
``best.pt`` (checkpoints in our format, loadable with ``aimnet_fast.checkpoint.load_model``),
``metrics.csv``, ``learning_curve.png`` (with matplotlib) and ``tb/`` (with tensorboard).

The batch of one rank is ``data.mols_per_batch`` molecules; gradients are averaged over ranks, so
the effective batch is that times the world size (the paper: 4 ranks × ~380 molecules). Every rank
divides its loss by the global number of labels, so N ranks compute exactly the gradient of one
process on the union of their batches.

This module is the loop: ``Trainer`` fits the curriculum phase by phase, epoch by epoch, and
``main`` is the command line. The parts it uses, each in its own module of ``aimnet_fast.train``:
``config`` (the configuration), ``dist`` (process group and process-wide settings), ``batches``
(data set, split, batches on the device), ``model_setup`` (model, freezing, the T=1 → T=3
switch), ``optim`` (optimizer), ``schedule`` (plateau schedule), ``step`` (one training step),
``loss`` (loss and metrics), ``state`` (the run state and its checkpoints), ``runlog`` (progress
lines, metrics.csv, plot, TensorBoard).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import yaml
import torch
from torch import nn

from .. import data as D
from .. import flops
from ..data.checks import check_sae_plausible
from ..errors import AIMNetError, CheckpointError, TrainingError, report
from . import config as C
from ..units import HARTREE_TO_KCALMOL
from ..padded import CapacityPlan
from .batches import device_batches, load_data, split_digest, val_batches
from .dist import Dist, process_settings, setup_distributed, teardown
from .ema import EMA
from .loss import Metrics, active_targets
from .model_setup import build_model, place, zero_last_update_layer
from .optim import make_optimizer
from .runlog import RunLog
from .schedule import PlateauSchedule
from .state import (RunState, model_checkpoint, read_checkpoint, restore_rng, save_file,
                    training_record, write_checkpoint)
from .step import forward, train_step

__all__ = ["Trainer", "run", "parse_args", "main"]


class Trainer:
    """One run: model (DDP-wrapped with several ranks), data, optimizer, schedule, run state."""

    def __init__(self, cfg: C.TrainConfig, dist: Optional[Dist] = None, out=None):
        self.cfg = cfg
        self.dist = dist or setup_distributed(cfg.device)
        self.t0, self._elapsed_base = time.time(), 0.0
        self.dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        self.run_dir, created = self._open_run_dir()
        try:
            self._setup(out)
        except BaseException:
            self._close_run_dir(remove=created)    # a failed start leaves no empty run folder
            raise

    def _setup(self, out) -> None:
        cfg = self.cfg
        self.ckpt_last, self.ckpt_best = self.run_dir / "last.pt", self.run_dir / "best.pt"
        if cfg.resume and not self.ckpt_last.exists():
            raise TrainingError(f"resume: no checkpoint {self.ckpt_last}")
        self.budget_s = C.parse_duration(cfg.max_time) if cfg.max_time is not None else None
        self.log = RunLog(self.run_dir, self.dist.is_main, out if out is not None else sys.stdout,
                          plot=cfg.plot, tensorboard=cfg.tensorboard, progress=cfg.progress,
                          log_every=cfg.log_every)

        self.model = place(build_model(cfg, self.log.info), self.dist.device, self.dtype)
        data = load_data(cfg, self.dist, self.log.info)
        self.ds, self.train_idx, self.val_idx, self.test_idx = (data.ds, data.train_idx, data.val_idx,
                                                                data.test_idx)
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
        self.capacity = CapacityPlan(self.model.elements[0]) if cfg.static_shapes else None
        # Energies in another unit than declared make an implausible SAE (per source; every rank
        # reaches the same verdict, so none is left waiting).
        for line in check_sae_plausible(self.ds, elements=self.model.elements):
            self.log.info(line)
        if not cfg.resume and not (cfg.model.init_from and cfg.model.keep_sae):
            sae = D.fit_sae(self.ds, elements=self.model.elements, indices=self.train_idx)
            with torch.no_grad():
                self.model.sae_Ha.copy_(torch.as_tensor(np.asarray(sae, np.float64)))
        # After the SAE fit and init_from: the average starts at the weights training starts from.
        self.ema = EMA(self.model, cfg.ema.decay) if cfg.ema.decay > 0 else None
        self.ddp = self.model
        if self.dist.active:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
                find_unused_parameters=True)  # T=1 leaves update_mlp unused; unused heads too
        self.state = RunState()
        #: file name → checkpoint dict of the best models so far ("best.pt", "best_phase<n>.pt" of
        #: the current phase); kept in last.pt, written to their files after it.
        self.best_ck: dict[str, dict] = {}
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.schedule: Optional[PlateauSchedule] = None
        self.opt_desc = ""
        self.columns = RunLog.columns(self.targets, max(ph.n_pass for ph in cfg.curriculum))

    # -- the run -------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train every phase of the curriculum (or what a resumed run has left), then report on
        the held-out sets with ``best.pt``; returns the metrics row of the last epoch.

        A phase ends after its epochs, when its lr falls below the floor, by early stopping, or
        at its share of ``max_time``; the run ends after the last phase or at ``max_time``."""
        cfg, st = self.cfg, self.state
        if cfg.resume:
            self.restore()
            st = self.state
        elif self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(C.dump_yaml(cfg))
        self._announce()
        try:
            last_row = self.train_phases()
            self.final_report()
            self.dist.barrier()   # every rank ends here: none tears its process group down early
            files = ", ".join(str(p) for p in (self.ckpt_last, self.ckpt_best,
                                               self.run_dir / "test_metrics.json") if p.exists())
            self.log.info(f"done in {self.elapsed():.0f} s{' (max_time reached)' if st.stopped else ''}; "
                          f"{st.bad_steps} steps skipped; wrote {files}")
            return last_row
        finally:
            self.log.close()      # also closes a progress bar that an error left open
            self._close_run_dir()

    def train_phases(self) -> dict:
        """The phases of the curriculum from where the run stands; the last epoch's metrics row."""
        cfg, st = self.cfg, self.state
        last_row: dict = {}
        while st.phase < len(cfg.curriculum) and not st.stopped:
            ph = cfg.curriculum[st.phase]
            if not st.phase_started:
                self.start_phase(st.phase)
            why = self._phase_end(ph, cut=False)
            while why is None:
                cut = self.train_epoch(ph)
                last_row = self.end_epoch(ph)
                why = self._phase_end(ph, cut)
            self.log.info(f"phase {st.phase + 1}: {why}")
            if why.startswith("max_time"):
                st.stopped = "max_time"
                self.save()
            else:
                st.end_phase()
        return last_row

    def start_phase(self, n: int) -> None:
        """Cold restart: fresh optimizer moments and lr (with the warm-up ahead); the raw weights
        start from the average (with EMA); the T=1 → T=3 switch zeroes the last update_mlp layer
        (``zero_update``)."""
        ph = self.cfg.curriculum[n]
        if self.ema is not None:
            self.ema.copy_to_weights()
        if ph.zero_update:
            zero_last_update_layer(self.model)
        if self.ema is not None:
            self.ema.reset()
        self._new_optimizer(n)
        self.state.start_phase(n)
        self.best_ck = {k: v for k, v in self.best_ck.items() if k == "best.pt"}
        budget = ""
        if self.budget_s is not None:
            budget = f", until {self._deadline(n):.0f} s of the {self.budget_s:.0f} s budget"
        warm = self.cfg.schedule.warmup_steps
        self.log.info(f"== phase {n + 1}/{len(self.cfg.curriculum)}: T={ph.n_pass}, up to {ph.epochs} "
                      f"epochs{budget}{', update_mlp last layer zeroed' if ph.zero_update else ''}; "
                      f"optimizer {self.opt_desc}, lr {self.schedule.lr:.3g}"
                      f"{f' after a {warm}-step warm-up' if warm else ''}")

    def train_epoch(self, ph: C.PhaseConfig) -> bool:
        """Train one epoch (or the rest of one after a resume: the sampler continues from its
        position, which equals ``state.step``), at most ``max_steps_per_epoch`` steps; ``last.pt``
        every ``checkpoint_every`` steps. Returns True if the time budget cut the epoch short."""
        cfg, st = self.cfg, self.state
        n_steps = len(self.train_sampler)
        if cfg.max_steps_per_epoch is not None:
            n_steps = min(n_steps, cfg.max_steps_per_epoch)
        batches = device_batches(self.ds, iter(self.train_sampler), n_steps - st.step,
                                 self.dist.device, self.dtype,
                                 pad=self.capacity.pad if self.capacity is not None else None)
        deadline, warm = self._deadline(st.phase), cfg.schedule.warmup_steps
        self.log.epoch_begin(phase=st.phase, n_pass=ph.n_pass, epoch=st.epoch, epochs=ph.epochs,
                             n_steps=n_steps, start_step=st.step)
        t_last, cut = time.time(), False
        count_flop, peak = self._mfu_counter(ph)
        for batch in batches:
            scale = min(1.0, (st.phase_step + 1) / warm) if warm else 1.0
            res = self._train_step(batch, ph, scale, self.elapsed() >= deadline, count_flop)
            st.step += 1
            st.global_step += 1
            st.phase_step += 1
            if res.ok:
                st.consecutive_bad = 0
                st.train_loss_sum += res.loss
                st.train_steps += 1
                if self.ema is not None:
                    self.ema.update()
            else:
                self._skipped_step(res.loss)
            now = time.time()
            dt, t_last = max(now - t_last, 1e-9), now
            self.log.step(phase=st.phase, n_pass=ph.n_pass, epoch=st.epoch, epochs=ph.epochs,
                          step=st.step, n_steps=n_steps, loss=res.loss, lr=self.schedule.lr * scale,
                          mols_per_s=res.n_mol / dt, atoms_per_s=res.n_atoms / dt,
                          global_step=st.global_step, run_left_s=self._time_left(),
                          mfu=res.flop / dt / peak if peak else None)
            if res.stop:
                cut = True
                break
            if (cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and st.step < n_steps
                    and st.consecutive_bad == 0):  # keep the last good checkpoint good
                self.save()
        self.log.epoch_end()
        return cut

    def _train_step(self, batch, ph: C.PhaseConfig, scale: float, stop: bool, count_flop):
        """``train_step`` on a batch, or with ``static_shapes`` on a padded one, redone with larger
        capacities while its lists overflow (the capacities grow by a quarter over the counts, so
        one redo is the rule)."""
        cfg = self.cfg
        if self.capacity is None:
            return train_step(self.ddp, self.optimizer, batch, cfg.loss, self.targets, ph.n_pass,
                              self.dist, cfg.optim.grad_clip, lr_scale=scale, stop_vote=stop,
                              count_flop=count_flop)
        padded, padding, host = batch
        for _ in range(4):
            # No FLOP count here: it would count the padding's work as the model's.
            res = train_step(self.ddp, self.optimizer, padded, cfg.loss, self.targets, ph.n_pass,
                             self.dist, cfg.optim.grad_clip, lr_scale=scale, stop_vote=stop,
                             padding=padding)
            if not res.overflow:
                return res
            self.capacity.grow(res.counts)
            self.log.info(f"padded lists overflowed: capacities grown to {self.capacity.cap}")
            padded, padding = self.capacity.pad(host)
            padded = padded.to(self.dist.device, self.dtype, non_blocking=True)
        raise TrainingError(f"padded lists still overflow after 4 tries ({self.capacity.cap})")

    def end_epoch(self, ph: C.PhaseConfig) -> dict:
        """Validate, step the schedule, save ``last.pt`` (and ``best.pt``, ``best_phase<n>.pt``),
        log the epoch.

        ``best.pt`` holds the weights with the lowest validation loss of the prediction (the last
        pass, ``loss_last``) over the whole run, so a T=3 phase that never beats the T=1 model
        leaves the T=1 model there; ``best_phase<n>.pt`` the same within phase n. The schedule and
        early stopping follow the phase's own loss (all passes, as trained)."""
        st = self.state
        with self._averaged():
            val = self.validate(ph.n_pass)
            if not math.isfinite(val["loss"]):
                raise TrainingError(self._nonfinite_validation(ph.n_pass))
        train_loss = st.train_loss_sum / max(st.train_steps, 1)
        lr_used = self.schedule.lr
        self.schedule.step(val["loss"])
        if val["loss"] < st.best_val:
            st.best_val, st.stale_epochs = val["loss"], 0
        else:
            st.stale_epochs += 1
        best = val["loss_last"] < st.best_pred
        phase_best = val["loss_last"] < st.phase_best_pred
        if best:
            st.best_pred, st.best_epoch = val["loss_last"], st.global_epoch + 1
        if phase_best:
            st.phase_best_pred = val["loss_last"]
        st.end_epoch()
        self.train_sampler.set_epoch(st.global_epoch)  # the next epoch's order, from its start
        row = {"time_s": f"{self.elapsed():.1f}", "phase": st.phase + 1, "n_pass": ph.n_pass,
               "epoch": st.global_epoch, "lr": lr_used, "train_loss": train_loss,
               "val_loss": val["loss"], "val_loss_last": val["loss_last"], "bad_steps": st.bad_steps}
        self.log.rows.append(self.log.add_errors(row, val, self.targets, ph.n_pass))
        new = (["best.pt"] if best else []) + ([f"best_phase{st.phase + 1}.pt"] if phase_best else [])
        if new and self.dist.is_main:
            with self._averaged():
                ck = model_checkpoint(self.model, st, config=C.to_dict(self.cfg), targets=self.targets)
            self.best_ck.update({name: ck for name in new})
        # last.pt first (with the rows and the best models), then the files that follow from it.
        self.save()
        self.write_best(new)
        self.log.epoch(row, val, self.targets, n_pass=ph.n_pass, phase_epoch=st.epoch, epochs=ph.epochs,
                       improved=best, elapsed_s=self.elapsed(), columns=self.columns, recorded=True)
        return row

    def _val_outputs(self, n_pass: int):
        """(conformer indices, batch, outputs, forces or None) of this rank's validation batches."""
        need_forces = "forces" in self.targets
        for idx in val_batches(self.val_idx, self.dist, self.val_mols):
            batch = D.collate(self.ds, idx).to(self.dist.device, self.dtype, non_blocking=True)
            with torch.set_grad_enabled(need_forces):
                out, forces = forward(self.model, batch, n_pass, need_forces, create_graph=False)
            yield idx, batch, out, forces

    def validate(self, n_pass: int) -> dict:
        """Losses and errors over the whole validation set (all ranks together)."""
        m = Metrics(self.targets, n_pass, self.cfg.loss, device=self.dist.device)
        for _, batch, out, forces in self._val_outputs(n_pass):
            m.update(out, batch, forces)
        m.sums = self.dist.all_reduce_sum(m.sums)
        return m.summary()

    def _nonfinite_validation(self, n_pass: int) -> str:
        """The message for a non-finite validation loss, naming the conformers whose predictions
        are not finite (labels cannot be: ``collate`` masks non-finite ones); every rank looks at
        its share."""
        bad = []
        for idx, batch, out, forces in self._val_outputs(n_pass):
            ok_atom = torch.ones(batch.n_atoms, dtype=torch.bool, device=batch.coord.device)
            ok = torch.ones(batch.n_mol, dtype=torch.bool, device=batch.coord.device)
            for t in self.targets:
                if t == "forces":
                    ok_atom &= torch.isfinite(forces).all(1)
                elif t == "energy":
                    ok &= torch.isfinite(out["passes"]["energy"]).all(0)
                else:                                   # per atom, (T, N)
                    ok_atom &= torch.isfinite(out["passes"][t]).all(0)
            n_bad = torch.zeros(batch.n_mol, dtype=torch.int64, device=ok.device)
            ok &= n_bad.index_add_(0, batch.mol_idx, (~ok_atom).long()) == 0
            bad += [int(c) for c in np.asarray(idx)[(~ok).cpu().numpy()]]
        bad = sorted(c for part in self.dist.gather_objects(bad) for c in part)
        last = f"the last good checkpoint is {self.ckpt_last}" if self.ckpt_last.exists() else \
            "no checkpoint was written"
        if not bad:
            return (f"epoch {self.state.global_epoch + 1}: the validation loss is not finite although "
                    f"every prediction is; {last}")
        names = ", ".join(self.ds.name(c) for c in bad[:5])
        return (f"epoch {self.state.global_epoch + 1}: the validation loss is not finite: the model "
                f"gives non-finite outputs for {len(bad)} validation conformer(s): {names}"
                f"{' ...' if len(bad) > 5 else ''}; remove them from the data (or set "
                f"skip_bad_conformers on their source); {last}")

    def final_report(self) -> dict:
        """Errors of ``best.pt`` on the validation set and the test sources, per target, pass and
        source in user units: printed, and written to ``test_metrics.json`` (rank 0)."""
        from ..checkpoint import load_model
        from ..evaluate import evaluate, format_report, write_report
        path = self.ckpt_best if self.ckpt_best.exists() else self.ckpt_last
        if not path.exists():
            return {}
        model = place(load_model(path, backend=self.cfg.backend), self.dist.device, self.dtype)
        result = {"checkpoint": str(path), "best_epoch": self.state.best_epoch, "n_pass": model.n_pass}
        for role, idx in (("validation", self.val_idx), ("test", self.test_idx)):
            if len(idx):
                rep = evaluate(model, self.ds, idx, device=self.dist.device, dtype=self.dtype,
                               mols_per_batch=self.val_mols, dist=self.dist, name=str(path))
                result[role] = rep
                self.log.info(f"{role} set, {path.name} (epoch {self.state.best_epoch}, "
                              f"T={model.n_pass}):\n{format_report(rep)}")
        e = result.get("validation", {}).get("all", {}).get("energy", {})
        mae = e.get(f"p{model.n_pass}", {}).get("mae")
        if mae is not None and self.sae_baseline_kcal is not None:
            result["validation_sae_baseline_energy_mae_kcal_mol"] = self.sae_baseline_kcal
            self.log.info(f"validation energy MAE {mae:.3g} kcal/mol; the SAE alone: "
                          f"{self.sae_baseline_kcal:.3g} kcal/mol ({mae / self.sae_baseline_kcal:.2f}×)")
        if self.dist.is_main:
            write_report(result, self.run_dir / "test_metrics.json")
        return result

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        """``last.pt``: the weights (the average where EMA is on) and all a resume needs, the
        metrics rows and the best models included (rank 0 writes)."""
        st = self.state
        st.elapsed_s = self.elapsed()
        # The batches of this epoch used so far are the steps taken (a prefetching loader has
        # read one more from the sampler).
        st.sampler = self.train_sampler.state_dict(position=st.step)
        if self.dist.is_main:
            record = training_record(st, self.optimizer, self.schedule, config=C.to_dict(self.cfg),
                                     split=split_digest(self.train_idx, self.val_idx), targets=self.targets)
            record["rows"] = self.log.rows
            record["best"] = self.best_ck
            if self.ema is not None:
                record["ema"] = self.ema.state_dict()
            with self._averaged():
                write_checkpoint(self.model, record, [self.ckpt_last])
        self.dist.barrier()

    def write_best(self, names) -> None:
        """The best-model files ``names`` from their copies in memory (rank 0)."""
        if self.dist.is_main:
            for name in names:
                save_file(self.best_ck[name], self.run_dir / name)

    def restore(self) -> None:
        """Continue from ``last.pt``: weights (and their average), run state, sampler position,
        optimizer, schedule, random state and the metrics rows it covers."""
        path = self.ckpt_last
        state_dict, tr = read_checkpoint(path)
        self.model.load_state_dict(state_dict)
        if self.ema is not None:
            if "ema" in tr:
                self.ema.load_state_dict(tr["ema"])
            else:
                self.ema.reset()
                self.log.info(f"{path} has no weight average: it starts at the checkpoint's weights")
        elif "ema" in tr:
            self.model.load_state_dict({**state_dict, **tr["ema"]["raw"]})
            self.log.info(f"{path} was trained with ema.decay={tr['ema']['decay']}; continuing without it")
        st = self.state = RunState.from_dict(tr["state"], source=str(path))
        if tr["split"] != split_digest(self.train_idx, self.val_idx):
            raise TrainingError(f"resume: the train/validation split of {path} differs from "
                                f"the one the data and config give now; did the data change?")
        if tr["targets"] != self.targets:
            raise TrainingError(f"resume: targets were {tr['targets']}, now {self.targets}")
        if not st.sampler:
            raise CheckpointError(f"{path}: no batch sampler state (written by an older version); "
                                  f"cannot resume it exactly")
        self.train_sampler.load_state_dict(st.sampler, source=str(path))
        was = int(st.sampler.get("world_size", self.dist.world_size))
        if was != self.dist.world_size:
            per = self.cfg.data.mols_per_batch
            self.log.info(f"resumed on {self.dist.world_size} process(es) (was {was}): the rest of epoch "
                          f"{st.global_epoch + 1} is dealt again, so each of its conformers still trains "
                          f"once; a step's batch is now {per * self.dist.world_size} molecules "
                          f"(was {per * was}), with the same lr")
        if (self.train_sampler.epoch, self.train_sampler.position) != (st.global_epoch, st.step):
            raise CheckpointError(f"{path}: the sampler is at epoch {self.train_sampler.epoch} step "
                                  f"{self.train_sampler.position}, the run at epoch {st.global_epoch} "
                                  f"step {st.step}")
        if st.phase_started:
            self._new_optimizer(st.phase)
            self.optimizer.load_state_dict(tr["optimizer"])
            self.schedule.load_state_dict(tr["schedule"])
        restore_rng(tr["rng"])
        self._elapsed_base = st.elapsed_s
        if st.stopped == "max_time" and (self.budget_s is None or st.elapsed_s < self.budget_s):
            st.stopped = ""      # a bigger budget (or none) now: go on
        # What last.pt claims, on disk again: a kill between its rename and those of the files
        # after it (best models, metrics.csv) loses nothing.
        self.best_ck = tr.get("best", {})
        self.write_best(list(self.best_ck))
        self.log.restore_rows(tr.get("rows"), st.global_epoch, self.columns)
        self.log.info(f"resumed {path}: phase {st.phase + 1}, epoch {st.epoch + 1}, step {st.step}")

    # -- helpers -------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds of training over all restarts."""
        return self._elapsed_base + time.time() - self.t0

    def _deadline(self, n: int) -> float:
        """Elapsed seconds at which phase ``n`` ends at the latest: its share of ``max_time`` after
        the earlier phases' shares (``time_fraction``), else the budget (inf without one)."""
        if self.budget_s is None:
            return math.inf
        ph = self.cfg.curriculum[n]
        if ph.time_fraction is None:
            return self.budget_s
        upto = sum(p.time_fraction or 0.0 for p in self.cfg.curriculum[:n + 1])
        return min(self.budget_s, self.budget_s * upto)

    def _mfu_counter(self, ph: C.PhaseConfig):
        """(count_flop, peak FLOP/s) for the MFU on CUDA, (None, None) elsewhere: FLOPs from the
        model's own layer sizes over a measured matrix-product peak. With forces there is none:
        the force loss's double backward is not counted."""
        if self.dist.device.type != "cuda" or "forces" in self.targets:
            return None, None
        prec = getattr(self.model, "precision", "ieee")
        tf32 = None                     # the torch backend follows torch's own matmul setting
        if self.model.backend != "torch" and self.dtype == torch.float32:
            tf32 = prec == "tf32"       # the Triton kernels follow the model's precision
        peak = flops.measured_peak_flops(
            self.dist.device, torch.bfloat16 if prec == "bf16" else self.dtype, tf32=tf32)

        def count_flop(nb, n_atoms: int) -> float:
            return flops.count_batch(self.model, nb, n_atoms, ph.n_pass).train_flop
        return count_flop, peak

    def _time_left(self) -> Optional[float]:
        return None if self.budget_s is None else max(self.budget_s - self.elapsed(), 0.0)

    def _phase_end(self, ph: C.PhaseConfig, cut: bool) -> Optional[str]:
        """Why the current phase ends now (None: it goes on). Rank 0 decides, every rank follows
        (clocks differ by a little); ``cut``: the time budget ended the last epoch early."""
        st, sc = self.state, self.cfg.schedule
        why = None
        if self.dist.is_main:
            deadline = self._deadline(st.phase)
            if cut or self.elapsed() >= deadline:
                why = ("max_time reached" if deadline >= (self.budget_s or math.inf)
                       else f"its share of max_time is used ({deadline:.0f} s)")
            elif st.epoch >= ph.epochs:
                why = f"{ph.epochs} epochs done"
            elif self.schedule.below_floor:
                why = f"lr {self.schedule.lr:.3g} below the floor {sc.min_lr:.3g}"
            elif sc.early_stopping and st.stale_epochs >= sc.early_stopping:
                why = f"early stopping: no better validation loss in {st.stale_epochs} epochs"
        return self.dist.broadcast_object(why)

    def _averaged(self):
        """The block sees the averaged weights (EMA), or the raw ones without EMA."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _new_optimizer(self, n: int) -> None:
        self.model.n_pass = self.cfg.curriculum[n].n_pass
        params = [p for p in self.model.parameters() if p.requires_grad]
        oc = self.cfg.optim
        if self.cfg.curriculum[n].lr is not None:
            oc = dataclasses.replace(oc, lr=self.cfg.curriculum[n].lr)
        self.optimizer, self.opt_desc = make_optimizer(params, oc, self.dist.device)
        sc = self.cfg.schedule
        self.schedule = PlateauSchedule(self.optimizer, sc.factor, sc.patience, sc.threshold, sc.min_lr)

    def _skipped_step(self, loss: float) -> None:
        st, cfg = self.state, self.cfg
        st.bad_steps += 1
        st.consecutive_bad += 1
        self.log.info(f"step {st.global_step}: non-finite loss or gradient ({loss}); step skipped "
                      f"({st.bad_steps} skipped so far)")
        if st.consecutive_bad >= cfg.max_bad_steps:
            raise TrainingError(
                f"{st.consecutive_bad} consecutive steps had a NaN/inf loss or gradient "
                f"(max_bad_steps={cfg.max_bad_steps}); stopping. The weights never saw them: "
                f"the last good checkpoint is {self.ckpt_last}. Lower optim.lr, set "
                f"optim.grad_clip, or check the data for bad labels.")

    def _announce(self) -> None:
        cfg, dist = self.cfg, self.dist
        n_par = sum(p.numel() for p in self.model.parameters())
        n_tr = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log.info(f"run {self.run_dir}: {dist.world_size} process(es), backend "
                      f"{dist.backend or 'none'}, device {dist.device}, {cfg.dtype}; "
                      f"{len(self.train_idx)} train / {len(self.val_idx)} validation conformers; "
                      f"batch {cfg.data.mols_per_batch} molecules per rank × {dist.world_size} = "
                      f"{cfg.data.mols_per_batch * dist.world_size}; targets {', '.join(self.targets)}; "
                      f"{n_tr}/{n_par} parameters train")
        self.log.info("SAE (Ha): " + ", ".join(f"Z={z} {e:.6f}" for z, e in
                                               zip(self.model.elements, self.model.sae_Ha.tolist())))
        self.sae_baseline_kcal = None
        if "energy" in self.ds.labels and len(self.val_idx):
            rel = D.relative_energy(self.ds, self.model.sae_Ha.cpu().numpy(), self.val_idx,
                                    elements=self.model.elements)
            rel = rel[np.isfinite(rel)]
            if rel.size:
                self.sae_baseline_kcal = float(np.abs(rel).mean() * HARTREE_TO_KCALMOL)
                self.log.info(f"validation energy MAE of the SAE alone (the baseline): "
                              f"{self.sae_baseline_kcal:.3g} kcal/mol")

    def _open_run_dir(self) -> tuple[Path, bool]:
        """The run folder, made if new, and locked by rank 0 for the run's life: an advisory lock
        (``flock`` on ``.lock``) that the kernel releases when the process dies, so a second
        trainer on the folder is refused while a killed one never leaves it locked. Returns the
        folder and whether this run made it."""
        cfg = self.cfg
        if cfg.run_dir:
            path = cfg.run_dir
        elif cfg.resume:
            path = str(latest_run())
        else:
            path = f"runs/{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
        path = Path(self.dist.broadcast_object(path))
        created, refused, self._lock = False, None, None
        if self.dist.is_main:
            created = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
            self._lock = open(path / ".lock", "a+")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.seek(0)
                holder = self._lock.read().strip() or "?"
                self._lock.close()
                self._lock = None
                refused = (f"{path} is in use by another trainer (pid {holder}); wait for it to "
                           f"end, or give this run another run_dir")
            else:
                self._lock.seek(0)
                self._lock.truncate()
                self._lock.write(f"{os.getpid()}\n")
                self._lock.flush()
                for tmp in path.glob(".*.tmp"):  # left by a crash inside save_atomic
                    tmp.unlink()
        refused = self.dist.broadcast_object(refused)
        if refused:
            raise TrainingError(refused)
        self.dist.barrier()
        return path, created

    def _close_run_dir(self, remove: bool = False) -> None:
        """Release the folder's lock; ``remove``: remove the folder too if nothing but the lock
        is in it (a start that failed before writing anything)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
            if remove and self.dist.is_main and [p.name for p in self.run_dir.iterdir()] == [".lock"]:
                (self.run_dir / ".lock").unlink()
                self.run_dir.rmdir()


def run(cfg: C.TrainConfig, dist: Optional[Dist] = None, out=None) -> dict:
    """Train with ``cfg``; returns the metrics row of the last epoch. Process-wide settings
    (threads, denormals, allocator) are ``main``'s: call ``dist.process_settings`` for them."""
    return Trainer(cfg, dist, out).fit()


# -- the command line ------------------------------------------------------------------------------
def latest_run(root: Path = Path("runs")) -> Path:
    """The newest ``runs/*`` folder with a ``last.pt`` (by name: the names are UTC timestamps)."""
    runs = sorted(p for p in root.glob("*") if (p / "last.pt").exists())
    if not runs:
        raise TrainingError(f"resume: no run_dir given and no {root}/*/last.pt found")
    return runs[-1]


def parse_args(argv, prog: str = "python -m aimnet_fast.train") -> C.TrainConfig:
    ap = argparse.ArgumentParser(
        prog=prog, description="Train AIMNet (one process, or many under torchrun).",
        epilog="Overrides are dotted keys of aimnet_fast.train.config.TrainConfig, e.g. optim.lr=5e-4 "
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
    asked = {}
    for item in overrides:   # resume and run_dir decide which config the others apply to
        key, _, raw = item.partition("=")
        if key.strip() in ("resume", "run_dir"):
            try:
                asked[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                pass        # load_config names the bad value

    if asked.get("resume"):
        # Find the run folder first, then continue with the run's own resolved config (its
        # curriculum, data, ...); command-line overrides still apply on top.
        run_dir = Path(asked["run_dir"]) if asked.get("run_dir") else latest_run()
        if (run_dir / "config.yaml").exists():
            return C.load_config(run_dir / "config.yaml", overrides + [f"run_dir={run_dir}"])
        return C.load_config(files[0] if files else C.DEFAULT_RUN, overrides + [f"run_dir={run_dir}"])
    # No config file: the quick run on the embedded data (configs/default.yaml).
    return C.load_config(files[0] if files else C.DEFAULT_RUN, overrides)


def main(argv=None, prog: str = "python -m aimnet_fast.train") -> int:
    """Exit status 0; 1 for an error of the run (one line on stderr), 2 for a usage or config error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(argv, prog)
    except AIMNetError as e:
        return report(prog, e)
    if cfg.deterministic:   # before CUDA starts: cuBLAS reads it once
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dist = setup_distributed(cfg.device)
    process_settings(cfg.num_threads, cfg.flush_denormal, dist.device, cfg.deterministic)
    try:
        run(cfg, dist)
    except AIMNetError as e:
        return report(prog, e)
    finally:
        teardown(dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
