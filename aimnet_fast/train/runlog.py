"""What a run tells its user (rank 0 only): progress on stdout, ``metrics.csv`` (one row per epoch,
rewritten atomically), the learning-curve PNG (with matplotlib) and TensorBoard scalars (with
tensorboard).

Progress is either a live bar per epoch (tqdm: the epoch's time left, and the run's where the trainer
knows it) on a terminal, or plain lines every ``log_every`` steps in log files and under torchrun
(``progress="auto"`` chooses; ``"bar"`` or ``"lines"`` force one). Both show the loss, the learning
rate, molecules/s, atoms/s and, where given, the model-FLOPs utilisation.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import time
from pathlib import Path
from typing import Optional, TextIO

from ..checkpoint import write_atomic
from ..errors import ConfigError
from ..units import REPORT_UNITS

PROGRESS_MODES = ("auto", "bar", "lines")

#: The clock of the epoch's time left (a module attribute so that tests can set the time).
clock = time.perf_counter


def hms(seconds: float) -> str:
    """``H:MM:SS`` of a duration in seconds (``?`` for none)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def under_torchrun() -> bool:
    """True in a process started by torchrun (or another torch elastic launcher)."""
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def choose_progress(progress: str, out: TextIO) -> str:
    """``"bar"`` or ``"lines"`` for the setting ``progress`` (``"auto"``: a bar when ``out`` is a
    terminal, the process is not under torchrun and tqdm is importable; lines otherwise)."""
    if progress not in PROGRESS_MODES:
        raise ConfigError(f"progress: {progress!r} is not one of {', '.join(PROGRESS_MODES)}")
    if progress == "lines":
        return "lines"
    try:
        import tqdm  # noqa: F401
    except ImportError:
        if progress == "bar":
            raise ConfigError("progress: 'bar' needs tqdm (pip install tqdm), or use 'lines'") from None
        return "lines"
    if progress == "bar":
        return "bar"
    isatty = getattr(out, "isatty", None)
    try:
        tty = bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):  # a closed or detached stream
        tty = False
    return "bar" if tty and not under_torchrun() else "lines"


