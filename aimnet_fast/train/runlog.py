"""What a run tells its user: progress lines on stdout (rank 0 only), ``metrics.csv`` (one row per
epoch, rewritten atomically), the learning-curve PNG (with matplotlib) and TensorBoard scalars
(with tensorboard)."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional, TextIO

from ..units import REPORT_UNITS


class RunLog:
    def __init__(self, run_dir: Path, is_main: bool, out: TextIO, *, plot: bool, tensorboard: bool):
        self.run_dir, self.is_main, self.out = Path(run_dir), is_main, out
        self.metrics_path = self.run_dir / "metrics.csv"
        self.plot_enabled, self.tb_enabled = plot, tensorboard
        self.rows: list[dict] = []
        self._tb = None

    # -- progress lines ----------------------------------------------------------------------
    def info(self, msg: str) -> None:
        if self.is_main:
            print(msg, file=self.out, flush=True)

    def step(self, *, phase: int, n_pass: int, epoch: int, epochs: int, step: int, n_steps: int,
             loss: float, lr: float, mols_per_s: float, global_step: int) -> None:
        self.info(f"phase {phase + 1} T={n_pass} epoch {epoch + 1}/{epochs} step {step}/{n_steps} "
                  f"loss {loss:.4g} lr {lr:.3g} {mols_per_s:.1f} mol/s")
        tb = self.tensorboard()
        if tb:
            tb.add_scalar("train/loss_step", loss, global_step)

    # -- one row per epoch -------------------------------------------------------------------
    @staticmethod
    def columns(targets: list[str], max_pass: int) -> list[str]:
        cols = ["time_s", "phase", "n_pass", "epoch", "lr", "train_loss", "val_loss", "bad_steps"]
        for t in targets:
            tags = ["last"] if t == "forces" else [f"p{p + 1}" for p in range(max_pass)]
            for tag in tags:
                cols += [f"val_{t}_mae_{tag}", f"val_{t}_rmse_{tag}"]
        return cols

    def load_rows(self, up_to_epoch: int) -> None:
        """Rows of the epochs a checkpoint covers (a killed run may have written one more)."""
        self.rows = []
        if self.metrics_path.exists():
            with open(self.metrics_path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= up_to_epoch]

    def epoch(self, row: dict, val: dict, targets: list[str], *, n_pass: int, phase_epoch: int,
              epochs: int, improved: bool, elapsed_s: float, columns: list[str]) -> None:
        """Add the epoch's row (``row`` plus the validation errors of ``val``), write
        ``metrics.csv``, the plot and TensorBoard, and print the epoch's summary."""
        parts = []
        for t in targets:
            tags = ["last"] if t == "forces" else [f"p{p + 1}" for p in range(n_pass)]
            vals = []
            for tag in tags:
                row[f"val_{t}_mae_{tag}"] = val[f"{t}_mae_{tag}"]
                row[f"val_{t}_rmse_{tag}"] = val[f"{t}_rmse_{tag}"]
                vals.append(f"{tag} {val[f'{t}_mae_{tag}']:.4g}/{val[f'{t}_rmse_{tag}']:.4g}")
            parts.append(f"{t} MAE/RMSE ({REPORT_UNITS[t][0]}) " + ", ".join(vals))
        self.rows.append(row)
        self._write_csv(columns)
        self._plot()
        tb = self.tensorboard()
        if tb:
            for k, v in row.items():
                if k not in ("phase", "epoch", "time_s"):
                    tb.add_scalar(f"epoch/{k}", float(v), row["epoch"])
            tb.flush()
        self.info(f"epoch {row['epoch']} (phase {row['phase']} T={n_pass} epoch {phase_epoch}/{epochs}) "
                  f"train loss {row['train_loss']:.4g} val loss {row['val_loss']:.4g}"
                  f"{' *' if improved else ''} lr {row['lr']:.3g} skipped {row['bad_steps']} "
                  f"[{elapsed_s:.0f} s]\n    val " + "\n    val ".join(parts))

    def _write_csv(self, columns: list[str]) -> None:
        if not self.is_main:
            return
        tmp = self.metrics_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow(r)
        os.replace(tmp, self.metrics_path)

    def _plot(self) -> None:
        if not (self.plot_enabled and self.is_main and self.rows):
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        rows = self.rows
        ep = [int(r["epoch"]) for r in rows]
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        a1.semilogy(ep, [float(r["train_loss"]) for r in rows], label="train")
        a1.semilogy(ep, [float(r["val_loss"]) for r in rows], label="validation")
        for r0, r1 in zip(rows[:-1], rows[1:]):
            if str(r0["phase"]) != str(r1["phase"]):
                a1.axvline(int(r1["epoch"]) - 0.5, color="gray", ls=":")
        a1.set_ylabel("loss")
        a1.legend()
        a2.semilogy(ep, [float(r["lr"]) for r in rows], color="C2")
        a2.set_ylabel("learning rate")
        a2.set_xlabel("epoch")
        fig.tight_layout()
        fig.savefig(self.run_dir / "learning_curve.png", dpi=100)
        plt.close(fig)

    # -- TensorBoard -------------------------------------------------------------------------
    def tensorboard(self) -> Optional[object]:
        """The SummaryWriter (created on first use), or None without tensorboard / off rank 0."""
        if self._tb is None and self.tb_enabled and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                self._tb = False
                self.info("tensorboard not importable: no TensorBoard logs (metrics.csv has it all)")
        return self._tb or None

    def close(self) -> None:
        if self._tb:
            self._tb.close()
