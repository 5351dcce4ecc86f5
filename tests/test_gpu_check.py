"""The GPU check (bench/gpu_check.py) in its dry run: every section runs on the CPU under the
Triton interpreter and reports a status; a failing sub-check and a failing section are reported
as failed while the sections after them still run. This is the whole dry run (about a minute on
2 cores), so CI needs no separate run of it. It runs with omegaconf hidden, as on the GPU image."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_reports_every_section_and_survives_failures(tmp_path):
    out = tmp_path / "gpu_check"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out),
           "--inject-failure", "1.copy_ceiling", "--inject-failure", "5", "--simulate-no-omegaconf"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
    tail = (r.stdout + r.stderr)[-4000:]
    # Injected RuntimeErrors count as the check's own errors: the dry run must say it broke.
    assert r.returncode == 1, tail
    assert "GPU CHECK SUMMARY" in r.stdout, tail
    data = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert data["dry_run"] is True and "DRY RUN" in md and "no figure below is a GPU figure" in md
    secs = data["sections"]
    assert sorted(secs) == ["1", "2", "3", "4", "5", "6"]
    for num, s in secs.items():
        assert s["status"] in ("pass", "fail", "skipped"), (num, s["status"])
        for c in s["checks"]:
            assert c["status"] in ("pass", "fail", "info", "skipped"), (num, c)
        assert f"## {num}. {s['name']}" in md

    injected = {c["name"]: c for c in secs["1"]["checks"]}["copy_ceiling"]
    assert injected["status"] == "fail" and "injected failure" in injected["error"]
    assert secs["1"]["status"] == "fail"
    assert secs["5"]["status"] == "fail" and "injected failure" in secs["5"]["error"]
    # Sub-checks after the failed one, and sections after the failed section, still ran.
    assert {c["name"]: c for c in secs["1"]["checks"]}["matmul_ceilings"]["status"] == "pass"
    train = {c["name"]: c for c in secs["6"]["checks"]}["train_06r"]
    assert train["status"] == "pass", train
    assert train["figures"]["omegaconf"] is False
    assert train["figures"]["epochs_done"] >= 1 and "validation curve" in md

    # Apart from what was injected, the check's own code did not break anywhere.
    broken = [(n, c["name"], c.get("error")) for n, s in secs.items() for c in s["checks"]
              if c.get("kind") == "error" and "injected failure" not in (c.get("error") or "")]
    assert not broken, broken
    assert [n for n, s in secs.items() if s["error"]] == ["5"]
    assert any("omegaconf" in n for n in data["notes"])
    kt = {c["name"]: c for c in secs["2"]["checks"]}["kernel_tests"]
    assert kt["figures"]["passed"] >= 1 and kt["figures"]["TRITON_INTERPRET_in_tests"] == "1"
    det = {c["name"]: c for c in secs["3"]["checks"]}
    assert det["triton_energy_charges_volumes"]["status"] == "pass", det
