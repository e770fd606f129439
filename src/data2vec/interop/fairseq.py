"""Import fairseq data2vec checkpoints into this library's model.

Supported checkpoint kinds (what `torch.save` wrote from the official code):

- fairseq `data2vec_audio` (data2vec 1.0 speech), also as the backbone of a fine-tuned
  `wav2vec_ctc` checkpoint (keys under `w2v_encoder.w2v_model.`);
- fairseq `data2vec_text` (data2vec 1.0 text, RoBERTa layout);
- fairseq `data2vec_multi` (data2vec 2.0) for images, speech or text;
- `data2vec_vision` (data2vec 1.0 images, the BEiT code base: `{"model": ..., "args": ...}`).

`load_fairseq(path)` returns a `RunConfig` (architecture read from the checkpoint's
`cfg`/`args` where present, else from tensor shapes; objective and optimiser numbers from
the checkpoint where it has them, else from the nearest official preset) and a state dict
in this library's key names. The teacher entries are copies of the student's (the teacher
starts as the student); the pretraining head/decoder is included when the checkpoint has
one (`final_proj`, `regression_head`, `lm_head`, a 2.0 decoder), else it is left out and
stays freshly initialised. Any checkpoint tensor that is neither mapped nor known to be
irrelevant (EMA copies, index buffers, fine-tuning heads) stops the import: a silently
ignored weight would give silently different features.

Loading never runs pickled code. The file is read with
`torch.load(weights_only=True)` and an explicit allow-list of the plain types fairseq
checkpoints hold (`argparse.Namespace`, numpy scalars and arrays). If the pickle names
another global, it is refused with that name, except for configuration classes that are
not importable here (omegaconf's `DictConfig`/`ListConfig` and their nodes, fairseq's and
the data2vec examples' config enums and dataclasses): those are read by a restricted
unpickler that turns each of them into an inert record (never calling the real class) and
then into plain dicts, lists and values.
"""

from __future__ import annotations

import argparse
import ast
import io
import math
import pickle
import pickletools
import re
import types
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from data2vec.config import (
    AudioConfig,
    ConfigError,
    DecoderConfig,
    ImageConfig,
    RunConfig,
    TextConfig,
)
from data2vec.nn.pos import sincos_2d
from data2vec.presets import preset

__all__ = ["FairseqImportError", "is_fairseq_checkpoint", "load_fairseq"]


class FairseqImportError(ValueError):
    """A fairseq checkpoint cannot be imported; the message names the file and the reason."""


# =========================================================================== safe loading


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


SAFE_GLOBALS: list[Any] = [argparse.Namespace, *_numpy_globals()]
"""What `torch.load(weights_only=True)` may build besides tensors and plain containers."""

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


def _safe_load(path: Path) -> Any:
    """Load a torch checkpoint without running pickled code (see the module docstring)."""
    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        unsafe = _unsafe_globals(path)
        refused = [g for g in unsafe if not _is_config_global(g)]
        if refused or not unsafe:
            what = f"it pickles {', '.join(refused)}" if refused else first_line
            raise FairseqImportError(
                f"{path}: refused to load: {what}, outside the allow-list of plain checkpoint types "
                "(tensors, containers, argparse.Namespace, numpy values, configuration classes); "
                "nothing from it was executed"
            ) from None
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module(), mmap=mmap
        )
    except pickle.UnpicklingError as e:
        raise FairseqImportError(f"{path}: refused to load: {e}; nothing from it was executed") from None


def _plain(obj: Any, depth: int = 0) -> Any:
    """Configuration objects as plain dicts, lists and values: Namespace -> dict, placeholders of
    omegaconf containers -> their content, enum placeholders -> their value."""
    if depth > 60:
        return None
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, argparse.Namespace):
        return {k: _plain(v, depth + 1) for k, v in vars(obj).items()}
    if isinstance(obj, Mapping):
        return {k: _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, depth + 1) for v in obj)
    if isinstance(obj, _Opaque):
        state = obj._state
        if isinstance(state, Mapping):
            if "_content" in state:  # omegaconf DictConfig / ListConfig
                return _plain(state["_content"], depth + 1)
            if "_val" in state:  # omegaconf value node
                return _plain(state["_val"], depth + 1)
            return {k: _plain(v, depth + 1) for k, v in state.items() if not str(k).startswith("_")}
        if obj._args:  # an enum member (cls(value)) or a path
            return _plain(obj._args[0], depth + 1) if len(obj._args) == 1 else _plain(list(obj._args), depth + 1)
        return obj._fqname
    return obj


# =========================================================================== detection

_SIGNATURES: tuple[Callable[[set[str]], bool], ...] = (
    lambda s: any(k.startswith("modality_encoders.") for k in s),
    lambda s: any(k.startswith(("encoder.sentence_encoder.", "decoder.sentence_encoder.")) for k in s),
    lambda s: any(k.endswith("post_extract_proj.weight") for k in s) and any(".pos_conv." in k for k in s),
    lambda s: "patch_embed.proj.weight" in s and any(k.startswith("blocks.0.attn.") for k in s),
)


def _pickle_strings(path: Path) -> set[str] | None:
    """The strings in a torch zip checkpoint's pickle (its dict keys among them), read without
    unpickling; None if the file is not a torch zip checkpoint."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                return None
            data = zf.read(names[0])
    except (OSError, zipfile.BadZipFile):
        return None
    out: set[str] = set()
    try:
        for _, arg, _ in pickletools.genops(io.BytesIO(data)):
            if isinstance(arg, str):
                out.add(arg)
    except Exception:
        return None
    return out


def is_fairseq_checkpoint(path: Path) -> bool:
    """True if `path` is a torch checkpoint laid out like a fairseq / data2vec_vision data2vec
    model. Reads only the pickle's strings; nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        return False
    strings = _pickle_strings(path)
    if strings is None:
        return False
    keys = {s.removeprefix("w2v_encoder.w2v_model.").removeprefix("module.") for s in strings}
    return "model" in strings and any(sig(keys) for sig in _SIGNATURES)


