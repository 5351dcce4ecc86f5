"""pytest plugin of the GPU check (``-p bench.gpu_check_lib.pytest_devices``): records, per test,
the outcome and the devices of the tensors handed to every Triton kernel launch, one JSON line per
test in $GPU_CHECK_DEVICES_JSONL, so that a test which still feeds CPU tensors to a kernel while
CUDA is available is named even if the run is cut short (the JUnit XML is written only at the end).
"""
from __future__ import annotations

import json
import os

_current: dict = {}
_out = None


def _record_launch(args, kwargs):
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    devs = _current.setdefault("devices", {})
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            devs[v.device.type] = devs.get(v.device.type, 0) + 1


def _wrap(cls):
    orig = cls.run
    if getattr(orig, "_gpu_check", False):
        return

    def run(self, *args, **kwargs):
        _record_launch(args, kwargs)
        return orig(self, *args, **kwargs)
    run._gpu_check = True
    cls.run = run


def pytest_configure(config):
    global _out
    path = os.environ.get("GPU_CHECK_DEVICES_JSONL")
    if os.environ.get("GPU_CHECK_MAP_KERNELS") == "1":
        from bench.gpu_check_lib.bootstrap import map_kernels_without_install
        map_kernels_without_install()
    if path:
        _out = open(path, "w")


def pytest_sessionstart(session):
    # After tests/conftest.py has been imported: what it decided about the interpreter.
    import torch
    try:
        from triton.runtime.jit import JITFunction
        _wrap(JITFunction)
    except Exception:  # pragma: no cover - a triton without this class: no device record
        pass
    try:
        from triton.runtime.interpreter import InterpretedFunction
        _wrap(InterpretedFunction)
    except Exception:  # pragma: no cover
        pass
    if _out:
        _out.write(json.dumps({"session": {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
                                           "cuda_available": torch.cuda.is_available()}}) + "\n")
        _out.flush()


def pytest_runtest_setup(item):
    _current.clear()
    _current.update(nodeid=item.nodeid, outcome="passed", devices={})


def pytest_runtest_logreport(report):
    if _current.get("nodeid") != report.nodeid:   # setup skipped before our setup hook ran
        _current.clear()
        _current.update(nodeid=report.nodeid, outcome="passed", devices={})
    if report.failed:
        _current["outcome"] = "failed" if report.when == "call" else "error"
        lines = [ln for ln in str(report.longrepr).splitlines() if ln.startswith("E ")]
        _current["message"] = (lines[0][1:].strip() if lines else
                               str(report.longrepr).strip().splitlines()[-1])[:400]
    elif report.skipped and _current.get("outcome") == "passed":
        _current["outcome"] = "skipped"
    if report.when == "teardown" and _out:
        _current["nodeid"] = report.nodeid
        _out.write(json.dumps(_current) + "\n")
        _out.flush()


def pytest_unconfigure(config):
    if _out:
        _out.close()
