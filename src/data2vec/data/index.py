"""Compact indexes for large data: a few bytes per file, no Python object per file.

A run over millions of files (image folders, WebDataset tar shards, audio manifests) keeps
one index in every process and every loader worker. Lists of `Path`/`str`/dataclass objects
cost 100-300 bytes per file; here a file costs its UTF-8 name plus 8 bytes of offset (names
are packed into one byte buffer), and walking a folder or reading a manifest streams, so the
peak while indexing stays close to the final size (tests/test_streaming.py measures it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


class StringTable:
    """An immutable sequence of strings packed into one UTF-8 buffer."""

    def __init__(self, strings: Iterable[str] = ()) -> None:
        builder = StringTableBuilder()
        for s in strings:
            builder.add(s)
        self._data, self._ends = builder.arrays()

    @classmethod
    def _from(cls, data: np.ndarray, ends: np.ndarray) -> StringTable:
        table = cls.__new__(cls)
        table._data, table._ends = data, ends
        return table

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:
        n = len(self._ends)
        if not -n <= index < n:
            raise IndexError(index)
        index %= n
        start = int(self._ends[index - 1]) if index else 0
        return bytes(self._data[start : int(self._ends[index])]).decode("utf-8", errors="surrogateescape")

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes + self._ends.nbytes)


class StringTableBuilder:
    """Grows a byte buffer and an offset array by doubling (amortised O(1) per string)."""

    def __init__(self) -> None:
        self.data = np.empty(1 << 12, dtype=np.uint8)
        self.ends = np.empty(1 << 8, dtype=np.int64)
        self.size = 0
        self.count = 0

    def add(self, s: str) -> None:
        raw = s.encode("utf-8", errors="surrogateescape")
        need = self.size + len(raw)
        if need > len(self.data):
            self.data = _grow(self.data, need)
        self.data[self.size : need] = np.frombuffer(raw, dtype=np.uint8)
        self.size = need
        if self.count == len(self.ends):
            self.ends = _grow(self.ends, self.count + 1)
        self.ends[self.count] = need
        self.count += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.data[: self.size].copy(), self.ends[: self.count].copy()

    def finish(self) -> StringTable:
        return StringTable._from(*self.arrays())


def _grow(a: np.ndarray, need: int) -> np.ndarray:
    out = np.empty(max(need, len(a) + len(a) // 2), dtype=a.dtype)  # x1.5: a lower peak than doubling
    out[: len(a)] = a
    return out


def sorted_table(strings: Iterable[str], sep: str = "") -> StringTable:
    """A StringTable in sorted order, sorting a fixed-width byte array rather than Python
    strings. With `sep` (e.g. "/"), the order is that of the path components, as `sorted()`
    of `Path` objects gives."""
    table = StringTable(strings)
    n = len(table)
    if n < 2:
        return table
    lengths = np.diff(table._ends, prepend=0)
    keys = np.zeros(n, dtype=f"S{max(int(lengths.max()), 1)}")
    for i in range(n):
        raw = table._data[int(table._ends[i] - lengths[i]) : int(table._ends[i])].tobytes()
        keys[i] = raw.replace(sep.encode(), b"\x01") if sep else raw
    order = np.argsort(keys, kind="stable")
    del keys
    # Gather the names in order into buffers of the exact final size.
    starts = table._ends - lengths
    new_ends = np.cumsum(lengths[order])
    data = np.empty_like(table._data)
    pos = 0
    for i in order:
        a, b = int(starts[i]), int(table._ends[i])
        data[pos : pos + b - a] = table._data[a:b]
        pos += b - a
    return StringTable._from(data, new_ends)


def walk_files(root: str | Path, extensions: tuple[str, ...]) -> Iterator[str]:
    """Paths under `root` (recursively) whose lower-cased suffix is in `extensions`, as strings,
    streamed with os.scandir (no Path objects, no full listing held).

    Names starting with "." are left out, files and folders alike: hidden folders (`.git`,
    `.thumbs`, `.Trash`) and macOS's `._name` AppleDouble files, which carry a file's metadata,
    not its data. Symbolic links to folders are not followed (no loops). A symbolic link whose
    target cannot be learned (it loops, or points nowhere) is listed: reading it then reports
    it like any other bad file, under data.on_bad_input."""
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            entries = os.scandir(folder)
        except OSError:
            continue
        with entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif os.path.splitext(e.name)[1].lower() in extensions and _file_or_bad_link(e):
                    yield e.path


def _file_or_bad_link(entry: os.DirEntry[str]) -> bool:
    """A regular file (or a link to one), or a symbolic link that loops or points nowhere."""
    try:
        return entry.is_file() or (entry.is_symlink() and not entry.is_dir())
    except OSError:  # ELOOP: a link that loops
        return True
