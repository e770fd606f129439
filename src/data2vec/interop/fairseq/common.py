"""What every part of the fairseq importer shares: the error it raises, reading values out of a
checkpoint's (already plain) configuration, and `Source`, the checkpoint's model tensors that the
converters consume one by one so that whatever no converter took can be refused by name
(`check_rest`). `Converted` is what a converter returns; `build_config` turns a config error into
an import error naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor

from data2vec.config import ConfigError, RunConfig

WB = ("weight", "bias")


class FairseqImportError(ValueError):
    """A fairseq checkpoint cannot be imported; the message names the file and the reason."""


def get(meta: Any, *path: str, default: Any = None) -> Any:
    """`meta[path[0]][path[1]]...`, or `default` where a level is missing or None."""
    node = meta
    for part in path:
        if not isinstance(node, Mapping) or part not in node or node[part] is None:
            return default
        node = node[part]
    return node


def first(meta: Any, paths: Iterable[tuple[str, ...]], default: Any = None) -> Any:
    """The first of `paths` that `get` finds (fairseq moved fields between config versions)."""
    for p in paths:
        v = get(meta, *p)
        if v is not None:
            return v
    return default


def num(value: Any, default: float) -> float:
    """`value` as a float if it is a number (not a bool), else `default`."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


class Source:
    """The checkpoint's model tensors; `take` consumes one, `rest` lists what was not used."""

    def __init__(self, sd: Mapping[str, Tensor], where: str) -> None:
        self.sd = dict(sd)
        self.used: set[str] = set()
        self.where = where

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str) -> Tensor:
        if key not in self.sd:
            raise FairseqImportError(f"{self.where}: missing tensor {key!r}")
        self.used.add(key)
        return self.sd[key]

    def take_into(self, out: dict[str, Tensor], names: Iterable[tuple[str, str]], src: str = "", dst: str = "") -> None:
        """For each (ours, theirs) pair, in order: `out[dst+ours+".weight"/".bias"]` = the
        checkpoint's `src+theirs+".weight"/".bias"`."""
        for ours, theirs in names:
            for p in WB:
                out[f"{dst}{ours}.{p}"] = self.take(f"{src}{theirs}.{p}")

    def count(self, pattern: str) -> int:
        """How many consecutive indices i have a key matching pattern.format(i)."""
        n = 0
        while any(k.startswith(pattern.format(n)) for k in self.sd):
            n += 1
        return n

    def rest(self) -> list[str]:
        return sorted(k for k in self.sd if k not in self.used)


def check_rest(src: Source, ignorable: Iterable[str]) -> list[str]:
    """Refuse tensors that were neither mapped nor known to be irrelevant; return the ignored ones."""
    patterns = [re.compile(p) for p in ignorable]
    ignored: list[str] = []
    unknown: list[str] = []
    for k in src.rest():
        (ignored if any(p.search(k) for p in patterns) else unknown).append(k)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise FairseqImportError(
            f"{src.where}: tensors this library has no place for: {shown} "
            "(an unsupported architecture variant; importing without them would change the features)"
        )
    return ignored


def num_heads(meta: Any, keys: Iterable[tuple[str, ...]], dim: int) -> int:
    """Attention heads from the config, else 64-wide heads (as in every released data2vec model)."""
    heads = first(meta, keys)
    if heads is None:
        heads = max(1, dim // 64)
    return int(heads)


class Converted:
    """A converted checkpoint: config, student weights in our names, the kind, the ignored keys."""

    def __init__(self, cfg: RunConfig, student: dict[str, Tensor], kind: str, ignored: list[str]) -> None:
        self.cfg, self.student, self.kind, self.ignored = cfg, student, kind, ignored


def build_config(where: str, make: Callable[[], RunConfig]) -> RunConfig:
    """`make()`, with a ConfigError reported as an import error of the file `where`."""
    try:
        return make()
    except ConfigError as e:
        raise FairseqImportError(f"{where}: the checkpoint's settings do not make a valid config: {e}") from None
