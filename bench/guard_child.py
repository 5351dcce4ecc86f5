"""Run pytest with every project module imported from one source tree: ``python guard_child.py ROOT
PYTEST_ARGS...``. The throughput guard (bench/guard_ab.py) starts its benchmark processes through
this file, once with ROOT = the working tree and once with ROOT = a worktree of the base commit.

Why it is needed: ``pip install -e .`` maps ``aimnet_fast`` and ``aimnet_fast.kernels`` to the
working tree with a finder at the end of ``sys.meta_path``. Putting a worktree on ``PYTHONPATH``
wins for ``aimnet_fast`` itself, but ``aimnet_fast.kernels`` lives in ``kernels/`` (pyproject's
package-dir), which no path entry of the worktree names, so the editable finder would quietly
answer it from the working tree: the base would run our kernels. Here a finder placed first maps
every package of ROOT's own ``[tool.setuptools.package-dir]`` to ROOT, and ROOT goes first on
``sys.path`` (for ``bench``). The guard checks the outcome: each process records the file of
every project module it imported, and a file outside its ROOT fails the comparison.

Imports nothing of the project: it must behave the same for any base commit.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path


def package_dirs(root: Path) -> dict[str, Path]:
    """Package name → directory, from ROOT's pyproject.toml (``aimnet_fast`` → ROOT/aimnet_fast
    when the file cannot be read)."""
    dirs = {"aimnet_fast": "aimnet_fast"}
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            tomllib = None
    if tomllib is not None and (root / "pyproject.toml").exists():
        with open(root / "pyproject.toml", "rb") as f:
            cfg = tomllib.load(f)
        dirs.update(cfg.get("tool", {}).get("setuptools", {}).get("package-dir", {}))
    return {name: root / d for name, d in dirs.items() if name}


class TreeFinder(importlib.abc.MetaPathFinder):
    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dirs

    def find_spec(self, name, path=None, target=None):
        d = self.dirs.get(name)
        if d is None or not (d / "__init__.py").exists():
            return None
        return importlib.util.spec_from_file_location(
            name, d / "__init__.py", submodule_search_locations=[str(d)])


def main() -> int:
    root = Path(sys.argv[1]).resolve()
    # sys.path[0] is this file's folder, the working tree's bench/: the base's own bench/ must
    # answer `import guard` there.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    sys.meta_path.insert(0, TreeFinder(package_dirs(root)))
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    os.chdir(root)
    import pytest
    return int(pytest.main(sys.argv[2:]))


if __name__ == "__main__":
    sys.exit(main())
