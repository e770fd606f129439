"""Getting weights in and out: our pretrained-model folder, transformers and fairseq checkpoints.

Our pretrained-model folder (`save_pretrained` / `load_pretrained`, `data2vec convert`):

    config.json          the fully resolved RunConfig (what `RunConfig.load` reads)
    model.safetensors    the student's weights in this library's names (front-end, encoder, head)
    hf_head.safetensors  optional: a task head that came with a transformers checkpoint
    hf_head.json         optional: its description (kind, architecture, labels, config keys)

It is self-describing (the config says which model to build) and loads without unpickling.
The teacher is not stored: a loaded model's teacher starts as a copy of the student, as a
freshly built model's does.

`load_source` reads any of: such a folder, a training checkpoint (`RUN/checkpoints/step_N`)
or a run directory (its newest checkpoint that verifies), a transformers folder or hub id
(`data2vec.interop.hf`), or a fairseq checkpoint (`data2vec.interop.fairseq`, when present).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal

from safetensors.torch import load_file, save_file
from torch import Tensor

from data2vec.checkpoint import replace_folder
from data2vec.config import ConfigError, DataConfig, RunConfig

if TYPE_CHECKING:
    from data2vec.interop.hf import HFHead
    from data2vec.model import Data2Vec

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
HEAD_WEIGHTS = "hf_head.safetensors"
HEAD_JSON = "hf_head.json"
_OWN_FILES = {CONFIG, WEIGHTS, HEAD_WEIGHTS, HEAD_JSON}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

SourceKind = Literal["data2vec", "checkpoint", "transformers", "fairseq"]


class InteropError(ValueError):
    """A checkpoint cannot be read, or a model cannot be written in the requested format."""


@dataclass
class Source:
    """A model read from anywhere: our config, weights in our names, and where it came from."""

    config: RunConfig
    state_dict: dict[str, Tensor]
    """Student weights in this library's key names (`frontend.*`, `encoder.*`, maybe `head.*`)."""
    kind: SourceKind
    path: str
    head: HFHead | None = None
    """What a transformers checkpoint held beyond the backbone (task head, labels), if any."""

    def build_model(self) -> Data2Vec:
        return build_model(self.config, self.state_dict)


# ----------------------------------------------------------------------------- building


def build_model(cfg: RunConfig, state_dict: dict[str, Tensor]) -> Data2Vec:
    """A `Data2Vec` in eval mode holding `state_dict` (student weights in our names); the teacher
    is a copy of the loaded student. Weights the source lacks keep their initial values only
    where that is harmless: the pretraining head (`head.*`) and the 1.0 mask vector."""
    from data2vec.model import Data2Vec
    from data2vec.teacher import EMATeacher

    model = Data2Vec.from_config(cfg)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise InteropError(f"weights do not fit the configured model: {e}") from None
    missing = [k for k in missing if not k.startswith(("teacher.", "head.")) and k != "frontend.context.mask_emb"]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        raise InteropError(f"weights do not fit the configured model: {'; '.join(parts)}")
    model.teacher = EMATeacher(model.student_parts())
    return model.eval()


# ----------------------------------------------------------------------------- our folder


def write_folder(out_dir: str | Path, write: Callable[[Path], None], replaceable: set[str] | None = None) -> Path:
    """Create `out_dir` atomically: `write(tmp)` fills a temporary sibling folder, which is then
    renamed into place. An existing `out_dir` is replaced only if it is empty or holds nothing but
    files named in `replaceable` (a previous export); anything else raises FileExistsError."""
    out = Path(out_dir)
    allowed = _OWN_FILES if replaceable is None else replaceable
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        others = sorted(p.name for p in out.iterdir() if p.name not in allowed)
        if others:
            raise FileExistsError(f"{out} exists and holds other files ({', '.join(others[:5])}); give a new folder")
    replace_folder(out, write)
    return out


