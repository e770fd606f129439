"""Loading a pretrained model: one chain for every source, one weight loader for every use.

    from data2vec.pretrained import build_model, load_model, load_pretrained
    pre = load_pretrained("runs/speech")            # config + student weights + where they came from
    model = build_model(pre)                        # Data2Vec in eval mode, teacher = copy of the student
    model = load_model("runs/joint", modality="text")

`load_pretrained(source, modality=None)` reads, in this order:

- a training checkpoint of this library (`RUN/checkpoints/step_N`, a folder with manifest.json);
- a run directory (a folder with `checkpoints/`): its newest checkpoint that verifies, corrupt
  ones skipped with a warning;
- our pretrained-model folder (`config.json` with a `model` section + `model.safetensors`, what
  `data2vec.interop.save_pretrained` and `data2vec convert --to data2vec` write);
- a transformers folder (`config.json` with `model_type`; `data2vec.interop.hf`);
- a fairseq checkpoint file (`data2vec.interop.fairseq`);
- a Hugging Face hub id (`facebook/data2vec-audio-base`), when no such file or folder exists.

A joint checkpoint or run (config.json with `"kind": "joint"`: one encoder, several
modalities) gives one modality's model: `modality` is required there (`ModalityRequired`, a
ValueError, names the modalities otherwise). For any other source `modality`, when given, must
be the model's.

Weights go into a model through `load_student_weights`, the one place that decides which
weights may be missing: `MAY_STAY_FRESH` (the pretraining head or decoder, and the data2vec 1.0
mask vector, which a transformers or fairseq export may lack). `build_model` loads everything a
source holds; `load_encoder_weights` (continued pretraining) loads all but the head, so that the
head or decoder of the model built from the config starts fresh. Both make the teacher a copy of
the loaded student.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from data2vec.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint
from data2vec.config import ConfigError, RunConfig
from data2vec.interop.common import (
    CONFIG,
    HEAD_JSON,
    HEAD_WEIGHTS,
    WEIGHTS,
    InteropError,
    read_json,
    read_safetensors,
)
from data2vec.interop.fairseq import is_fairseq_checkpoint, load_fairseq
from data2vec.interop.hf import HFHead, HFImport, load_hf
from data2vec.joint import JointConfig, is_joint, member_weights
from data2vec.model import Data2Vec

SourceKind = Literal["checkpoint", "joint", "data2vec", "transformers", "fairseq"]

MAY_STAY_FRESH: tuple[str, ...] = ("head.", "frontend.context.mask_emb")
"""Student key prefixes that a source may lack: the pretraining head or decoder (not part of an
exported encoder, and started fresh by continued pretraining) and the data2vec 1.0 mask vector."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModalityRequired(ValueError):
    """A joint checkpoint holds several modalities; the caller has to pick one."""


@dataclass
class Pretrained:
    """A pretrained model's config and student weights (this library's key names)."""

    config: RunConfig
    student: dict[str, Tensor]
    """Student weights: `frontend.*`, `encoder.*` and, where the source has it, `head.*`."""
    source: str
    """Where it came from, for logs (kind and path, e.g. `checkpoint RUN/checkpoints/step_N (step N)`)."""
    path: str
    """The file, folder or hub id it was read from, as given."""
    kind: SourceKind
    head: HFHead | None = None
    """What a transformers checkpoint held beyond the backbone (task head, labels), if any."""


# ============================================================================ the chain


def load_pretrained(source: str | Path, modality: str | None = None) -> Pretrained:
    """Config and student weights from any source this library reads (see the module doc)."""
    path = Path(source)
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return _checkpoint(path, path, modality)
        if (path / "checkpoints").is_dir():
            return _checkpoint(_newest_checkpoint(path), path, modality)
        if (path / CONFIG).is_file():
            data = read_json(path / CONFIG)
            if "model_type" in data:
                return _checked(from_hf(load_hf(path), str(source)), modality)
            if "model" in data:
                return _checked(_own_folder(path, data, str(source)), modality)
    elif path.is_file() and is_fairseq_checkpoint(path):
        cfg, sd = load_fairseq(path)
        return _checked(Pretrained(cfg, _student(sd), f"fairseq {path}", str(source), "fairseq"), modality)
    if path.exists():
        raise InteropError(
            f"{path}: not a model this library reads (a run directory or training checkpoint, a folder written "
            "by `data2vec convert`, a transformers folder with config.json, or a fairseq checkpoint)"
        )
    if _HUB_ID.match(str(source)):
        return _checked(from_hf(load_hf(str(source)), str(source)), modality)
    raise FileNotFoundError(f"{source}: no such file or folder")


def from_hf(imp: HFImport, given: str | None = None) -> Pretrained:
    """A transformers checkpoint read by `data2vec.interop.hf.load_hf`, as a `Pretrained`."""
    return Pretrained(
        imp.config, dict(imp.state_dict), f"transformers {imp.path}", given or imp.path, "transformers", imp.head
    )


def _student(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith("teacher.")}


def _checked(pre: Pretrained, modality: str | None) -> Pretrained:
    if modality is not None and modality != pre.config.model.modality:
        raise ConfigError(f"modality: {pre.path} is a {pre.config.model.modality} model, not {modality}")
    return pre


