"""The one error type of the data layer."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message starts with ``file:group:conformer`` (``-`` where not known).

    Attributes ``file``, ``group`` and ``conformer`` hold the same parts for programs.
    """

    def __init__(self, message: str, file: str = "-", group: str = "-", conformer: int | str = "-"):
        self.file, self.group, self.conformer = str(file), str(group), conformer
        super().__init__(f"{self.file}:{self.group}:{conformer}: {message}")
