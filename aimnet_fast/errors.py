"""The one error family of aimnet_fast.

Every error a user can cause (a bad file, key, value or molecule) is an ``AIMNetError``; its message
names the file, key or molecule at fault. Command lines catch the base class and print that message
as one line (exit 1; 2 for usage), so a traceback always means a bug of ours.

The kinds keep their older bases (``ValueError``, ``RuntimeError``) so that callers catching those
go on working.
"""
from __future__ import annotations


class AIMNetError(Exception):
    """Base of every error aimnet_fast raises for input it cannot use."""


class ConfigError(AIMNetError, ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


class InputError(AIMNetError, ValueError):
    """Input that the model must not see: it names the molecule (and file, line) at fault."""


class DataError(AIMNetError, ValueError):
    """Bad training data. The message starts with ``file:group:conformer`` (``-`` where not known).

    Attributes ``file``, ``group`` and ``conformer`` hold the same parts for programs.
    """

    def __init__(self, message: str, file: str = "-", group: str = "-", conformer: int | str = "-"):
        self.file, self.group, self.conformer = str(file), str(group), conformer
        super().__init__(f"{self.file}:{self.group}:{conformer}: {message}")


class CheckpointError(AIMNetError, ValueError):
    """A file that is not a checkpoint we can load (or released weights we cannot convert)."""


class PredictError(AIMNetError, ValueError):
    """A prediction request that cannot be served (models that disagree, a bad option)."""


class TrainingError(AIMNetError, RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the message says why and what to do."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line, for command lines."""
    return " ".join(str(err).split()) or type(err).__name__


def report(prog: str, err: BaseException, stream=None) -> int:
    """Print ``err`` as the one line a command line ends with; return its exit status (2 for a
    usage error such as a bad config key, 1 otherwise)."""
    import sys
    print(f"{prog}: error: {one_line(err)}", file=stream if stream is not None else sys.stderr)
    return 2 if isinstance(err, ConfigError) else 1