def tensors_for_saving(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies: safetensors refuses tensors that share storage."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def model_run_config(model: Data2Vec) -> RunConfig:
    """A valid RunConfig for a bare model: its own sections, default optimiser/training settings
    and data settings adjusted to the model (channel count, text block size)."""
    m = model.cfg
    data = DataConfig()
    if m.modality == "image" and m.image.channels != len(data.mean):
        data = replace(data, mean=(0.5,) * m.image.channels, std=(0.5,) * m.image.channels)
    if m.modality == "text":
        data = replace(data, text=replace(data.text, block_size=min(data.text.block_size, m.text.max_positions)))
    base = RunConfig(masking=model.masking, teacher=model.teacher_cfg, targets=model.target_cfg, loss=model.loss_cfg)
    return replace(base, model=m, data=data)


def save_pretrained(
    model: Data2Vec, out_dir: str | Path, head: HFHead | None = None, config: RunConfig | None = None
) -> Path:
    """Write `model` (student weights + resolved RunConfig) as our self-describing folder. `config`
    is the run's full config when known (its model section must be the model's); otherwise one
    is made from the model's own sections (`model_run_config`)."""
    if config is not None and config.model != model.cfg:
        raise InteropError("config.model does not describe this model")
    cfg = config or model_run_config(model)
    weights = tensors_for_saving(model.student_state_dict())

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt", "data2vec": "pretrained"})
        if head is not None:
            save_file(tensors_for_saving(head.weights), str(tmp / HEAD_WEIGHTS), metadata={"format": "pt"})
            (tmp / HEAD_JSON).write_text(json.dumps(head.describe(), indent=2) + "\n")
        (tmp / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    return write_folder(out_dir, write)


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InteropError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a JSON object")
    return data


def _run_config(data: dict[str, object], where: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(data)
    except ConfigError as e:
        raise InteropError(f"{where}: {e}") from None


def _load_own_folder(path: Path) -> Source:
    cfg = _run_config(_read_json(path / CONFIG), path / CONFIG)
    if not (path / WEIGHTS).is_file():
        raise InteropError(f"{path}: no {WEIGHTS}")
    head = None
    if (path / HEAD_JSON).is_file():
        from data2vec.interop.hf import HFHead

        weights = load_file(str(path / HEAD_WEIGHTS)) if (path / HEAD_WEIGHTS).is_file() else {}
        head = HFHead.from_description(_read_json(path / HEAD_JSON), weights)
    return Source(cfg, load_file(str(path / WEIGHTS)), "data2vec", str(path), head)


def _load_training_checkpoint(path: Path) -> Source:
    from data2vec.checkpoint import verify_checkpoint

    problem = verify_checkpoint(path)
    if problem is not None:
        raise InteropError(f"{path}: {problem}")
    cfg = _run_config(_read_json(path / "config.json"), path / "config.json")
    return Source(cfg, load_file(str(path / "student.safetensors")), "checkpoint", str(path))


def _latest_checkpoint(run_dir: Path) -> Path:
    from data2vec.checkpoint import list_checkpoints, verify_checkpoint

    found = list_checkpoints(run_dir)
    for ckpt in reversed(found):
        if verify_checkpoint(ckpt) is None:
            return ckpt
    raise InteropError(f"{run_dir}: no checkpoint that verifies" + (f" (of {len(found)})" if found else ""))


def fairseq_module() -> ModuleType | None:
    """`data2vec.interop.fairseq` if it is installed (it is developed separately), else None."""
    try:
        return importlib.import_module("data2vec.interop.fairseq")
    except ModuleNotFoundError as e:
        if e.name == "data2vec.interop.fairseq":
            return None
        raise


def load_source(src: str | Path) -> Source:
    """Read a model from any supported place (see the module doc)."""
    path = Path(src)
    if path.is_dir():
        if (path / CONFIG).is_file():
            data = _read_json(path / CONFIG)
            if "model_type" in data:
                from data2vec.interop.hf import load_hf

                return load_hf(path).as_source()
            if (path / "manifest.json").is_file() and (path / "student.safetensors").is_file():
                return _load_training_checkpoint(path)
            if "model" in data and not (path / "checkpoints").is_dir():
                return _load_own_folder(path)
        if (path / "checkpoints").is_dir():  # a run directory (its config.json is the run's)
            return _load_training_checkpoint(_latest_checkpoint(path))
    fs = fairseq_module()
    if path.exists() and fs is not None and fs.is_fairseq_checkpoint(path):
        cfg, sd = fs.load_fairseq(path)
        return Source(cfg, dict(sd), "fairseq", str(path))
    if path.exists():
        raise InteropError(
            f"{path}: not a model this library reads (our pretrained folder, a training checkpoint or run "
            "directory, a transformers folder with config.json"
            + (", or a fairseq checkpoint)" if fs is not None else "; fairseq support is not installed)")
        )
    if _HUB_ID.match(str(src)):
        from data2vec.interop.hf import load_hf

        return load_hf(str(src)).as_source()
    raise FileNotFoundError(f"{src}: no such file or folder")


def load_pretrained(src: str | Path) -> Data2Vec:
    """A ready model (eval mode) from any source `load_source` reads."""
    return load_source(src).build_model()


def convert(src: str | Path, dst: str | Path, to: Literal["data2vec", "hf"] = "data2vec") -> tuple[Path, Source]:
    """Read `src` (any supported source) and write it to `dst` in our format or transformers'."""
    source = load_source(src)
    model = source.build_model()
    if to == "hf":
        from data2vec.interop.hf import save_hf

        return save_hf(model, dst, source.head), source
    return save_pretrained(model, dst, source.head, config=source.config), source
