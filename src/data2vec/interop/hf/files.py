"""Reading and writing transformers folders: `load_hf` reads config.json and the weights
(safetensors, sharded safetensors, or `pytorch_model.bin` loaded with `weights_only=True`; a hub id
is downloaded first) into an `HFImport`, and `save_hf` writes a data2vec 1.0 model (with its head,
if it has one) as a folder `transformers.Data2Vec*Model.from_pretrained` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from data2vec.config import ConfigError
from data2vec.interop.common import InteropError, read_json, read_safetensors, tensors_for_saving, write_folder
from data2vec.interop.hf.config import exportable, hf_config, model_config, run_config
from data2vec.interop.hf.head import HFHead, HFImport
from data2vec.interop.hf.tables import BARE, DERIVED, HEAD_KINDS, HEAD_OUTPUT, MODEL_TYPE, NOT_CARRIED, PREFIX
from data2vec.interop.hf.weights import split_backbone, to_ours, to_theirs
from data2vec.model import Data2Vec


def _download(repo_id: str) -> Path:
    """A hub repository's config and weights in the local cache (downloaded if need be)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InteropError(
            f"{repo_id}: not a local folder, and downloading from the Hugging Face hub needs huggingface_hub "
            "(pip install 'data2vec[hf]')"
        ) from None
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated, ...: fall back to the local cache
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:
            pass
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InteropError(
            f"{repo_id}: not a local folder, and the Hugging Face hub download failed ({type(e).__name__}: {msg}). "
            f"Offline? Fetch it where the hub is reachable (`hf download {repo_id} --local-dir DIR`) and pass DIR."
        ) from None


def _load_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a transformers folder, by its transformers name."""
    from data2vec.checkpoint import CheckpointError, safe_torch_load

    def shards(index_name: str) -> list[Path]:
        index = read_json(folder / index_name)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InteropError(f"{folder / index_name}: weight_map: expected an object of file names")
        return [folder / name for name in sorted(set(weight_map.values()))]

    out: dict[str, Tensor] = {}
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    if (folder / "model.safetensors.index.json").is_file():
        for shard in shards("model.safetensors.index.json"):
            out.update(read_safetensors(shard))
        return out
    bins = []
    if (folder / "pytorch_model.bin").is_file():
        bins = [folder / "pytorch_model.bin"]
    elif (folder / "pytorch_model.bin.index.json").is_file():
        bins = shards("pytorch_model.bin.index.json")
    if not bins:
        raise InteropError(f"{folder}: no model.safetensors or pytorch_model.bin")
    for b in bins:
        try:
            sd = safe_torch_load(b)
        except (CheckpointError, FileNotFoundError) as e:
            raise InteropError(str(e)) from None
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise InteropError(f"{b}: expected a flat dict of tensors")
        out.update(sd)
    return out


def load_hf(path: str | Path) -> HFImport:
    """Read a transformers data2vec checkpoint: a local folder or a hub id (downloaded when the
    string is not an existing path)."""
    folder = Path(path)
    if not folder.exists():
        folder = _download(str(path))
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InteropError(f"{folder}: no config.json")
    hf = read_json(config_path)
    _modality(hf, folder)  # the model type first: a non-data2vec folder is named before its weights are read
    return hf_import(hf, _load_weights(folder), str(path), config_path)


def _modality(hf: dict[str, Any], where: str | Path) -> str:
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPE:
        raise InteropError(
            f"{where}: model_type {model_type!r} is not a data2vec model ({', '.join(sorted(MODEL_TYPE))})"
        )
    return MODEL_TYPE[model_type]


def hf_import(
    hf: dict[str, Any], weights: dict[str, Tensor], source: str, config_name: str | Path = "config.json"
) -> HFImport:
    """A transformers data2vec checkpoint already in memory (its config.json as a dict and its
    state dict) in our terms; `load_hf` reads the two from a folder. Errors name `source` (and the
    config's file name)."""
    modality = _modality(hf, source)
    try:
        model = model_config(hf, modality)
        cfg = run_config(model)
        architecture = _architecture(hf, modality)
    except InteropError as e:
        raise InteropError(f"{config_name}: {e}") from None
    except ConfigError as e:
        raise InteropError(f"{source}: the config maps to an invalid model: {e}") from None
    backbone, head_weights = split_backbone(weights, modality)
    state = to_ours(backbone, model)
    head = _head(architecture, head_weights, hf, modality)
    return HFImport(cfg, state, head, hf, source)


def _architecture(hf: dict[str, Any], modality: str) -> str:
    """The checkpoint's class (`architectures[0]`), the bare model's without one. InteropError if
    `architectures` or `id2label` (read by `_head`) has the wrong shape."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise InteropError(f"architectures: expected a list of class names, got {archs!r}")
    labels = hf.get("id2label") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and k.strip().isdigit() for k in labels):
        raise InteropError(f"id2label: expected an object with integer keys, got {labels!r}")
    return archs[0] if archs else BARE[modality]


def _head(architecture: str, weights: dict[str, Tensor], hf: dict[str, Any], modality: str) -> HFHead:
    """The head description of a checkpoint: its kind, labels, weights and carried config keys."""
    kind = HEAD_KINDS.get(architecture)
    if kind is None:
        if not weights:
            kind = "none"
        elif all(k.startswith("pooler.") for k in weights):
            kind = "pooler"
        else:
            kind = "other"
    out_weight = HEAD_OUTPUT.get(kind)
    if out_weight is not None and out_weight not in weights:
        raise InteropError(f"{architecture}: the checkpoint lacks {out_weight}")
    id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
    num_labels = int(weights[out_weight].shape[0]) if out_weight else (len(id2label) or None)
    config = {
        k: v for k, v in hf.items() if k not in DERIVED[modality] and k not in NOT_CARRIED and not k.startswith("_")
    }
    return HFHead(architecture, kind, num_labels, id2label, dict(weights), config)


def save_hf(model: Data2Vec, out_dir: str | Path, head: HFHead | None = None) -> Path:
    """Write a data2vec 1.0 model as a transformers folder (config.json + model.safetensors).

    Without `head`: a bare `Data2Vec{Vision,Audio,Text}Model`. With one (from `load_hf`): its
    architecture, weights and carried config keys, the backbone under `data2vec_*.` as transformers
    expects for task models. Our pretraining regression head is not written (transformers has none).
    """
    problems = exportable(model)
    if problems:
        raise InteropError("cannot write this model for transformers: " + "; ".join(problems))
    m = model.cfg
    if m.modality == "audio" and m.audio.pos_conv_zero_padding == "each_layer" and m.audio.pos_conv_depth > 1:
        import warnings

        warnings.warn(
            "audio.pos_conv_zero_padding='each_layer': transformers zeroes padded frames only before the first "
            "positional conv layer, so padded batches give slightly different outputs there (unpadded inputs "
            "are identical)",
            stacklevel=2,
        )
    config = hf_config(m, head)
    weights = to_theirs(model, config)
    bare = head is None or head.architecture == BARE[m.modality]
    if not bare:
        weights = {PREFIX[m.modality] + k: v for k, v in weights.items()}
    if head is not None:
        for k, v in head.weights.items():
            under_backbone = k.startswith("pooler.") and not bare
            weights[(PREFIX[m.modality] + k) if under_backbone else k] = v
    tensors = tensors_for_saving(weights)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_folder(out_dir, write)