class RunLog:
    def __init__(self, run_dir: Path, is_main: bool, out: TextIO, *, plot: bool, tensorboard: bool,
                 progress: str = "auto", log_every: int = 10):
        self.run_dir, self.is_main, self.out = Path(run_dir), is_main, out
        self.metrics_path = self.run_dir / "metrics.csv"
        self.plot_enabled, self.tb_enabled = plot, tensorboard
        self.progress = choose_progress(progress, out)
        self.log_every = max(int(log_every), 1)
        self.rows: list[dict] = []
        self._tb = None
        self._bar = None
        self._epoch_key: Optional[tuple] = None   # (phase, epoch) whose timing / bar is current
        self._epoch_t0 = 0.0
        self._epoch_step0 = 0

    # -- progress ----------------------------------------------------------------------------
    def info(self, msg: str) -> None:
        """A message on its own line(s); above the bar while one is open."""
        if not self.is_main:
            return
        if self._bar is not None:
            from tqdm import tqdm
            tqdm.write(msg, file=self.out)
            self.out.flush()
        else:
            print(msg, file=self.out, flush=True)

    def epoch_begin(self, *, phase: int, n_pass: int, epoch: int, epochs: int, n_steps: int,
                    start_step: int = 0) -> None:
        """An epoch (or its rest after a resume, from ``start_step``) of ``n_steps`` steps starts:
        its clock starts, and in bar mode its bar opens. ``phase`` and ``epoch`` count from 0."""
        self._close_bar()
        self._epoch_key = (phase, epoch)
        self._epoch_t0, self._epoch_step0 = clock(), start_step
        if self.is_main and self.progress == "bar":
            from tqdm import tqdm
            self._bar = tqdm(total=n_steps, initial=start_step, file=self.out, unit="step",
                             desc=f"phase {phase + 1} T={n_pass} epoch {epoch + 1}/{epochs}",
                             dynamic_ncols=True, leave=True, mininterval=0.5, smoothing=0.1)

    def step(self, *, phase: int, n_pass: int, epoch: int, epochs: int, step: int, n_steps: int,
             loss: float, lr: float, mols_per_s: float, global_step: int,
             atoms_per_s: Optional[float] = None, mfu: Optional[float] = None,
             run_left_s: Optional[float] = None) -> None:
        """Step ``step`` (1-based, of ``n_steps`` in the epoch) is done. Meant to be called every
        step: the bar advances every step, a line is printed every ``log_every`` steps and at the
        last; TensorBoard gets the same steps as the lines. ``mfu`` is a fraction (0.12 = 12 %),
        ``run_left_s`` the trainer's estimate of the seconds left in the run."""
        if self._epoch_key != (phase, epoch):   # no epoch_begin: start the clock (and bar) here
            self.epoch_begin(phase=phase, n_pass=n_pass, epoch=epoch, epochs=epochs, n_steps=n_steps,
                             start_step=step)
        report = step % self.log_every == 0 or step == n_steps
        if self.is_main:
            if self._bar is not None:
                self._bar.set_postfix_str(self._postfix(loss, lr, mols_per_s, atoms_per_s, mfu,
                                                        run_left_s), refresh=False)
                self._bar.update(step - self._bar.n)
            elif report:
                done = step - self._epoch_step0
                per_step = (clock() - self._epoch_t0) / done if done > 0 else None
                left = None if per_step is None else (n_steps - step) * per_step
                self.info(f"phase {phase + 1} T={n_pass} epoch {epoch + 1}/{epochs} step {step}/{n_steps} "
                          f"loss {loss:.4g} lr {lr:.3g} {_throughput(mols_per_s, atoms_per_s)}"
                          + (f" MFU {100 * mfu:.1f}%" if mfu is not None else "")
                          + (f" epoch left {hms(left)}" if left is not None else "")
                          + (f" run left {hms(run_left_s)}" if run_left_s is not None else ""))
        if report:
            tb = self.tensorboard()
            if tb:
                tb.add_scalar("train/loss_step", loss, global_step)
                tb.add_scalar("train/lr_step", lr, global_step)
                tb.add_scalar("train/mols_per_s", mols_per_s, global_step)
                if atoms_per_s is not None:
                    tb.add_scalar("train/atoms_per_s", atoms_per_s, global_step)
                if mfu is not None:
                    tb.add_scalar("train/mfu", mfu, global_step)

    def epoch_end(self) -> None:
        """The epoch's training steps are done: close its bar (before validation and the epoch's
        summary lines)."""
        self._close_bar()

    @staticmethod
    def _postfix(loss, lr, mols_per_s, atoms_per_s, mfu, run_left_s) -> str:
        parts = [f"loss {loss:.4g}", f"lr {lr:.3g}", _throughput(mols_per_s, atoms_per_s)]
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        if run_left_s is not None:
            parts.append(f"run left {hms(run_left_s)}")
        return ", ".join(parts)

    def _close_bar(self) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.close()
            self.out.flush()

    # -- one row per epoch -------------------------------------------------------------------
    @staticmethod
    def columns(targets: list[str], max_pass: int) -> list[str]:
        # val_loss: the phase's loss (all passes, as trained); val_loss_last: the prediction's
        # (last pass), which best.pt follows across phases.
        cols = ["time_s", "phase", "n_pass", "epoch", "lr", "train_loss", "val_loss", "val_loss_last",
                "bad_steps"]
        for t in targets:
            tags = ["last"] if t == "forces" else [f"p{p + 1}" for p in range(max_pass)]
            for tag in tags:
                cols += [f"val_{t}_mae_{tag}", f"val_{t}_rmse_{tag}"]
        return cols

    def restore_rows(self, rows: list[dict] | None, up_to_epoch: int, columns: list[str]) -> None:
        """The rows of a resumed run: those its checkpoint holds (the truth: an epoch end killed
        before ``metrics.csv`` was rewritten loses no row), else (an older checkpoint) those of
        ``metrics.csv`` up to the checkpoint's epoch; ``metrics.csv`` is rewritten from them."""
        if rows is not None:
            self.rows = [dict(r) for r in rows]
        else:
            self.rows = []
            if self.metrics_path.exists():
                with open(self.metrics_path) as f:
                    self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= up_to_epoch]
        self._write_csv(columns)

    @staticmethod
    def add_errors(row: dict, val: dict, targets: list[str], n_pass: int) -> dict:
        """``row`` with the validation errors of ``val`` (MAE and RMSE per target and pass)."""
        for t in targets:
            for tag in (["last"] if t == "forces" else [f"p{p + 1}" for p in range(n_pass)]):
                row[f"val_{t}_mae_{tag}"] = val[f"{t}_mae_{tag}"]
                row[f"val_{t}_rmse_{tag}"] = val[f"{t}_rmse_{tag}"]
        return row

    def epoch(self, row: dict, val: dict, targets: list[str], *, n_pass: int, phase_epoch: int,
              epochs: int, improved: bool, elapsed_s: float, columns: list[str],
              recorded: bool = False) -> None:
        """Add the epoch's row (``row`` plus the validation errors of ``val``; ``recorded``: the
        trainer has added it to ``rows`` already), write ``metrics.csv``, the plot and
        TensorBoard, and print the epoch's summary."""
        self._close_bar()
        self._epoch_key = None
        self.add_errors(row, val, targets, n_pass)
        parts = []
        for t in targets:
            tags = ["last"] if t == "forces" else [f"p{p + 1}" for p in range(n_pass)]
            vals = [f"{tag} {val[f'{t}_mae_{tag}']:.4g}/{val[f'{t}_rmse_{tag}']:.4g}" for tag in tags]
            parts.append(f"{t} MAE/RMSE ({_unit(t)}) " + ", ".join(vals))
        if not recorded:
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
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow(r)
        write_atomic(self.metrics_path, text.getvalue().encode())

    def _plot(self) -> None:
        if not (self.plot_enabled and self.is_main and self.rows):
            return
        try:
            fig = learning_curve_figure(self.rows)
        except ImportError:
            return
        png = io.BytesIO()
        fig.savefig(png, dpi=100, format="png")
        write_atomic(self.run_dir / "learning_curve.png", png.getvalue())

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
        self._close_bar()
        if self._tb:
            self._tb.close()


