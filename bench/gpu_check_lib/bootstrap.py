"""What must happen before aimnet_fast is imported: the interpreter switch, the package install,
and whether omegaconf is there. Shared by the check, its pytest plugin and its training child."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("AIMNET_FAST_SHARED", REPO.parent / "shared"))
PIP_CMD = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "-e", "."]


def kernels_importable() -> bool:
    # find_spec of a submodule imports the parent package only (aimnet_fast/__init__ is light).
    try:
        return importlib.util.find_spec("aimnet_fast.kernels") is not None
    except ImportError:
        return False


def map_kernels_without_install() -> None:
    """Make ``aimnet_fast.kernels`` the top-level ``kernels/`` folder, as pyproject's package-dir
    does on install; only used when the pip install itself failed."""
    if "aimnet_fast.kernels" in sys.modules:
        return
    import aimnet_fast
    spec = importlib.util.spec_from_file_location(
        "aimnet_fast.kernels", REPO / "kernels" / "__init__.py",
        submodule_search_locations=[str(REPO / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["aimnet_fast.kernels"] = mod
    spec.loader.exec_module(mod)
    aimnet_fast.kernels = mod


def ensure_installed(argv: list[str], notes: list[str]) -> None:
    """Without the package installed, ``import aimnet_fast.kernels`` fails (kernels/ is mapped into
    the package only by an install): install it offline and start again in a fresh interpreter."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if os.environ.get("GPU_CHECK_INSTALL_LOG"):
        notes.append(f"package was not installed; ran `{' '.join(PIP_CMD[2:])}` and re-executed "
                     f"(log {os.environ['GPU_CHECK_INSTALL_LOG']})")
    if kernels_importable():
        return
    if os.environ.get("GPU_CHECK_REEXEC") != "1":
        log = Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_pip_install.log"
        with open(log, "w") as f:
            rc = subprocess.run(PIP_CMD, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
        print(f"gpu_check: aimnet_fast.kernels not importable; `pip install -e .` (offline) exit {rc}, "
              f"log {log}; re-executing", flush=True)
        env = dict(os.environ, GPU_CHECK_REEXEC="1", GPU_CHECK_INSTALL_LOG=str(log))
        os.execve(sys.executable, [sys.executable, "-m", "bench.gpu_check", *argv], env)
    map_kernels_without_install()
    os.environ["GPU_CHECK_MAP_KERNELS"] = "1"   # children (pytest, training) do the same
    notes.append("the offline pip install did not make aimnet_fast.kernels importable; mapped "
                 "kernels/ into the package in-process instead (pip log: "
                 f"{os.environ.get('GPU_CHECK_INSTALL_LOG')})")


def check_omegaconf(notes: list[str] | None = None, simulate_absent: bool = False) -> bool:
    """Whether omegaconf is importable (the GPU image has none). The check builds its configs as
    plain dataclasses and never calls load_config, so it runs either way; ``simulate_absent``
    hides an installed omegaconf, for the test of that path."""
    if simulate_absent:
        for k in [k for k in sys.modules if k == "omegaconf" or k.startswith("omegaconf.")]:
            del sys.modules[k]
        sys.modules["omegaconf"] = None        # import omegaconf now raises ImportError
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        if notes is not None:
            notes.append("omegaconf is not installed: configs are built as dataclasses "
                         "(load_config, which reads YAML through omegaconf, is not used)")
        return False
    return True
