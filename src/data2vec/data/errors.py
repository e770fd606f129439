"""The error every data reader raises for an input it cannot use."""

from __future__ import annotations


class BadInputError(ValueError):
    """A data file cannot be used; the message starts with the file's path."""

    def __init__(self, path: str, reason: str = "") -> None:
        super().__init__(f"{path}: {reason}" if reason else path)
        self.path = path
        self.reason = reason
