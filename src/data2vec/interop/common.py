"""What the interop readers and writers share: the error they raise, our pretrained-model
folder's file names and its writer (`save_pretrained`), the readers of JSON and safetensors files
that name the file in their errors (`read_json`, `read_safetensors`), and the helpers that write a
folder atomically (`write_folder`, `tensors_for_saving`).

`data2vec.interop.hf` and `data2vec.interop.fairseq` import from here, never from the package
`data2vec.interop`; reading any source, our folder included, is `data2vec.pretrained`'s job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from data2vec.checkpoint import replace_folder
from data2vec.config import DataConfig, RunConfig

if TYPE_CHECKING:
    from data2vec.interop.hf.head import HFHead
    from data2vec.model import Data2Vec

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
HEAD_WEIGHTS = "hf_head.safetensors"
HEAD_JSON = "hf_head.json"
OWN_FILES = frozenset({CONFIG, WEIGHTS, HEAD_WEIGHTS, HEAD_JSON})
"""The files of our pretrained-model folder (a previous export may be replaced)."""


class InteropError(ValueError):
    """A checkpoint cannot be read, or a model cannot be written in the requested format."""


def read_json(path: Path) -> dict[str, object]:
    """A JSON object from `path`; InteropError naming the file if it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a JSON object")
    return data


def read_safetensors(path: Path, error: type[Exception] = InteropError) -> dict[str, Tensor]:
    """The tensors of a safetensors file; `error` naming the file if it is torn or not safetensors."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"{path}: not a readable safetensors file ({detail})") from None


def write_folder(
    out_dir: str | Path, write: Callable[[Path], None], replaceable: set[str] | frozenset[str] | None = None
) -> Path:
    """Create `out_dir` atomically: `write(tmp)` fills a temporary sibling folder, which is then
    renamed into place. An existing `out_dir` is replaced only if it is empty or holds nothing but
    files named in `replaceable` (a previous export); anything else raises FileExistsError."""
    out = Path(out_dir)
    allowed = OWN_FILES if replaceable is None else replaceable
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        others = sorted(p.name for p in out.iterdir() if p.name not in allowed)
        if others:
            raise FileExistsError(f"{out} exists and holds other files ({', '.join(others[:5])}); give a new folder")
    replace_folder(out, write, "an exported model")
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
