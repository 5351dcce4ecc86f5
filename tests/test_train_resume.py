"""A run killed with SIGKILL mid-epoch and resumed ends with the same parameters as a run never
interrupted; a crash while a checkpoint is written leaves the previous one usable."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from aimnet_fast.train import config as C
from aimnet_fast.checkpoint import load_model, save_model
from aimnet_fast.model import AIMNet
from aimnet_fast.train.dist import process_settings
from aimnet_fast.train.trainer import run

REPO = Path(__file__).resolve().parents[1]

# Small and deterministic: one thread, 6 steps of 4 molecules per epoch, T=1 twice, then T=3.
ARGS = ["data.max_conformers=60", "data.mols_per_batch=4", "max_steps_per_epoch=6",
        "curriculum.0.epochs=2", "curriculum.1.epochs=1", "checkpoint_every=2", "num_threads=1",
        "log_every=1", "plot=false", "tensorboard=false", "device=cpu"]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


@pytest.fixture
def as_main():
    """The process-wide settings ``main`` applies (one thread, denormals flushed), so that the runs
    in this process compute what the command line's child process computes, bit for bit."""
    threads = torch.get_num_threads()
    process_settings(1, True, torch.device("cpu"))
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, capsys, as_main):
    # Uninterrupted, in this process.
    ref_dir = tmp_path / "ref"
    run(C.load_config(None, ARGS + [f"run_dir={ref_dir}"]))
    ref = torch.load(ref_dir / "last.pt", weights_only=False)

    # The same run in a child process, killed (SIGKILL) in the middle of epoch 2.
    run_dir = tmp_path / "killed"
    base = str(REPO / "aimnet_fast" / "configs" / "base.yaml")   # the bare command runs default.yaml
    proc = subprocess.Popen([sys.executable, "-m", "aimnet_fast.train", base, *ARGS, f"run_dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                            cwd=tmp_path)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "epoch 2/2 step 4/6" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    killed = torch.load(run_dir / "last.pt", weights_only=False)["training"]["state"]
    assert (killed["phase"], killed["epoch"]) == (0, 1) and 0 < killed["step"] < 6, killed
    # The sampler's own state is saved (and restored): epoch 2 of the run, as far as the steps.
    assert (killed["sampler"]["epoch"], killed["sampler"]["position"]) == (1, killed["step"])

    # Resume in this process from the child's last checkpoint.
    cfg = C.load_config(run_dir / "config.yaml", ["resume=true"])
    run(cfg)
    out = capsys.readouterr().out
    assert f"resumed {run_dir / 'last.pt'}: phase 1, epoch 2, step {killed['step']}" in out
    got = torch.load(run_dir / "last.pt", weights_only=False)
    assert got["training"]["state"]["global_step"] == ref["training"]["state"]["global_step"] == 18
    for k, v in ref["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), k
    # Optimizer moments and lr too, and the same validation history.
    assert got["training"]["schedule"] == ref["training"]["schedule"]
    for a, b in zip(got["training"]["optimizer"]["state"].values(),
                    ref["training"]["optimizer"]["state"].values()):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert (run_dir / "metrics.csv").read_text().splitlines()[1:] != []
    def rows(p):
        return [r.split(",")[1:] for r in (p / "metrics.csv").read_text().splitlines()]
    assert rows(run_dir) == rows(ref_dir)  # all but the wall-clock column


CRASH = textwrap.dedent("""
    import os, signal, sys, torch
    from aimnet_fast import checkpoint
    from aimnet_fast.model import AIMNet
    def dying_fsync(fd):                              # the bytes are in the temporary file ...
        os.kill(os.getpid(), signal.SIGKILL)          # ... then the process dies before the rename
    torch.manual_seed(1)
    os.fsync = dying_fsync
    checkpoint.save_model(AIMNet(), sys.argv[1])
""")


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    torch.manual_seed(0)
    good = AIMNet()
    save_model(good, path)
    before = path.read_bytes()
    p = subprocess.run([sys.executable, "-c", CRASH, str(path)], env=env(), capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert path.read_bytes() == before
    loaded = load_model(path)
    for k, v in good.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    leftovers = list(tmp_path.glob(".last.pt.*.tmp"))
    assert leftovers, "the dying writer should have left its temporary file"
