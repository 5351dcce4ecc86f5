"""The ``aimnet-fast`` console script: ``aimnet-fast {predict,convert,train} ARGS...``.

Each subcommand takes exactly the arguments of its module form (``python -m aimnet_fast.predict``,
``python -m aimnet_fast.convert``, ``python -m aimnet_fast.train``); modules are imported only when
their subcommand runs, so ``predict`` does not pay for the trainer's imports.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from typing import Sequence

from .errors import AIMNetError, report

COMMANDS = {
    "predict": ("aimnet_fast.predict", "energies, forces, charges, moments, volumes of an XYZ"),
    "convert": ("aimnet_fast.convert", "convert released AIMNet weights into a checkpoint"),
    "train": ("aimnet_fast.train", "train a model (see `aimnet-fast train --help`)"),
    "evaluate": ("aimnet_fast.evaluate", "test report (MAE/RMSE per target, pass, source) of a checkpoint"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<8s} {doc}" for name, (_, doc) in COMMANDS.items())
    return (f"usage: aimnet-fast {{{','.join(COMMANDS)}}} ...\n\ncommands:\n{rows}\n\n"
            f"`aimnet-fast COMMAND --help` lists the arguments of a command.")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"aimnet-fast: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"aimnet-fast: error: command {name!r} is not available in this installation "
              f"({module_name} is missing)", file=sys.stderr)
        return 1
    prog = f"aimnet-fast {name}"
    try:
        # Each command names itself in its messages; a module's main may not take prog.
        if "prog" in inspect.signature(module.main).parameters:
            code = module.main(rest, prog=prog)
        else:
            code = module.main(rest)
    except AIMNetError as e:  # the commands report their own; this catches what one lets through
        return report(prog, e)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
