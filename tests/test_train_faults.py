"""Faults a run must survive or refuse in one line: a kill at every rename and fsync of an epoch end,
a second trainer on the same run folder, a full disk while a checkpoint is written, a start that
fails, a non-finite validation loss, the torchrun agent killed under its workers, and
deterministic runs."""
from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from aimnet_fast.errors import TrainingError
from aimnet_fast.train import config as C
from aimnet_fast.train import trainer as T

REPO = Path(__file__).resolve().parents[1]
ARGS = ["data.max_conformers=40", "data.mols_per_batch=4", "max_steps_per_epoch=2", "num_threads=1",
        "log_every=100", "tensorboard=false", "plot=false", "device=cpu", "progress=lines",
        "curriculum.0.epochs=2", "curriculum.1.epochs=1"]
#: The command line's arguments for the same run: a bare command would run configs/default.yaml.
CLI = [str(REPO / "aimnet_fast" / "configs" / "base.yaml")] + ARGS


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def record(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def rows(run: Path) -> list[list[str]]:
    with open(run / "metrics.csv") as f:
        return [r[1:] for r in csv.reader(f)]     # all but the wall-clock column


# -- a kill at every rename and fsync of an epoch end -----------------------------------------------
KILLER = textwrap.dedent("""
    import os, signal, sys
    n, log, calls = int(os.environ["KILL_AFTER"]), os.environ.get("CALL_LOG"), [0]
    def counted(name, fn):
        def call(*a, **k):
            result = fn(*a, **k)
            calls[0] += 1
            if log:
                with open(log, "a") as f:
                    f.write(f"{calls[0]} {name} {a[-1] if name == 'replace' else ''}\\n")
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return call
    os.replace, os.fsync = counted("replace", os.replace), counted("fsync", os.fsync)
    from aimnet_fast.train.trainer import main
    sys.exit(main(sys.argv[1:]))
""")


def train(run: Path, *extra, kill_after: int = 0, call_log: Path | None = None):
    e = env()
    e["KILL_AFTER"] = str(kill_after)
    if call_log:
        e["CALL_LOG"] = str(call_log)
    return subprocess.run([sys.executable, "-c", KILLER, *CLI, f"run_dir={run}", *extra],
                          env=e, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_kill_at_every_rename_and_fsync_of_an_epoch_end_loses_nothing(tmp_path):
    ref, log = tmp_path / "ref", tmp_path / "calls.txt"
    p = train(ref, call_log=log)
    assert p.returncode == 0, p.stderr[-2000:]
    calls = log.read_text().split("\n")
    csv_writes = [int(c.split()[0]) for c in calls if c.endswith("metrics.csv")]
    # Every file-system commit of the second epoch's end: last.pt, best.pt, best_phase1.pt (where
    # the epoch improved them) and metrics.csv, each a data fsync, a rename and a folder fsync.
    window = range(csv_writes[0] + 1, csv_writes[1] + 1)
    assert len(window) >= 4
    for n in window:
        run = tmp_path / f"kill{n}"
        p = train(run, kill_after=n)
        assert p.returncode == -signal.SIGKILL, (n, p.stderr[-2000:])
        p = train(run, "resume=true")
        assert p.returncode == 0, (n, p.stderr[-2000:])
        assert rows(run) == rows(ref), n
        for name in ("last.pt", "best.pt", "best_phase1.pt", "best_phase2.pt"):
            a, b = record(ref / name), record(run / name)
            assert a["training"]["state"]["global_epoch"] == b["training"]["state"]["global_epoch"], (n, name)
            for k, v in a["state_dict"].items():
                assert torch.equal(v, b["state_dict"][k]), (n, name, k)


# -- the run folder's lock ---------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import fcntl, sys, time
    f = open(sys.argv[1], "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write("4242\\n"); f.flush()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_second_trainer_on_a_run_folder_is_refused_until_the_first_dies(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert T.main(CLI + [f"run_dir={run}"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{run} is in use by another trainer (pid 4242)" in err[0]
        assert not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead holder's lock: the folder is free.
    assert T.main(CLI + [f"run_dir={run}", "curriculum.0.epochs=1", "curriculum.1.epochs=0"]) == 0


# -- a full disk -------------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(tmp_path, monkeypatch, capsys):
    from aimnet_fast import checkpoint
    run = tmp_path / "run"
    saves, real_fsync = [], os.fsync

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "last.pt" in name and name.endswith(".tmp"):
            saves.append(name)
            if len(saves) == 2:           # the second last.pt: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    assert T.main(CLI + [f"run_dir={run}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert (f"cannot write {run / 'last.pt'}: No space left on device; the previous last.pt is "
            f"intact") in err[0]
    assert record(run / "last.pt")["training"]["state"]["global_epoch"] == 1
    assert not list(run.glob(".*.tmp"))


# -- a failed start, file modes --------------------------------------------------------------------------
def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert T.main(CLI + [f"run_dir={run}", f"data.sources=[{{path: {tmp_path / 'missing.h5'}}}]"]) == 1
    assert "missing.h5" in capsys.readouterr().err
    assert not run.exists()


def test_checkpoints_are_readable_like_the_other_files(tmp_path):
    run = tmp_path / "run"
    T.run(C.load_config(None, ARGS + [f"run_dir={run}", "curriculum.0.epochs=1", "curriculum.1.epochs=0"]))
    mode = (run / "metrics.csv").stat().st_mode & 0o777
    for name in ("last.pt", "best.pt", "test_metrics.json"):
        assert (run / name).stat().st_mode & 0o777 == mode, name


# -- a non-finite validation loss ------------------------------------------------------------------------
def test_a_non_finite_validation_loss_names_the_conformer_and_stops(tmp_path, monkeypatch):
    cfg = C.load_config(None, ARGS + [f"run_dir={tmp_path / 'run'}"])
    trainer = T.Trainer(cfg)
    victim = int(trainer.val_idx[1])
    real = T.forward

    def forward(model, batch, n_pass, need_forces, create_graph=True, neighbors=None):
        out, forces = real(model, batch, n_pass, need_forces, create_graph, neighbors)
        if not torch.is_grad_enabled() and trainer.state.global_epoch == 1:   # epoch 2's validation
            hit = (batch.conf_idx == victim).nonzero().flatten()
            out["passes"]["energy"][:, hit] = float("nan")
        return out, forces
    monkeypatch.setattr(T, "forward", forward)
    with pytest.raises(TrainingError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "epoch 2: the validation loss is not finite" in msg
    assert f"1 validation conformer(s): {trainer.ds.name(victim)};" in msg
    assert f"the last good checkpoint is {tmp_path / 'run' / 'last.pt'}" in msg
    assert record(tmp_path / "run" / "last.pt")["training"]["state"]["global_epoch"] == 1


# -- torchrun's agent killed -----------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_workers_end_when_the_torchrun_agent_is_killed(tmp_path):
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              "--standalone", "-m", "aimnet_fast.train", *CLI,
                              f"run_dir={tmp_path / 'run'}", "curriculum.0.epochs=1000",
                              "max_steps_per_epoch=1000"],
                             env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        workers: list[int] = []
        while time.time() < deadline and not (tmp_path / "run" / "config.yaml").exists():
            time.sleep(0.5)
        workers = children(agent.pid)
        assert len(workers) == 2, "torchrun started its two workers"
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(Path(f"/proc/{w}").exists() and
                                             "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]
                                             for w in workers):
            time.sleep(0.2)
        alive = [w for w in workers if Path(f"/proc/{w}").exists()
                 and Path(f"/proc/{w}/stat").read_text().split()[2] != "Z"]
        assert not alive, f"workers {alive} outlived their launcher"
    finally:
        agent.kill()
        for w in children(os.getpid()):
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- deterministic runs ---------------------------------------------------------------------------------
def test_deterministic_runs_repeat_bit_for_bit_with_the_default_threads(tmp_path):
    out = []
    for name in ("a", "b"):
        args = [a for a in CLI if not a.startswith("num_threads")]
        e = env()
        e.pop("OMP_NUM_THREADS")
        p = subprocess.run([sys.executable, "-m", "aimnet_fast.train", *args, f"run_dir={tmp_path / name}",
                            "deterministic=true"], env=e, cwd=REPO, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        out.append(record(tmp_path / name / "last.pt")["state_dict"])
    for k, v in out[0].items():
        assert torch.equal(v, out[1][k]), k


# -- data that the checks refuse before training ---------------------------------------------------
def test_hartree_declared_as_kcal_per_mol_is_refused_before_training(tmp_path, capsys):
    sample = REPO.parent / "shared" / "data" / "ani1x_sample.h5"
    if not sample.exists():
        pytest.skip("shared data not found")
    run = tmp_path / "run"
    src = (f"data.sources=[{{path: {sample}, layout: ani1x, "
           f"properties: {{energy: {{key: wb97x_tz.energy, unit: kcal/mol}}}}}}]")
    assert T.main(CLI + [f"run_dir={run}", src, "data.split=conformer"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "the energies look like hartree declared as 'kcal/mol'" in err[0]
    assert f"{sample}" in err[0]
    # The summary of what was read came first, on stdout.
    assert "energy ('wb97x_tz.energy', kcal/mol): used 8 conformers" in captured.out
    assert not run.exists()


# -- resume on another number of ranks ---------------------------------------------------------------
STEP_LOGGER = textwrap.dedent("""
    import os, signal, sys
    from aimnet_fast.train import trainer
    real, log, kill_at = trainer.train_step, os.environ["STEP_LOG"], int(os.environ.get("KILL_AT", "0"))
    rank, taken = int(os.environ.get("RANK", "0")), [0]
    def step(model, optimizer, batch, *a, **k):
        res = real(model, optimizer, batch, *a, **k)
        taken[0] += 1
        with open(f"{log}.{rank}", "a") as f:
            f.write(" ".join(str(c) for c in batch.conf_idx.tolist()) + "\\n")
        if rank == 0 and taken[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return res
    trainer.train_step = step
    sys.exit(trainer.main(sys.argv[1:]))
""")


def steps_of(log: Path) -> list[list[int]]:
    return [[int(c) for c in line.split()] for line in log.read_text().splitlines()]


def test_a_two_rank_run_killed_mid_epoch_resumes_on_one_process_training_each_conformer_once(tmp_path):
    script, run = tmp_path / "steps.py", tmp_path / "run"
    script.write_text(STEP_LOGGER)
    args = [a for a in CLI if not a.startswith(("max_steps", "curriculum"))] + [
        f"run_dir={run}", "checkpoint_every=2", "curriculum.0.epochs=2", "curriculum.1.epochs=0"]
    e = env()
    e.update(STEP_LOG=str(tmp_path / "killed"), KILL_AT="8")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--standalone", str(script), *args], env=e, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode != 0
    killed = [steps_of(tmp_path / f"killed.{r}") for r in (0, 1)]
    # 36 training conformers, 2 ranks × 4 molecules: 5 steps an epoch; last.pt is at epoch 2 step 2.
    epoch1 = sorted(c for r in (0, 1) for s in killed[r][:5] for c in s)
    assert len(epoch1) == len(set(epoch1)) == 36
    assert record(run / "last.pt")["training"]["state"]["global_step"] == 7

    e = env()
    e["STEP_LOG"] = str(tmp_path / "resumed")
    p = subprocess.run([sys.executable, str(script), *args, "resume=true"], env=e, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "on 1 process(es) (was 2)" in p.stdout
    epoch2 = [c for r in (0, 1) for s in killed[r][5:7] for c in s]     # the two saved steps
    epoch2 += [c for s in steps_of(tmp_path / "resumed.0") for c in s]  # the rest, on one process
    assert sorted(epoch2) == epoch1, "every conformer of the interrupted epoch trained once"


def test_a_real_full_disk_a_tiny_tmpfs(tmp_path, capsys):
    """The same on a file system that really fills up: a tmpfs (needs root) sized so that the
    first epoch's files fit and the second last.pt does not."""
    ref = tmp_path / "ref"
    assert T.main(CLI + [f"run_dir={ref}", "curriculum.0.epochs=1", "curriculum.1.epochs=0"]) == 0
    last, best = (ref / "last.pt").stat().st_size, (ref / "best.pt").stat().st_size
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    size_kb = (last + 2 * best + last // 2) // 1024 + 64
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        capsys.readouterr()
        run = mnt / "run"
        assert T.main(CLI + [f"run_dir={run}"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "No space left on device; the previous" in err[0], err
        assert record(run / "last.pt")["training"]["state"]["global_epoch"] >= 1
        assert not list(run.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
