"""The fairseq importer's entry point: `load_fairseq` loads a checkpoint safely (`safety`), finds
its model tensors and configuration, picks the converter by the checkpoint's keys (`detect`) and
returns our RunConfig with the student weights and the teacher's copies of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor

from data2vec.config import RunConfig
from data2vec.interop.fairseq.common import Converted, FairseqImportError, Source, get
from data2vec.interop.fairseq.detect import SIGNATURES
from data2vec.interop.fairseq.multi import convert_multi
from data2vec.interop.fairseq.parts import teacher_copies
from data2vec.interop.fairseq.safety import plain, safe_load
from data2vec.interop.fairseq.v1 import convert_audio_v1, convert_text_v1
from data2vec.interop.fairseq.vision import convert_vision_v1

CONVERTERS: dict[str, Callable[[Source, Any, Any, str], Converted]] = {
    "data2vec_multi": convert_multi,
    "data2vec_text": convert_text_v1,
    "data2vec_audio": convert_audio_v1,
    "data2vec_vision": convert_vision_v1,
}
"""The converter of each checkpoint kind in `SIGNATURES`: (tensors, model meta, task meta, file name)."""

_KNOWN_NAMES = {"data2vec_audio", "data2vec_text", "data2vec_multi", "wav2vec_ctc", None}
"""fairseq model names (`cfg.model._name`) that may carry data2vec weights."""


def model_state(ckpt: Any, where: str) -> tuple[dict[str, Tensor], Any, Any]:
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
    cfg = plain(ckpt.get("cfg"))
    args = plain(ckpt.get("args"))
    meta: Any = get(cfg, "model") if isinstance(cfg, Mapping) else None
    task: Any = get(cfg, "task") if isinstance(cfg, Mapping) else None
    if meta is None and isinstance(args, Mapping):
        meta, task = args, args
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    if any(k.startswith("w2v_encoder.w2v_model.") for k in tensors):  # fine-tuned speech (wav2vec_ctc)
        inner = get(meta, "w2v_args")
        meta = get(inner, "model", default=inner)
        tensors = {k.removeprefix("w2v_encoder.w2v_model."): v for k, v in tensors.items()}
    return tensors, meta, task


def _convert(path: Path) -> Converted:
    """The checkpoint at `path` converted by the converter of its kind."""
    where = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    ckpt = safe_load(path)
    sd, meta, task = model_state(ckpt, where)
    keys = set(sd)
    name = get(meta, "_name")
    if name not in _KNOWN_NAMES and not isinstance(name, str):
        name = None
    for kind, matches in SIGNATURES.items():
        if matches(keys):
            if kind == "data2vec_audio" and isinstance(name, str) and name not in _KNOWN_NAMES:
                raise FairseqImportError(f"{where}: a {name!r} model, not data2vec")
            return CONVERTERS[kind](Source(sd, where), meta, task, where)
    shown = ", ".join(sorted(keys)[:6])
    raise FairseqImportError(
        f"{where}: not a supported data2vec checkpoint (model {name or 'unnamed'}; keys such as {shown})"
    )


def load_fairseq(path: Path) -> tuple[RunConfig, dict[str, Tensor]]:
    """A fairseq / data2vec_vision data2vec checkpoint as (config, state dict in this library's
    key names), ready for `Data2Vec.from_config(cfg).load_state_dict(sd, strict=False)`: only
    the head/decoder can be missing (when the checkpoint has none). The teacher entries are
    copies of the student's."""
    conv = _convert(Path(path))
    student = {k: v.detach().clone().contiguous() for k, v in conv.student.items()}
    sd = {**student, **teacher_copies(student, conv.cfg.teacher.ema_scope)}
    return replace(conv.cfg, preset=f"{conv.cfg.preset} (imported: fairseq {conv.kind})"), sd