# =========================================================================== helpers


def _get(meta: Any, *path: str, default: Any = None) -> Any:
    node = meta
    for part in path:
        if not isinstance(node, Mapping) or part not in node or node[part] is None:
            return default
        node = node[part]
    return node


def _first(meta: Any, paths: Iterable[tuple[str, ...]], default: Any = None) -> Any:
    for p in paths:
        v = _get(meta, *p)
        if v is not None:
            return v
    return default


def parse_layer_spec(spec: str) -> list[tuple[int, int, int]]:
    """A fairseq conv spec such as "[(512, 10, 5)] + [(512, 3, 2)] * 4": list/tuple literals of
    integers combined with + and *; parsed as a syntax tree, never evaluated."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"unsupported element {ast.dump(node)[:60]}")

    try:
        value = ev(ast.parse(spec, mode="eval").body)
        layers = [tuple(int(v) for v in t) for t in value]
    except (SyntaxError, ValueError, TypeError) as e:
        raise FairseqImportError(f"conv layer spec {spec!r}: not a list of (dim, kernel, stride) ({e})") from None
    if not layers or any(len(t) != 3 for t in layers):
        raise FairseqImportError(f"conv layer spec {spec!r}: not a list of (dim, kernel, stride)")
    return [(t[0], t[1], t[2]) for t in layers]


_WAV2VEC_CNN = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


class _Source:
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

    def count(self, pattern: str) -> int:
        """How many consecutive indices i have a key matching pattern.format(i)."""
        n = 0
        while any(k.startswith(pattern.format(n)) for k in self.sd):
            n += 1
        return n

    def rest(self) -> list[str]:
        return sorted(k for k in self.sd if k not in self.used)


def _check_rest(src: _Source, ignorable: Iterable[str]) -> list[str]:
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


def _heads(meta: Any, keys: Iterable[tuple[str, ...]], dim: int) -> int:
    heads = _first(meta, keys)
    if heads is None:
        heads = max(1, dim // 64)  # every released data2vec model uses 64-wide heads
    return int(heads)


def _v1_layer(src: _Source, s: str, d: str, out: dict[str, Tensor]) -> None:
    """A fairseq post-LN Transformer layer (separate q/k/v projections) -> our Block."""
    a = f"{s}self_attn."
    out[f"{d}attn.qkv.weight"] = torch.cat([src.take(f"{a}{p}_proj.weight") for p in "qkv"])
    out[f"{d}attn.qkv.bias"] = torch.cat([src.take(f"{a}{p}_proj.bias") for p in "qkv"])
    for ours, theirs in (
        ("attn.proj", "self_attn.out_proj"),
        ("norm1", "self_attn_layer_norm"),
        ("mlp.fc1", "fc1"),
        ("mlp.fc2", "fc2"),
        ("norm2", "final_layer_norm"),
    ):
        for p in ("weight", "bias"):
            out[f"{d}{ours}.{p}"] = src.take(f"{s}{theirs}.{p}")


def _alt_block(src: _Source, s: str, d: str, out: dict[str, Tensor]) -> None:
    """A data2vec 2.0 AltBlock: the same module names as ours."""
    for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
        for p in ("weight", "bias"):
            if src.has(f"{s}{name}.{p}"):
                out[f"{d}{name}.{p}"] = src.take(f"{s}{name}.{p}")


def _cnn(src: _Source, s: str, out: dict[str, Tensor], where: str) -> tuple[list[tuple[int, int]], bool]:
    """wav2vec 2.0 CNN in layer-norm mode -> ours; returns (channels, kernel) per layer and conv_bias."""
    n = src.count(s + "conv_layers.{}.")
    if n == 0:
        raise FairseqImportError(f"{where}: no feature-extractor conv layers under {s}conv_layers")
    if not src.has(f"{s}conv_layers.0.2.1.weight"):
        raise FairseqImportError(
            f"{where}: the feature extractor is not in layer-norm mode (extractor_mode='default', a single "
            "GroupNorm); this library implements the layer-norm CNN that data2vec uses"
        )
    shapes = []
    bias = src.has(f"{s}conv_layers.0.0.bias")
    for i in range(n):
        w = src.take(f"{s}conv_layers.{i}.0.weight")
        out[f"frontend.local.cnn.layers.{i}.0.weight"] = w
        if bias:
            out[f"frontend.local.cnn.layers.{i}.0.bias"] = src.take(f"{s}conv_layers.{i}.0.bias")
        for p in ("weight", "bias"):
            out[f"frontend.local.cnn.layers.{i}.1.norm.{p}"] = src.take(f"{s}conv_layers.{i}.2.1.{p}")
        shapes.append((int(w.shape[0]), int(w.shape[-1])))
    return shapes, bias


def _conv_layers(spec: Any, shapes: list[tuple[int, int]], where: str) -> tuple[tuple[int, int, int], ...]:
    """(channels, kernel, stride) per CNN layer: strides from the checkpoint's spec when it has one,
    else the standard wav2vec 2.0 strides (their kernels must then match)."""
    if isinstance(spec, str):
        layers = parse_layer_spec(spec)
        if [(c, k) for c, k, _ in layers] != shapes:
            raise FairseqImportError(f"{where}: conv spec {spec!r} does not match the weights {shapes}")
        return tuple(layers)
    if [k for _, k in shapes] == [k for _, k, _ in _WAV2VEC_CNN]:
        return tuple((c, k, s) for (c, k), (_, _, s) in zip(shapes, _WAV2VEC_CNN, strict=True))
    raise FairseqImportError(
        f"{where}: the checkpoint has no conv_feature_layers / feature_encoder_spec and its kernels "
        f"{[k for _, k in shapes]} are not wav2vec 2.0's; the strides cannot be known"
    )


def _pos_convs(src: _Source, s: str, index_offset: int, out: dict[str, Tensor], dim: int) -> tuple[int, int, int]:
    """Convolutional positions: (depth, kernel, groups)."""
    depth = 0
    while src.has(f"{s}{depth + index_offset}.0.weight"):
        j = depth + index_offset
        w = src.take(f"{s}{j}.0.weight")
        out[f"frontend.context.positional.convs.{depth}.weight"] = w
        out[f"frontend.context.positional.convs.{depth}.bias"] = src.take(f"{s}{j}.0.bias")
        depth += 1
    if depth == 0:
        return 0, 19, 16
    w = out["frontend.context.positional.convs.0.weight"]
    return depth, int(w.shape[-1]), dim // int(w.shape[1])


def _decoder(
    src: _Source, s: str, dim: int, dec_meta: Any, fallback: DecoderConfig, out: dict[str, Tensor]
) -> DecoderConfig | None:
    """A 2.0 Decoder1d/Decoder2d -> `head.*` in `out`; None when the checkpoint has no decoder."""
    layers = src.count(s + "blocks.{}.")
    if layers == 0:
        return None
    w0 = src.sd[f"{s}blocks.0.0.weight"]
    dec_dim, kernel, groups = int(w0.shape[0]), int(w0.shape[-1]), dim // int(w0.shape[1])
    for i in range(layers):
        for p in ("weight", "bias"):
            out[f"head.blocks.{i}.conv.{p}"] = src.take(f"{s}blocks.{i}.0.{p}")
    if src.has(f"{s}proj.weight"):
        projection_layers, ratio = 1, fallback.projection_ratio
        for p in ("weight", "bias"):
            out[f"head.proj.{p}"] = src.take(f"{s}proj.{p}")
    elif src.has(f"{s}proj.0.weight") and src.has(f"{s}proj.2.weight") and not src.has(f"{s}proj.4.weight"):
        projection_layers = 2
        ratio = src.sd[f"{s}proj.0.weight"].shape[0] / dec_dim
        for j in (0, 2):
            for p in ("weight", "bias"):
                out[f"head.proj.{j}.{p}"] = src.take(f"{s}proj.{j}.{p}")
    else:
        raise FairseqImportError(f"{src.where}: decoder projection {s}proj has an unsupported layout")
    return DecoderConfig(
        dim=dec_dim,
        kernel_size=kernel,
        groups=groups,
        layers=layers,
        residual=bool(_get(dec_meta, "decoder_residual", default=True)),
        projection_layers=projection_layers,
        projection_ratio=float(ratio),
        input_dropout=float(_get(dec_meta, "input_dropout", default=fallback.input_dropout)),
        mask_noise_std=fallback.mask_noise_std,
    )


def _num(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _objective_v1_v2(base: RunConfig, meta: Any, depth: int) -> dict[str, Any]:
    """targets / loss / teacher from fairseq's data2vec fields (shared by 1.0 audio/text and 2.0)."""
    t = base.targets
    layer_norm = t.layer_norm
    if _get(meta, "instance_norm_target_layer") is True:
        layer_norm = "instance"
    elif _get(meta, "layer_norm_target_layer") is True:
        layer_norm = "layer"
    elif _get(meta, "instance_norm_target_layer") is False and _get(meta, "layer_norm_target_layer") is False:
        layer_norm = "none"
    final_norm = t.final_norm
    if _get(meta, "layer_norm_targets") is True:
        final_norm = "layer"
    elif _get(meta, "instance_norm_targets") is True:
        final_norm = "instance"
    elif _get(meta, "layer_norm_targets") is False and _get(meta, "instance_norm_targets") is False:
        final_norm = "none"
    top_k = int(_get(meta, "average_top_k_layers", default=t.top_k))
    targets = replace(
        t,
        top_k=max(1, min(top_k, depth)),
        layer_norm=layer_norm,
        final_norm=final_norm,
        layer_source="block" if _get(meta, "end_of_block_targets") is True else "ffn",
    )
    loss = base.loss
    beta = _get(meta, "loss_beta")
    if isinstance(beta, (int, float)):
        loss = replace(loss, beta=float(beta))
    scale = _get(meta, "loss_scale")
    if "loss_scale" in (meta or {}):
        if scale is None:
            loss = replace(loss, scale="rsqrt_dim")
        elif _num(scale, 0.0) == 1.0:
            loss = replace(loss, scale="one")
    teacher = base.teacher
    decay, end = _get(meta, "ema_decay"), _get(meta, "ema_end_decay")
    anneal = _get(meta, "ema_anneal_end_step")
    teacher = replace(
        teacher,
        decay=_num(decay, teacher.decay),
        end_decay=_num(end, teacher.end_decay),
        anneal_steps=int(anneal) if isinstance(anneal, int) and anneal >= 0 else teacher.anneal_steps,
    )
    return {"targets": targets, "loss": loss, "teacher": teacher}


