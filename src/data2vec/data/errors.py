"""The error every data reader raises for an input it cannot use, and the file checks they share."""

from __future__ import annotations

import errno
import os
import re
import stat


class BadInputError(ValueError):
    """A data file cannot be used; the message starts with the file's path."""

    def __init__(self, path: str, reason: str = "") -> None:
        super().__init__(f"{path}: {reason}" if reason else path)
        self.path = path
        self.reason = reason


def file_problem(path: str | os.PathLike[str], *, empty_ok: bool = False) -> str | None:
    """Why `path` cannot be read as a data file, in words (it does not exist, is a symbolic link
    that loops or points nowhere, is a folder, is empty), or None when it looks readable. One
    stat; readers call it first so that these cases get a plain reason rather than a decoder's
    ('System error.', 'cannot identify image file')."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a symbolic link to {os.readlink(path)!r}, which does not exist"
        return "no such file (it does not exist)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link that loops (too many levels of symbolic links)"
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not a file"
    if st.st_size == 0 and not empty_ok:
        return "empty file (0 bytes)"
    return None


def check_file(path: str | os.PathLike[str], *, empty_ok: bool = False) -> None:
    """`file_problem` as a BadInputError naming `path`."""
    problem = file_problem(path, empty_ok=empty_ok)
    if problem is not None:
        raise BadInputError(str(path), problem)


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def stable_reason(error: BaseException) -> str:
    """An exception's text without object reprs such as `<_io.BytesIO object at 0x7f...>`, so
    that the same bad input gives the same message every time it is read (skipped inputs are
    counted by message)."""
    return _ADDRESS.sub("its data", str(error))
