"""Convert the released AIMNet weights (2019) into an aimnet_fast checkpoint.

Command line::

    python -m aimnet_fast.convert BACKBONE.pt HEADS.pt OUT.pt

BACKBONE is ``aimnet_cv{k}.pt``; HEADS is ``aimnet_mt_cv{k}.pt`` (energy, elmoments and volume
heads) or ``aimnet_smd_cv{k}.pt`` (implicit-solvent energy head only) of the same fold k.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .checkpoint import convert_released, save_model
from .constants import PERIODIC_TABLE
from .errors import AIMNetError, CheckpointError, report


def convert(backbone: str, heads: str, out: str) -> str:
    """Convert and save; return a one-line description of what was written."""
    for path in (backbone, heads):
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: no such file")
    try:
        model = convert_released(backbone, heads)
    except CheckpointError:
        raise
    except Exception as e:  # a file that is not a released state dict: say which
        raise CheckpointError(f"{backbone} + {heads}: cannot convert: "
                              f"{type(e).__name__}: {e}") from e
    save_model(model, out, converted_from={"backbone": str(backbone), "heads": str(heads)})
    elements = " ".join(PERIODIC_TABLE[z] for z in model.elements)
    return (f"wrote {out}: heads {', '.join(model.heads.keys())}; elements {elements}; "
            f"{model.n_pass} passes; from {backbone} + {heads}")


def build_parser(prog: str = "python -m aimnet_fast.convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Convert a released AIMNet backbone and "
                                "heads file into one aimnet_fast checkpoint.")
    p.add_argument("backbone", help="released backbone, aimnet_cv{k}.pt")
    p.add_argument("heads", help="released heads of the same fold: aimnet_mt_cv{k}.pt or "
                   "aimnet_smd_cv{k}.pt")
    p.add_argument("out", help="checkpoint to write")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m aimnet_fast.convert") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        print(convert(args.backbone, args.heads, args.out))
    except AIMNetError as e:
        return report(prog, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
