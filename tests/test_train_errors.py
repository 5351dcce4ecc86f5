"""``python -m aimnet_fast.train`` ends a user's mistake with one line on stderr naming the culprit
(exit 2 for a config or usage error, 1 otherwise), never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m aimnet_fast.train"


def train(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "aimnet_fast.train", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, culprit, codes", [
    (["model.init_from=/nonexistent.pt"], "/nonexistent.pt", (1, 2)),
    (["model.init_from={notes}"], "{notes}", (1, 2)),             # a file, but not a checkpoint
    (["{dir}/missing.yaml"], "missing.yaml", (2,)),
    (["nosuchkey=1"], "nosuchkey", (2,)),
    (["optim.lr=abc"], "optim.lr", (2,)),
    (["optim.lr=-1"], "optim.lr: -1.0 must be > 0", (2,)),
    (["{bad_yaml}"], "line 2, column", (2,)),
    (["data.sources=[{path: {dir}/absent.h5}]"], "absent.h5", (1,)),
])
def test_one_line_no_traceback(tmp_path, args, culprit, codes):
    notes = tmp_path / "notes.pt"
    notes.write_text("these are notes, not weights\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim:\n  lr: [1e-3\n")
    fill = {"{notes}": str(notes), "{dir}": str(tmp_path), "{bad_yaml}": str(bad_yaml)}
    for k, v in fill.items():
        args = [a.replace(k, v) for a in args]
        culprit = culprit.replace(k, v)
    p = train(tmp_path, *args, "device=cpu", "num_threads=1", f"run_dir={tmp_path / 'run'}")
    lines = p.stderr.strip().splitlines()
    assert p.returncode in codes, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"{PROG}: error: ") and culprit in lines[0], lines
