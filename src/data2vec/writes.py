"""Writing files so that a full disk (or any failed write) is one line naming the file.

Libraries report a full disk in their own words: Python raises `OSError(ENOSPC)`, safetensors a
`SafetensorError` whose text holds "No space left on device (os error 28)", `torch.save` a
`RuntimeError` from its zip writer whose context is the OSError of the file object it wrote to.
`writing(path, what)` turns each of them into `WriteFailed`, "PATH: no space left on device
(writing WHAT)", which the command prints as one line.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
NO_SPACE_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


class WriteFailed(OSError):
    """A file could not be written (the message names it and why)."""


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]


def no_space(e: BaseException) -> bool:
    """Whether `e`, or an error it was raised from or during, says the disk (or quota) is full."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in NO_SPACE_ERRNOS:
            return True
        if any(t in str(x).lower() for t in NO_SPACE_TEXTS):
            return True
    return False


def _reason(e: BaseException) -> str:
    if no_space(e):
        return "no space left on device"
    for x in _chain(e):
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _is_write_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or no_space(e)


@contextmanager
def writing(path: str | os.PathLike[str], what: str, after: str = "") -> Iterator[None]:
    """Run a write of `path`; an OSError, or any error caused by a full disk, becomes WriteFailed
    ("PATH: REASON (writing WHAT)" + `after`, e.g. what is still intact)."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as e:
        if not _is_write_error(e):
            raise
        tail = f"; {after}" if after else ""
        raise WriteFailed(f"{path}: {_reason(e)} (writing {what}){tail}") from e


def write_text_atomic(path: Path, text: str, what: str) -> None:
    """`path` holds `text` or its previous contents, never a part (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, what):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def append_line(path: Path, line: str, what: str) -> None:
    with writing(path, what), open(path, "a") as f:
        f.write(line + "\n")


def save_figure(fig: object, out: Path, what: str) -> None:
    """Save a matplotlib figure to `out` atomically (a temporary PNG, then a rename)."""
    tmp = out.with_suffix(".tmp.png")
    with writing(out, what):
        try:
            fig.savefig(tmp, dpi=100)  # type: ignore[attr-defined]
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