def _newest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint of a run that verifies (corrupt ones are skipped with a warning)."""
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoints in {run_dir / 'checkpoints'}")
    for ckpt in reversed(found):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        warnings.warn(f"skipping corrupt checkpoint {ckpt}: {problem}", stacklevel=3)
    raise CheckpointError(f"{run_dir}: no checkpoint that verifies (of {len(found)})")


def _checkpoint(ckpt: Path, given: Path, modality: str | None) -> Pretrained:
    """One training checkpoint folder (config + student only; the teacher and optimiser state are
    not read). A joint checkpoint gives its `modality` member."""
    problem = verify_checkpoint(ckpt)
    if problem is not None:
        raise CheckpointError(f"{ckpt}: {problem}")
    step = int(json.loads((ckpt / "manifest.json").read_text())["step"])
    config = json.loads((ckpt / "config.json").read_text())
    student = read_safetensors(ckpt / "student.safetensors", CheckpointError)
    where = f"checkpoint {ckpt} (step {step})"
    if is_joint(config):
        joint = JointConfig.from_dict(config)
        if modality is None:
            raise ModalityRequired(
                f"{given} is a joint checkpoint ({', '.join(joint.modalities)}): name the modality to load "
                "(--modality, or modality=...)"
            )
        cfg = joint.member(modality)
        return Pretrained(cfg, member_weights(student, modality), f"{modality} of joint {where}", str(given), "joint")
    return _checked(Pretrained(RunConfig.from_dict(config), student, where, str(given), "checkpoint"), modality)


def _own_folder(path: Path, data: dict[str, object], given: str) -> Pretrained:
    """Our pretrained-model folder (`data2vec.interop.save_pretrained`)."""
    if not (path / WEIGHTS).is_file():
        raise InteropError(f"{path}: no {WEIGHTS}")
    try:
        cfg = RunConfig.from_dict(data)
    except ConfigError as e:
        raise InteropError(f"{path / CONFIG}: {e}") from None
    head = None
    if (path / HEAD_JSON).is_file():
        weights = read_safetensors(path / HEAD_WEIGHTS) if (path / HEAD_WEIGHTS).is_file() else {}
        head = HFHead.from_description(read_json(path / HEAD_JSON), weights)
    return Pretrained(cfg, read_safetensors(path / WEIGHTS), f"data2vec {path}", given, "data2vec", head)


# ============================================================================ weights into a model


def load_student_weights(
    model: Data2Vec,
    student: dict[str, Tensor],
    source: str,
    *,
    allow_fresh: Sequence[str] = MAY_STAY_FRESH,
    skip: Sequence[str] = ("teacher.",),
    what: str = "weights",
) -> list[str]:
    """Load `student` (this library's key names) into `model`'s student, then make the teacher a
    copy of the loaded student. Keys starting with one of `skip` are not loaded. Returns the
    student keys that were not loaded (sorted): they keep the model's initial values, which only
    keys starting with one of `allow_fresh` may do.

    A weight whose shape differs from the model's, a student key the source lacks (outside
    `allow_fresh`) and a source key the model has no place for each raise ConfigError, naming
    the key, `source` and (as the message's first word) `what`."""
    own = model.student_state_dict()
    weights = {k: v for k, v in student.items() if not k.startswith(tuple(skip))}
    wrong = [k for k in weights if k in own and weights[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(
            f"{k}: shape {tuple(weights[k].shape)} in {source}, {tuple(own[k].shape)} in the model built "
            "from the config (for text, set data.text.tokenizer to the tokenizer the model was trained with)"
        )
    unexpected = sorted(set(weights) - set(own))
    fresh = sorted(k for k in own if k not in weights)
    missing = [k for k in fresh if not k.startswith(tuple(allow_fresh))]
    if missing or unexpected:
        found = f"lacks {', '.join(missing[:5])}" if missing else f"has no place for {', '.join(unexpected[:5])}"
        raise ConfigError(f"{what}: the model built from the config {found} ({source})")
    model.load_state_dict(weights, strict=False)
    with torch.no_grad():
        for name, part in model.student_parts().items():
            model.teacher[name].load_state_dict(part.state_dict())
    return fresh


def load_encoder_weights(model: Data2Vec, pre: Pretrained) -> list[str]:
    """Continued pretraining: load `pre`'s front-end and encoder into `model`'s student (never its
    head or decoder, which stays as initialised), make the teacher a copy of the loaded student,
    and return the student keys left fresh (sorted; the head, and the 1.0 mask vector where the
    source lacks it). Errors are ConfigErrors naming the key (`init: ...` for missing or surplus
    weights)."""
    return load_student_weights(model, pre.student, pre.source, skip=("head.", "teacher."), what="init")


def build_model(pre: Pretrained) -> Data2Vec:
    """A model (eval mode) built from `pre.config` holding `pre`'s weights; the teacher is a copy of
    the student. Only `MAY_STAY_FRESH` weights may be missing from the source."""
    model = Data2Vec.from_config(pre.config)
    load_student_weights(model, pre.student, pre.source)
    return model.eval()


def load_model(source: str | Path, modality: str | None = None) -> Data2Vec:
    """`build_model(load_pretrained(source, modality))`."""
    return build_model(load_pretrained(source, modality))
