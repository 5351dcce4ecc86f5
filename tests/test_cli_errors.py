"""Every command line ends a user's mistake with one line naming the culprit and exit status 1,
never a traceback (train's own cases are in test_train_errors.py)."""
import subprocess
import sys

import pytest

from aimnet_fast.io import EXAMPLE_XYZ


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def not_a_checkpoint(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "notes.pt"
    p.write_text("these are notes, not weights\n")
    return p


@pytest.mark.parametrize("args, culprit", [
    (["-m", "aimnet_fast.predict", "{bad}", str(EXAMPLE_XYZ)], "{bad}: not a checkpoint"),
    (["-m", "aimnet_fast.predict", "/nonexistent/cv0.pt", str(EXAMPLE_XYZ)],
     "/nonexistent/cv0.pt: no such checkpoint file"),
    (["-m", "aimnet_fast.convert", "/nonexistent/a.pt", "/nonexistent/b.pt", "/tmp/out.pt"],
     "/nonexistent/a.pt: no such file"),
    (["-m", "aimnet_fast.convert", "{bad}", "{bad}", "/tmp/out.pt"], "{bad}"),
    (["-m", "aimnet_fast.cli", "predict", "{bad}", str(EXAMPLE_XYZ)], "{bad}: not a checkpoint"),
])
def test_one_line_exit_1(args, culprit, not_a_checkpoint):
    args = [a.replace("{bad}", str(not_a_checkpoint)) for a in args]
    culprit = culprit.replace("{bad}", str(not_a_checkpoint))
    r = run(*args)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert culprit in lines[0] and "error:" in lines[0]
