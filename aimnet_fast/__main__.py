"""``python -m aimnet_fast COMMAND ...`` is the same as ``aimnet-fast COMMAND ...``."""
import sys

from .cli import main

sys.exit(main())
