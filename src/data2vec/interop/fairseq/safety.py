"""Loading a fairseq checkpoint without running pickled code.

`safe_load` reads the file with `torch.load(weights_only=True)` and the allow-list `SAFE_GLOBALS`
of the plain types fairseq checkpoints hold (`argparse.Namespace`, numpy scalars and arrays). If
the pickle names another global it is refused with that name, except for configuration classes
that are not importable here (omegaconf's containers and nodes, fairseq's and the data2vec
examples' config enums and dataclasses): those are read by a restricted unpickler that turns
each into an inert record (never calling the real class), and `plain` turns the records into
plain dicts, lists and values.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import contextlib
import io
import pickle
import pickletools
import types
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data2vec.checkpoint import (
    NOT_A_TORCH_FILE,
    refusal_reason,
    refused_globals,
    torch_file_format,
    unreadable_torch_file,
)
from data2vec.interop.fairseq.common import FairseqImportError


def _numpy_globals() -> list[Any]:
    """numpy scalars and arrays as fairseq's metrics and args pickle them (numpy 1.x and 2.x names)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    core = getattr(np, "_core", None) or getattr(np, "core")  # noqa: B009 (numpy 2 / numpy 1)
    core = core.multiarray
    out: list[Any] = [np.ndarray, np.dtype]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(core, name)
        out += [fn, (fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n != "ObjectDType"]
    return out


SAFE_GLOBALS: list[Any] = [argparse.Namespace, collections.defaultdict, *_numpy_globals()]
"""What `torch.load(weights_only=True)` may build besides tensors and plain containers. A
`defaultdict` (omegaconf 2.0 pickles one in a DictConfig) only stores its default factory, itself
a global this allow-list must admit."""

_CONFIG_MODULES = ("omegaconf", "fairseq", "examples")
"""Globals from these packages are configuration classes: read as inert records, never called."""

_CONFIG_NAMES = frozenset(
    {
        "typing.Any",
        "typing.Union",
        "typing.Optional",
        "typing.List",
        "typing.Dict",
        "typing.Tuple",
        "builtins.int",
        "builtins.float",
        "builtins.str",
        "builtins.bool",
        "builtins.list",
        "builtins.dict",
        "builtins.tuple",
        "builtins.NoneType",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib.Path",
    }
)
"""Type objects omegaconf metadata refers to; also read as inert records."""


def _is_config_global(name: str) -> bool:
    if name in _CONFIG_NAMES:
        return True
    top = name.split(".", 1)[0]
    return top in _CONFIG_MODULES and "." in name


def _allowed_by_name() -> dict[str, Any]:
    """torch's own weights-only allow-list plus SAFE_GLOBALS, keyed 'module.name'."""
    import torch._weights_only_unpickler as wou

    allowed: dict[str, Any] = dict(wou._get_allowed_globals())
    for g in SAFE_GLOBALS:
        obj, name = g if isinstance(g, tuple) else (g, f"{g.__module__}.{g.__qualname__}")
        allowed[name] = obj
    return allowed


class _Opaque:
    """Stands in for a configuration class that is not importable here. It records what the
    pickle handed it (constructor arguments, state) and does nothing else."""

    _fqname = ""
    _args: tuple[Any, ...]
    _state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        obj = object.__new__(cls)
        obj._args = args
        obj._state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def __reduce__(self) -> Any:  # pragma: no cover - never re-pickled
        raise TypeError(f"{self._fqname} placeholder cannot be pickled")


def _placeholder(fqname: str) -> type[_Opaque]:
    cls: type[_Opaque] = types.new_class(
        fqname.rsplit(".", 1)[-1], (_Opaque,), {}, lambda ns: ns.update(_fqname=fqname)
    )
    return cls


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """`copyreg._reconstructor`, restricted to placeholders (how dataclass-like objects pickle)."""
    if isinstance(cls, type) and issubclass(cls, _Opaque):
        return cls.__new__(cls)
    raise pickle.UnpicklingError(f"refused to reconstruct {cls!r}")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose `find_class` hands out only tensors' rebuild functions and the plain
    types of the weights-only allow-list; configuration classes become inert placeholders;
    anything else is refused with its name."""

    _placeholders: dict[str, type[_Opaque]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (`__builtin__.dict` in a protocol-2 pickle) as pickle's own find_class maps
        # them; no Python 3 module has such a name.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        fq = f"{module}.{name}"
        allowed = _allowed_by_name()
        if fq in allowed:
            return allowed[fq]
        if fq == "copyreg._reconstructor":
            return _reconstructor
        if fq == "builtins.object":
            return object
        if _is_config_global(fq):
            if fq not in self._placeholders:
                self._placeholders[fq] = _placeholder(fq)
            return self._placeholders[fq]
        raise pickle.UnpicklingError(f"refused global {fq}")


def _restricted_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("data2vec_restricted_pickle")

    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(io.BytesIO(data), **kwargs).load()

    mod.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = load  # type: ignore[attr-defined]
    mod.loads = loads  # type: ignore[attr-defined]
    mod.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return mod


def _unsafe_globals(path: Path) -> list[str]:
    """The pickle globals outside the allow-list, read statically (nothing is unpickled)."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) format: scan the raw pickle stream instead
        return sorted(g for g in _scan_globals(path) if g not in _allowed_by_name())


def _scan_globals(path: Path) -> set[str]:
    found: set[str] = set()
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        try:
            strings: list[str] = []
            for op, arg, p in pickletools.genops(io.BytesIO(data[pos:])):
                if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    found.add(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
                if op.name == "STOP":
                    pos += (p or 0) + 1
                    break
            else:
                break
        except Exception:
            break
    return found


def safe_load(path: Path) -> Any:
    """Load a torch checkpoint without running pickled code (see the module docstring). A refused
    pickle, a file that is not torch's and a torn one each raise FairseqImportError, one line naming
    the file and what was found (never torch's advice on loading the file unsafely)."""
    fmt = torch_file_format(path)
    mmap = fmt == "zip"
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), _quiet():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if fmt is None and not refused_globals(e):
            raise FairseqImportError(f"{path}: {NOT_A_TORCH_FILE}") from None
        unsafe = _unsafe_globals(path)
        refused = [g for g in unsafe if not _is_config_global(g)]
        if refused or not unsafe:
            what = f"it pickles {', '.join(refused)}" if refused else refusal_reason(e)
            raise FairseqImportError(
                f"{path}: refused to load: {what}, outside the allow-list of plain checkpoint types "
                "(tensors, containers, argparse.Namespace, numpy values, configuration classes); "
                "nothing from it was executed"
            ) from None
    except Exception as e:  # torn, corrupt or not torch's: RuntimeError, EOFError, IndexError, KeyError, ...
        raise FairseqImportError(f"{path}: {NOT_A_TORCH_FILE if fmt is None else unreadable_torch_file(e)}") from None
    try:
        with _quiet():
            return torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module(), mmap=mmap
            )
    except pickle.UnpicklingError as e:
        raise FairseqImportError(f"{path}: refused to load: {e}; nothing from it was executed") from None
    except Exception as e:
        raise FairseqImportError(f"{path}: {unreadable_torch_file(e)}") from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch's warning that a pickle protocol above 2 may hold instructions its weights-only reader
    lacks, silenced: a refusal says what it was."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        yield


def plain(obj: Any, depth: int = 0) -> Any:
    """Configuration objects as plain dicts, lists and values: Namespace -> dict, placeholders of
    omegaconf containers -> their content, enum placeholders -> their value."""
    if depth > 60:
        return None
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, argparse.Namespace):
        return {k: plain(v, depth + 1) for k, v in vars(obj).items()}
    if isinstance(obj, Mapping):
        return {k: plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v, depth + 1) for v in obj)
    if isinstance(obj, _Opaque):
        state = obj._state
        if isinstance(state, Mapping):
            if "_content" in state:  # omegaconf DictConfig / ListConfig
                return plain(state["_content"], depth + 1)
            if "_val" in state:  # omegaconf value node
                return plain(state["_val"], depth + 1)
            return {k: plain(v, depth + 1) for k, v in state.items() if not str(k).startswith("_")}
        if obj._args:  # an enum member (cls(value)) or a path
            return plain(obj._args[0], depth + 1) if len(obj._args) == 1 else plain(list(obj._args), depth + 1)
        return obj._fqname
    return obj