def _teacher_copies(student: Mapping[str, Tensor], ema_scope: str) -> dict[str, Tensor]:
    """teacher.parts.* entries equal to the student's (the teacher starts as the student)."""
    parts = {"encoder.": "encoder."}
    if ema_scope in ("local", "context"):
        parts["frontend.context."] = "context."
    if ema_scope == "local":
        parts["frontend.local."] = "local."
    out = {}
    for k, v in student.items():
        for prefix, part in parts.items():
            if k.startswith(prefix):
                out[f"teacher.parts.{part}{k[len(prefix) :]}"] = v.detach().clone()
    return out


# =========================================================================== converters


class _Converted:
    def __init__(self, cfg: RunConfig, student: dict[str, Tensor], kind: str, ignored: list[str]) -> None:
        self.cfg, self.student, self.kind, self.ignored = cfg, student, kind, ignored


def _build(where: str, make: Callable[[], RunConfig]) -> RunConfig:
    try:
        return make()
    except ConfigError as e:
        raise FairseqImportError(f"{where}: the checkpoint's settings do not make a valid config: {e}") from None


def _convert_audio_v1(src: _Source, meta: Any, where: str) -> _Converted:
    out: dict[str, Tensor] = {}
    shapes, conv_bias = _cnn(src, "feature_extractor.", out, where)
    conv = _conv_layers(_get(meta, "conv_feature_layers"), shapes, where)
    for ours, theirs in (("frontend.local.norm", "layer_norm"), ("frontend.local.proj", "post_extract_proj")):
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = src.take(f"{theirs}.{p}")
    dim = int(out["frontend.local.proj.weight"].shape[0])
    if src.has("mask_emb"):
        out["frontend.context.mask_emb"] = src.take("mask_emb").reshape(-1)
    if src.has("encoder.pos_conv.0.weight_g") or src.has("encoder.pos_conv.0.weight_v"):
        raise FairseqImportError(
            f"{where}: a single weight-normed positional conv (wav2vec 2.0 style, pos_conv_depth=1) is not "
            "supported; data2vec uses a stack of plain convs"
        )
    pos_depth, pos_kernel, pos_groups = _pos_convs(src, "encoder.pos_conv.", 0, out, dim)
    if _get(meta, "layer_norm_first") is True:
        raise FairseqImportError(f"{where}: pre-LN (layer_norm_first=True) speech encoders are not supported")
    for p in ("weight", "bias"):
        out[f"encoder.input_norm.{p}"] = src.take(f"encoder.layer_norm.{p}")
    depth = src.count("encoder.layers.{}.")
    for i in range(depth):
        _v1_layer(src, f"encoder.layers.{i}.", f"encoder.blocks.{i}.", out)
    head_key = "final_proj." if src.has("final_proj.weight") else "final_proj.0."
    has_head = src.has(head_key + "weight")
    if has_head:
        for p in ("weight", "bias"):
            out[f"head.{p}"] = src.take(head_key + p)
    ignored = _check_rest(src, [r"^_ema", r"^w2v_encoder\.proj\.", r"^encoder\.version$"])

    heads = _heads(meta, [("encoder_attention_heads",)], dim)
    ffn = int(out["encoder.blocks.0.mlp.fc1.weight"].shape[0]) if depth else 4 * dim
    base = preset("audio-base", 1)

    def make() -> RunConfig:
        enc = replace(
            base.model.encoder,
            dim=dim,
            depth=depth,
            num_heads=heads,
            mlp_ratio=ffn / dim,
            norm_eps=1e-5,
            dropout=_num(_get(meta, "dropout"), base.model.encoder.dropout),
            attn_dropout=_num(_get(meta, "attention_dropout"), base.model.encoder.attn_dropout),
            activation_dropout=_num(_get(meta, "activation_dropout"), base.model.encoder.activation_dropout),
            layerdrop=_num(_get(meta, "encoder_layerdrop"), base.model.encoder.layerdrop),
        )
        audio = AudioConfig(
            conv_layers=conv,
            conv_bias=conv_bias,
            pos_conv_depth=pos_depth,
            pos_conv_kernel=pos_kernel,
            pos_conv_groups=pos_groups,
            alibi=False,
        )
        model = replace(base.model, encoder=enc, audio=audio, head_layers=1)
        masking = replace(
            base.masking,
            mask_prob=_num(_get(meta, "mask_prob"), base.masking.mask_prob),
            mask_length=int(_get(meta, "mask_length", default=base.masking.mask_length)),
        )
        return replace(base, model=model, masking=masking, **_objective_v1_v2(base, meta, depth))

    cfg = _build(where, make)
    return _Converted(cfg, out, "data2vec_audio", ignored)