def _throughput(mols_per_s: float, atoms_per_s: Optional[float]) -> str:
    s = f"{mols_per_s:.1f} mol/s"
    return s if atoms_per_s is None else f"{s} {atoms_per_s:.0f} atoms/s"


def _unit(target: str) -> str:
    return REPORT_UNITS[target][0] if target in REPORT_UNITS else "?"


# -- the learning-curve picture ------------------------------------------------------------------
_ERR_COL = re.compile(r"^val_(.+)_mae_(p\d+|last)$")


def _num(v) -> float:
    """A metrics cell as a float: NaN for an empty cell (a pass the row's phase lacks) or none."""
    if v is None or v == "":
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _positive(xs: list[float]) -> list[float]:
    return [x if x > 0 else math.nan for x in xs]   # log axes: no zeros or negatives


def error_series(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Validation MAE per target and pass tag (``p1``.. or ``last``), one value per row (NaN where
    the row has none), in the order the columns first appear."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        for k in r:
            m = _ERR_COL.match(k)
            if m:
                out.setdefault(m.group(1), {}).setdefault(m.group(2), [])
    for t, tags in out.items():
        for tag, vals in tags.items():
            vals.extend(_num(r.get(f"val_{t}_mae_{tag}")) for r in rows)
        # keep a pass only where some row has it; order p1, p2, ..., last
        out[t] = {tag: v for tag, v in sorted(tags.items(), key=lambda kv: _tag_order(kv[0]))
                  if any(math.isfinite(x) for x in v)}
    return {t: tags for t, tags in out.items() if tags}


def _tag_order(tag: str) -> int:
    return 10 ** 6 if tag == "last" else int(tag[1:])


def phase_runs(rows: list[dict]) -> list[tuple[int, int, str]]:
    """(first row, one past the last row, "phase p: T=n") of each run of rows of one phase."""
    runs: list[tuple[int, int, str]] = []
    prev = None
    for k, r in enumerate(rows):
        key = (str(r["phase"]), str(r.get("n_pass", "")))
        if key != prev:
            runs.append((k, k + 1, f"phase {r['phase']}: T={r.get('n_pass', '?')}"))
            prev = key
        else:
            runs[-1] = (runs[-1][0], k + 1, runs[-1][2])
    return runs


def learning_curve_figure(rows: list[dict]):
    """The learning-curve figure of metrics rows (as written, or as read back from metrics.csv):
    one panel per target with its validation MAE in the report unit (``REPORT_UNITS``) per pass
    (lines broken at phase switches), and a last panel with the train / validation loss and the
    learning rate (right axis); log scales; dotted lines at the phase switches, each phase
    labelled with its T. Needs matplotlib (ImportError without it). Returns the
    ``matplotlib.figure.Figure`` (no pyplot state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter, MaxNLocator

    def log_y(ax):
        # plain numbers (1.2, 0.05) instead of 1.2×10⁰, which crowd a short run's narrow range
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))

    ep = [_num(r["epoch"]) for r in rows]
    runs = phase_runs(rows)
    errors = error_series(rows)
    n = len(errors) + 1
    fig = Figure(figsize=(8, 2.4 * n + 0.6), layout="constrained")
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]

    def plot(ax, ys, **kw):
        ys = _positive(ys)
        for j, (a, b, _) in enumerate(runs):
            ax.plot(ep[a:b], ys[a:b], marker=".", ms=3, **dict(kw, label=kw.get("label") if j == 0 else None))

    for ax, (t, tags) in zip(axes, errors.items()):
        for i, (tag, vals) in enumerate(tags.items()):
            label = "last pass" if tag == "last" else f"pass {tag[1:]}"
            plot(ax, vals, color=f"C{i}", label=label)
        log_y(ax)
        ax.set_ylabel(f"MAE ({_unit(t)})")
        ax.set_title(f"validation {t}", fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="lower left")
    ax = axes[-1]
    plot(ax, [_num(r.get("train_loss")) for r in rows], color="C0", label="train")
    plot(ax, [_num(r.get("val_loss")) for r in rows], color="C1", label="validation")
    log_y(ax)
    ax.set_ylabel("loss")
    ax.set_title("loss and learning rate", fontsize=9, loc="left")
    ax.set_xlabel("epoch")
    lr_ax = ax.twinx()
    lr_ax.plot(ep, _positive([_num(r.get("lr")) for r in rows]), color="C2", ls="--", lw=1,
               drawstyle="steps-mid", label="lr")
    log_y(lr_ax)
    lr_ax.set_ylabel("learning rate")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = lr_ax.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    for a in axes:
        for i0, _, _ in runs[1:]:
            a.axvline(ep[i0] - 0.5, color="gray", ls=":", lw=1)
    finite = [x for x in ep if math.isfinite(x)]
    if finite:   # room for the phase labels: half an epoch either side
        ax.set_xlim(min(finite) - 0.5, max(finite) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    top = axes[0]
    for i0, _, lab in runs:
        top.text(ep[i0] - 0.4, 0.97, lab, transform=top.get_xaxis_transform(), fontsize=8,
                 color="dimgray", va="top", ha="left")
    return fig