def _convert_text_v1(src: _Source, meta: Any, task: Any, where: str) -> _Converted:
    # Older checkpoints: decoder.* for encoder.*, emb_layer_norm for layernorm_embedding.
    renamed = {}
    for k, v in src.sd.items():
        nk = "encoder." + k[len("decoder.") :] if k.startswith("decoder.") else k
        renamed[nk.replace(".emb_layer_norm.", ".layernorm_embedding.")] = v
    src.sd = renamed
    s = "encoder.sentence_encoder."
    out: dict[str, Tensor] = {}
    out["frontend.local.embed_tokens.weight"] = src.take(s + "embed_tokens.weight")
    if not src.has(s + "embed_positions.weight"):
        raise FairseqImportError(f"{where}: no learned position embedding (sinusoidal positions are not supported)")
    out["frontend.local.embed_positions.weight"] = src.take(s + "embed_positions.weight")
    if not src.has(s + "layernorm_embedding.weight"):
        raise FairseqImportError(f"{where}: no embedding LayerNorm (layernorm_embedding=False is not supported)")
    for p in ("weight", "bias"):
        out[f"frontend.local.layer_norm.{p}"] = src.take(f"{s}layernorm_embedding.{p}")
    if src.has(s + "layer_norm.weight"):
        raise FairseqImportError(f"{where}: pre-LN text encoders (normalize_before=True) are not supported")
    no_scale = _first(meta, [("transformer", "no_scale_embedding"), ("no_scale_embedding",)], default=True)
    if no_scale is False:
        raise FairseqImportError(f"{where}: scaled token embeddings (no_scale_embedding=False) are not supported")
    depth = src.count(s + "layers.{}.")
    for i in range(depth):
        _v1_layer(src, f"{s}layers.{i}.", f"encoder.blocks.{i}.", out)
    head_prefix = "encoder.regression_head."
    if not src.has(head_prefix + "0.weight") and src.has("encoder.lm_head.0.weight"):
        head_prefix = "encoder.lm_head."  # older name of the regression head
    # Linear (head_layers=1) or Linear-GELU-Linear (2): weights at Sequential indices [0] or [0, 2].
    head_idx = [i for i in range(7) if src.has(f"{head_prefix}{i}.weight")]
    head_layers = 2 if head_idx == [0, 2] else 1
    if head_idx and head_idx not in ([0], [0, 2]):
        raise FairseqImportError(f"{where}: a regression head with layers {head_idx} is not supported")
    if head_idx == [0]:
        for p in ("weight", "bias"):
            out[f"head.{p}"] = src.take(f"{head_prefix}0.{p}")
    elif head_idx == [0, 2]:
        for j in (0, 2):
            for p in ("weight", "bias"):
                out[f"head.{j}.{p}"] = src.take(f"{head_prefix}{j}.{p}")
    if not head_idx:
        head_layers = int(_get(meta, "head_layers", default=2))
    ignored = _check_rest(
        src,
        [
            r"^encoder\._ema",
            r"\.version$",
            r"_float_tensor$",
            r"^encoder\.lm_head\.",
            r"^encoder\.emb_head\.",
            r"^classification_heads\.",
            r"^encoder\.target_model\.",
        ],
    )
    vocab, dim = out["frontend.local.embed_tokens.weight"].shape
    pos_rows = int(out["frontend.local.embed_positions.weight"].shape[0])
    heads = _heads(meta, [("transformer", "encoder", "attention_heads"), ("encoder_attention_heads",)], dim)
    ffn = int(out["encoder.blocks.0.mlp.fc1.weight"].shape[0]) if depth else 4 * dim
    base = preset("text-base", 1)
    pad = 1

    def make() -> RunConfig:
        e = base.model.encoder
        enc = replace(
            e,
            dim=int(dim),
            depth=depth,
            num_heads=heads,
            mlp_ratio=ffn / dim,
            norm_eps=1e-5,
            dropout=_num(_first(meta, [("transformer", "dropout"), ("dropout",)]), e.dropout),
            attn_dropout=_num(
                _first(meta, [("transformer", "attention_dropout"), ("attention_dropout",)]), e.attn_dropout
            ),
            activation_dropout=_num(
                _first(meta, [("transformer", "activation_dropout"), ("activation_dropout",)]), e.activation_dropout
            ),
            layerdrop=_num(
                _first(meta, [("transformer", "encoder", "layerdrop"), ("encoder_layerdrop",)]), e.layerdrop
            ),
        )
        text = TextConfig(
            vocab_size=int(vocab),
            max_positions=pos_rows - pad - 1,
            pad_id=pad,
            bos_id=0,
            eos_id=2,
            unk_id=3,
            mask_id=int(vocab) - 1,
            embed_dropout=enc.dropout,
        )
        model = replace(base.model, encoder=enc, text=text, head_layers=head_layers)
        masking = base.masking
        mult = _get(task, "mask_multiple_length")
        if isinstance(mult, int):
            masking = replace(
                masking,
                kind="span" if mult > 1 else "bert",
                mask_length=max(1, mult),
                mask_prob=_num(_get(task, "mask_prob"), masking.mask_prob),
                random_token_prob=_num(_get(task, "random_token_prob"), masking.random_token_prob),
                leave_unmasked_prob=_num(_get(task, "leave_unmasked_prob"), masking.leave_unmasked_prob),
            )
        data = replace(
            base.data, text=replace(base.data.text, block_size=min(base.data.text.block_size, text.max_positions))
        )
        return replace(base, model=model, masking=masking, data=data, **_objective_v1_v2(base, meta, depth))

    cfg = _build(where, make)
    return _Converted(cfg, out, "data2vec_text", ignored)


def _convert_vision_v1(src: _Source, meta: Any, where: str) -> _Converted:
    out: dict[str, Tensor] = {}
    w = src.take("patch_embed.proj.weight")
    dim, channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    out["frontend.local.proj.weight"] = w
    out["frontend.local.proj.bias"] = src.take("patch_embed.proj.bias")
    cls = src.take("cls_token")
    learned_pos = src.has("pos_embed")
    if learned_pos:  # (1, 1 + N, D): the CLS slot folds into the CLS token, the rest is the patch table
        pos = src.take("pos_embed")
        cls = cls + pos[:, :1]
        out["frontend.context.positional.table"] = pos[:, 1:]
    out["frontend.context.prefix"] = cls
    if src.has("mask_token"):
        out["frontend.context.mask_emb"] = src.take("mask_token").reshape(-1)
    shared = src.has("rel_pos_bias.relative_position_bias_table")
    per_layer = src.has("blocks.0.attn.relative_position_bias_table")
    table: Tensor | None = None
    if shared:
        table = src.take("rel_pos_bias.relative_position_bias_table")
        out["encoder.position_bias.table"] = table
    depth = src.count("blocks.{}.")
    qkv_bias: Literal["qv", "none"] = "qv" if src.has("blocks.0.attn.q_bias") else "none"
    layer_scale = src.has("blocks.0.gamma_1")
    for i in range(depth):
        s, d = f"blocks.{i}.", f"encoder.blocks.{i}."
        out[d + "attn.qkv.weight"] = src.take(s + "attn.qkv.weight")
        if qkv_bias == "qv":
            out[d + "attn.q_bias"] = src.take(s + "attn.q_bias")
            out[d + "attn.v_bias"] = src.take(s + "attn.v_bias")
        if per_layer:
            t = src.take(s + "attn.relative_position_bias_table")
            out[d + "position_bias.table"] = t
            table = t if table is None else table
        if layer_scale:
            out[d + "gamma1"] = src.take(s + "gamma_1")
            out[d + "gamma2"] = src.take(s + "gamma_2")
        for ours, theirs in (("attn.proj", "attn.proj"), ("norm1", "norm1"), ("norm2", "norm2")):
            for p in ("weight", "bias"):
                out[f"{d}{ours}.{p}"] = src.take(f"{s}{theirs}.{p}")
        for fc in ("fc1", "fc2"):
            for p in ("weight", "bias"):
                out[f"{d}mlp.{fc}.{p}"] = src.take(f"{s}mlp.{fc}.{p}")
    final_norm = src.has("norm.weight")
    if final_norm:
        for p in ("weight", "bias"):
            out[f"encoder.final_norm.{p}"] = src.take(f"norm.{p}")
    if src.has("lm_head.weight"):
        for p in ("weight", "bias"):
            out[f"head.{p}"] = src.take(f"lm_head.{p}")
    ignored = _check_rest(src, [r"relative_position_index$", r"^fc_norm\.", r"^head\.", r"^lm_head\."])

    heads = int(table.shape[1]) if table is not None else None
    position_bias: Literal["none", "shared", "per_layer", "both"] = "none"
    if shared or per_layer:
        position_bias = "both" if shared and per_layer else ("shared" if shared else "per_layer")
    size = _get(meta, "input_size")
    if not isinstance(size, int) and learned_pos:
        size = math.isqrt(int(out["frontend.context.positional.table"].shape[1])) * patch
    if not isinstance(size, int):
        size = 224
        if table is not None:  # (2h-1)^2 + 3 rows for a square grid
            side = (math.isqrt(int(table.shape[0]) - 3) + 1) // 2
            size = side * patch
    model_name = str(_get(meta, "model", default=""))
    if heads is None:
        heads = 16 if ("large" in model_name or "huge" in model_name) else max(1, dim // 64)
    ffn = int(out["encoder.blocks.0.mlp.fc1.weight"].shape[0]) if depth else 4 * dim
    base = preset("image-large" if dim >= 1024 else "image-base", 1)

    def make() -> RunConfig:
        e = base.model.encoder
        ls = _num(_get(meta, "layer_scale_init_value"), 0.0)
        enc = replace(
            e,
            dim=dim,
            depth=depth,
            num_heads=heads,
            mlp_ratio=ffn / dim,
            norm_eps=1e-6,
            qkv_bias=qkv_bias,
            layer_scale_init=(ls if ls > 0 else 0.1) if layer_scale else 0.0,
            position_bias=position_bias,
            final_norm=final_norm,
            drop_path=_num(_get(meta, "drop_path"), e.drop_path),
            attn_dropout=_num(_get(meta, "attn_drop_rate"), e.attn_dropout),
        )
        image = ImageConfig(
            image_size=(size, size),
            patch_size=patch,
            channels=channels,
            positions="learned" if learned_pos else "none",
            cls_token=True,
        )
        model = replace(base.model, encoder=enc, image=image, head_layers=1)
        targets = base.targets
        layers_spec = _get(meta, "target_layers")
        if isinstance(layers_spec, str):
            try:
                tl = ast.literal_eval(layers_spec)
            except (ValueError, SyntaxError):
                tl = []
            if isinstance(tl, list) and tl:
                targets = replace(targets, top_k=len(tl))
        if _get(meta, "post_target_layer_norm") is False:
            targets = replace(targets, final_norm="none")
        targets = replace(targets, top_k=max(1, min(targets.top_k, depth)))
        loss = base.loss
        beta = _get(meta, "l1_beta")
        if isinstance(beta, (int, float)) and _get(meta, "l2_loss") is not True:
            loss = replace(loss, beta=float(beta))
        teacher = base.teacher
        decay = _get(meta, "ema_decay")
        if isinstance(decay, float):
            teacher = replace(teacher, decay=decay, end_decay=decay, anneal_steps=0)
        masking = base.masking
        n_mask = _get(meta, "num_mask_patches")
        grid = (size // patch) ** 2
        if isinstance(n_mask, int) and 0 < n_mask < grid:
            masking = replace(masking, mask_prob=n_mask / grid)
        data = base.data
        if channels == 1:
            data = replace(data, mean=(0.5,), std=(0.5,))
        return replace(base, model=model, targets=targets, loss=loss, teacher=teacher, masking=masking, data=data)

    cfg = _build(where, make)
    return _Converted(cfg, out, "data2vec_vision", ignored)


_MULTI_PRESETS = {"IMAGE": "image", "AUDIO": "audio", "TEXT": "text"}


def _convert_multi(src: _Source, meta: Any, where: str) -> _Converted:
    present = sorted({k.split(".")[1] for k in src.sd if k.startswith("modality_encoders.")})
    mod = present[0] if len(present) == 1 else None
    if mod is None:
        wanted = _get(meta, "supported_modality")
        names = {1: "AUDIO", 2: "IMAGE", 3: "TEXT"}
        wanted = names.get(wanted, wanted) if isinstance(wanted, int) else wanted
        if isinstance(wanted, str) and wanted.upper() in present:
            mod = wanted.upper()
        else:
            raise FairseqImportError(
                f"{where}: a multi-modal data2vec_multi model ({', '.join(present)}); "
                "this library loads one modality at a time and the checkpoint names none"
            )
    if mod not in _MULTI_PRESETS:
        raise FairseqImportError(f"{where}: unknown data2vec_multi modality {mod!r}")
    modality = _MULTI_PRESETS[mod]
    m = f"modality_encoders.{mod}."
    mmeta = _get(meta, "modalities", modality, default={})
    # Other modalities' encoders are not used by this one.
    for k in list(src.sd):
        if k.startswith("modality_encoders.") and not k.startswith(m):
            src.used.add(k)
    if _get(meta, "layer_norm_first") is True or src.has("norm.weight"):
        raise FairseqImportError(
            f"{where}: pre-LN data2vec_multi (layer_norm_first=True) is not supported: fairseq's pre-LN AltBlock "
            "drops the FFN residual, which this library does not reproduce"
        )
    out: dict[str, Tensor] = {}
    depth = src.count("blocks.{}.")
    if depth == 0:
        raise FairseqImportError(f"{where}: no transformer blocks")
    for i in range(depth):
        _alt_block(src, f"blocks.{i}.", f"encoder.blocks.{i}.", out)
    dim = int(out["encoder.blocks.0.norm1.weight"].shape[0])
    ffn = int(out["encoder.blocks.0.mlp.fc1.weight"].shape[0])
    prenet = src.count(m + "context_encoder.blocks.{}.")
    for i in range(prenet):
        _alt_block(src, f"{m}context_encoder.blocks.{i}.", f"encoder.prenet.{i}.", out)
    input_norm = src.has(m + "context_encoder.norm.weight")
    if input_norm:
        for p in ("weight", "bias"):
            out[f"encoder.input_norm.{p}"] = src.take(f"{m}context_encoder.norm.{p}")
    if src.has(m + "extra_tokens"):
        extra = src.take(m + "extra_tokens")
        if extra.shape[1] != 1:
            raise FairseqImportError(f"{where}: {extra.shape[1]} extra tokens; only one (CLS) is supported")
        out["frontend.context.prefix"] = extra
    heads = _heads(meta, [("num_heads",)], dim)
    position_bias: Literal["none", "shared", "per_layer"] = "none"
    alibi = False
    if src.has(m + "alibi_scale"):
        if modality != "audio":
            raise FairseqImportError(f"{where}: ALiBi for {modality} is not supported (only for speech)")
        alibi = True
        scale = src.take(m + "alibi_scale")  # (1 or layers, 1, heads or 1, 1, 1)
        if scale.dim() == 4:
            scale = scale.unsqueeze(0)
        per_layer = scale.shape[0]
        position_bias = "shared" if per_layer == 1 else "per_layer"
        values = scale.reshape(per_layer, -1).float()
        values = values.expand(per_layer, heads) if values.shape[1] == 1 else values
        if per_layer == 1:
            out["encoder.position_bias.scale"] = values[0].clone()
        else:
            if per_layer != prenet + depth:
                raise FairseqImportError(f"{where}: {per_layer} ALiBi scales for {prenet + depth} blocks")
            for i in range(per_layer):
                name = f"encoder.prenet.{i}" if i < prenet else f"encoder.blocks.{i - prenet}"
                out[f"{name}.position_bias.scale"] = values[i].clone()
    if src.has(m + "alibi_bias"):
        raise FairseqImportError(f"{where}: learned ALiBi bias tables are not supported")

    base_name = f"{modality}-{'large' if dim >= 1024 else 'base'}"
    base = preset(base_name, 2)
    ignored_patterns = [r"^_ema", r"^modality_encoders\.[A-Z]+\.decoder\.", r"^shared_decoder\.", r"^recon_proj\."]
    image: ImageConfig | None = None
    audio: AudioConfig | None = None
    text: TextConfig | None = None
    if modality == "image":
        if src.has(m + "local_encoder.0.proj.weight"):
            raise FairseqImportError(
                f"{where}: a patch embedding narrower than the model (with a Linear) is not supported"
            )
        w = src.take(m + "local_encoder.proj.weight")
        out["frontend.local.proj.weight"] = w
        out["frontend.local.proj.bias"] = src.take(m + "local_encoder.proj.bias")
        patch, channels = int(w.shape[-1]), int(w.shape[1])
        fixed = src.has(m + "fixed_positional_encoder.positions")
        size = _get(mmeta, "input_size")
        if fixed:
            pos = src.take(m + "fixed_positional_encoder.positions")
            side = math.isqrt(int(pos.shape[1]))
            if not isinstance(size, int):
                size = side * patch
            expected = sincos_2d(dim, (side, side))
            if pos.reshape(-1, dim).shape != expected.shape or not torch.allclose(
                pos.reshape(-1, dim).float(), expected, atol=1e-5
            ):
                raise FairseqImportError(
                    f"{where}: the fixed positions are not the 2-D sin-cos table this library uses"
                )
        if not isinstance(size, int):
            size = 224
        image = ImageConfig(
            image_size=(size, size),
            patch_size=patch,
            channels=channels,
            positions="sincos" if fixed else "none",
            cls_token="frontend.context.prefix" in out,
        )
    elif modality == "audio":
        shapes, conv_bias = _cnn(src, m + "local_encoder.", out, where)
        conv = _conv_layers(_get(mmeta, "feature_encoder_spec"), shapes, where)
        for ours, theirs in (
            ("frontend.local.norm", "project_features.1"),
            ("frontend.local.proj", "project_features.2"),
        ):
            for p in ("weight", "bias"):
                out[f"{ours}.{p}"] = src.take(f"{m}{theirs}.{p}")
        if src.has(m + "relative_positional_encoder.0.weight"):
            raise FairseqImportError(f"{where}: conv_pos_pre_ln=True is not supported")
        pos_depth, pos_kernel, pos_groups = _pos_convs(src, m + "relative_positional_encoder.", 1, out, dim)
        audio = AudioConfig(
            conv_layers=conv,
            conv_bias=conv_bias,
            pos_conv_depth=pos_depth,
            pos_conv_kernel=pos_kernel,
            pos_conv_groups=pos_groups,
            alibi=alibi,
        )
    else:
        le = m + "local_encoder."
        out["frontend.local.embed_tokens.weight"] = src.take(le + "embed_tokens.weight")
        if not src.has(le + "embed_positions.weight"):
            raise FairseqImportError(f"{where}: no learned position embedding (learned_pos=False is not supported)")
        out["frontend.local.embed_positions.weight"] = src.take(le + "embed_positions.weight")
        if not src.has(le + "layernorm_embedding.weight"):
            raise FairseqImportError(f"{where}: no embedding LayerNorm (layernorm_embedding=False is not supported)")
        for p in ("weight", "bias"):
            out[f"frontend.local.layer_norm.{p}"] = src.take(f"{le}layernorm_embedding.{p}")
        if _get(mmeta, "no_scale_embedding") is False:
            raise FairseqImportError(f"{where}: scaled token embeddings (no_scale_embedding=False) are not supported")
        vocab = int(out["frontend.local.embed_tokens.weight"].shape[0])
        rows = int(out["frontend.local.embed_positions.weight"].shape[0])
        text = TextConfig(
            vocab_size=vocab,
            max_positions=rows - 2,
            pad_id=1,
            bos_id=0,
            eos_id=2,
            unk_id=3,
            mask_id=vocab - 1,
            embed_dropout=_num(_get(mmeta, "dropout"), base.model.text.embed_dropout),
        )
        ignored_patterns.append(r"_float_tensor$")
    if src.has(m + "decoder.input_proj.weight"):
        raise FairseqImportError(f"{where}: transformer decoders are not supported (only the conv decoder)")
    decoder = _decoder(src, m + "decoder.", dim, _get(mmeta, "decoder"), base.model.decoder, out)
    if decoder is not None:
        decoder = replace(decoder, mask_noise_std=_num(_get(mmeta, "mask_noise_std"), decoder.mask_noise_std))
    ignored = _check_rest(src, ignored_patterns)

    default_eps = 1e-6 if modality == "image" else 1e-5

    def make() -> RunConfig:
        e = base.model.encoder
        enc = replace(
            e,
            dim=dim,
            depth=depth,
            prenet_depth=prenet,
            num_heads=heads,
            mlp_ratio=ffn / dim,
            norm_order="post",
            norm_eps=_num(_get(meta, "norm_eps"), default_eps),
            qkv_bias="all",
            layer_scale_init=0.0,
            position_bias=position_bias,
            input_norm=input_norm,
            final_norm=False,
            dropout=_num(_get(meta, "encoder_dropout"), e.dropout),
            attn_dropout=_num(_get(meta, "attention_dropout"), e.attn_dropout),
            activation_dropout=_num(_get(meta, "activation_dropout"), e.activation_dropout),
            drop_path=_num(_get(meta, "end_drop_path_rate"), e.drop_path),
            layerdrop=_num(_get(meta, "layerdrop"), e.layerdrop),
        )
        model = replace(base.model, encoder=enc, decoder=decoder or base.model.decoder)
        if image is not None:
            model = replace(model, image=image)
        if audio is not None:
            model = replace(model, audio=audio)
        if text is not None:
            model = replace(model, text=text)
        masking = base.masking
        mlen = _get(mmeta, "mask_length")
        masking = replace(
            masking,
            mask_prob=_num(_get(mmeta, "mask_prob"), masking.mask_prob),
            mask_length=int(mlen) if isinstance(mlen, int) and modality != "text" else masking.mask_length,
            mask_prob_adjust=_num(_get(mmeta, "mask_prob_adjust"), masking.mask_prob_adjust),
            num_masks=int(_get(meta, "clone_batch", default=masking.num_masks)),
        )
        objective = _objective_v1_v2(base, meta, depth)
        teacher = objective["teacher"]
        if _get(meta, "ema_encoder_only") is True:
            teacher = replace(teacher, ema_scope="encoder")
        elif _get(meta, "ema_encoder_only") is False:
            local = _get(mmeta, "ema_local_encoder")
            teacher = replace(teacher, ema_scope="local" if local is True else "context")
        objective["teacher"] = teacher
        data = base.data
        if text is not None:
            data = replace(data, text=replace(data.text, block_size=min(data.text.block_size, text.max_positions)))
        if image is not None and image.channels == 1:
            data = replace(data, mean=(0.5,), std=(0.5,))
        return replace(base, model=model, masking=masking, data=data, **objective)

    cfg = _build(where, make)
    return _Converted(cfg, out, f"data2vec_multi ({modality})", ignored)


# =========================================================================== entry points


def _model_state(ckpt: Any, where: str) -> tuple[dict[str, Tensor], Any, Any]:
    """(model tensors, model cfg meta, task meta) from a fairseq or BEiT checkpoint dict."""
    if not isinstance(ckpt, Mapping):
        raise FairseqImportError(f"{where}: not a checkpoint dictionary (got {type(ckpt).__name__})")
    sd: Any = None
    for key in ("model", "module", "state_dict"):
        if isinstance(ckpt.get(key), Mapping):
            sd = ckpt[key]
            break
    if sd is None:
        raise FairseqImportError(f"{where}: no model state dict (looked for 'model', 'module', 'state_dict')")
    cfg = _plain(ckpt.get("cfg"))
    args = _plain(ckpt.get("args"))
    meta: Any = _get(cfg, "model") if isinstance(cfg, Mapping) else None
    task: Any = _get(cfg, "task") if isinstance(cfg, Mapping) else None
    if meta is None and isinstance(args, Mapping):
        meta, task = args, args
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    if any(k.startswith("w2v_encoder.w2v_model.") for k in tensors):  # fine-tuned speech (wav2vec_ctc)
        inner = _get(meta, "w2v_args")
        meta = _get(inner, "model", default=inner)
        tensors = {k.removeprefix("w2v_encoder.w2v_model."): v for k, v in tensors.items()}
    return tensors, meta, task


def _convert(path: Path) -> _Converted:
    where = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    ckpt = _safe_load(path)
    sd, meta, task = _model_state(ckpt, where)
    keys = set(sd)
    name = _get(meta, "_name")
    known = {"data2vec_audio", "data2vec_text", "data2vec_multi", "wav2vec_ctc", None}
    if name not in known and not isinstance(name, str):
        name = None
    src = _Source(sd, where)
    if _SIGNATURES[0](keys):
        conv = _convert_multi(src, meta, where)
    elif _SIGNATURES[1](keys):
        conv = _convert_text_v1(src, meta, task, where)
    elif _SIGNATURES[2](keys):
        if isinstance(name, str) and name not in known:
            raise FairseqImportError(f"{where}: a {name!r} model, not data2vec")
        conv = _convert_audio_v1(src, meta, where)
    elif _SIGNATURES[3](keys):
        conv = _convert_vision_v1(src, meta, where)
    else:
        shown = ", ".join(sorted(keys)[:6])
        raise FairseqImportError(
            f"{where}: not a supported data2vec checkpoint (model {name or 'unnamed'}; keys such as {shown})"
        )
    return conv


def load_fairseq(path: Path) -> tuple[RunConfig, dict[str, Tensor]]:
    """A fairseq / data2vec_vision data2vec checkpoint as (config, state dict in this library's
    key names), ready for `Data2Vec.from_config(cfg).load_state_dict(sd, strict=False)`: only
    the head/decoder can be missing (when the checkpoint has none). The teacher entries are
    copies of the student's."""
    conv = _convert(Path(path))
    student = {k: v.detach().clone().contiguous() for k, v in conv.student.items()}
    sd = {**student, **_teacher_copies(student, conv.cfg.teacher.ema_scope)}
    return replace(conv.cfg, preset=f"{conv.cfg.preset} (imported: fairseq {conv.kind})"), sd
