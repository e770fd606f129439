"""Inputs for feature extraction and probes, as lazily loaded `EvalItem`s.

`read_inputs` reads a file or folder with the library's loaders: images resized to the model's
size and normalised with the run's mean/std; speech resampled and normalised per utterance as
in training; text tokenised with the run's tokenizer, one document per line or per file as
`data.text.document` says, with <s> ... </s> around each and cut to the model's maximum length.

`labelled_items` prepares a `LabelledSet` (data/labelled.py) the same way, for probes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data2vec.config import RunConfig
from data2vec.data.audio import (
    AUDIO_EXTENSIONS,
    find_audio_files,
    header_length,
    load_audio,
    normalize_waveform,
    read_manifest,
    table_waveform,
)
from data2vec.data.batch import EvalItem
from data2vec.data.errors import BadInputError
from data2vec.data.images import IMAGE_EXTENSIONS, decode_image, eval_transform, open_image_source
from data2vec.data.labelled import LabelledSet, load_text_tokenizer
from data2vec.data.tables import RowSpec, TableRows, is_table_path
from data2vec.data.text import list_text_files, read_documents, wrap_document
from data2vec.modalities.audio import conv_output_length


def _same(x: Tensor) -> Tensor:
    return x


def _then(read: Callable[[], Any], prepare: Callable[[Any], Tensor]) -> Tensor:
    return prepare(read())


def _image_tensor(cfg: RunConfig, img: Any) -> Tensor:
    icfg = cfg.model.image
    return eval_transform(img, icfg.image_size, icfg.channels, cfg.data.mean, cfg.data.std)


def _text_tensor(cfg: RunConfig, ids: Any) -> Tensor:
    t = cfg.model.text
    return torch.tensor(wrap_document(ids, t.bos_id, t.eos_id, t.max_positions), dtype=torch.long)


def image_items(cfg: RunConfig, path: Path) -> list[EvalItem]:
    """An image file, or every image of a folder or tar shards. JPEGs are decoded at a reduced
    scale no smaller than the model's input, and images over data.max_image_pixels are refused
    (`decode_image`)."""
    prepare = partial(_image_tensor, cfg)
    size, limit = cfg.model.image.image_size, cfg.data.max_image_pixels
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        load = partial(decode_image, str(path), str(path), min_size=size, max_pixels=limit)
        return [EvalItem(str(path), 1, partial(_then, load, prepare))]
    source = open_image_source(str(path), on_bad_input="fail", min_size=size, max_pixels=limit, column=cfg.data.column)
    return [EvalItem(source.name(i), 1, partial(_then, partial(source.load, i), prepare)) for i in range(len(source))]


def _load_clip(cfg: RunConfig, f: Path) -> Tensor:
    return _ready_clip(cfg, load_audio(f, cfg.data.audio.sample_rate), str(f))


def _ready_clip(cfg: RunConfig, wav: np.ndarray, where: str) -> Tensor:
    acfg = cfg.data.audio
    if conv_output_length(len(wav), cfg.model.audio.conv_layers) < 1:
        raise BadInputError(where, f"too short: {len(wav)} samples give no frame")
    if acfg.normalize:
        wav = normalize_waveform(wav)
    return torch.from_numpy(wav.copy())


def _table_clip(cfg: RunConfig, rows: TableRows, index: int) -> Tensor:
    wav = table_waveform(rows, index, cfg.data.audio.sample_rate)
    return _ready_clip(cfg, wav, rows.name(index))


def table_audio_items(cfg: RunConfig, path: Path) -> list[EvalItem]:
    """Every row of a parquet/arrow audio column (data/tables.py), read a row group at a time.
    Each clip's length (for batching by length) is learned by decoding it once now."""
    rows = TableRows(str(path), RowSpec("audio", cfg.data.column))
    rows.cache_groups = 1
    rate = cfg.data.audio.sample_rate
    return [
        EvalItem(rows.name(i), len(table_waveform(rows, i, rate)), partial(_table_clip, cfg, rows, i))
        for i in range(len(rows))
    ]


def audio_items(cfg: RunConfig, path: Path) -> list[EvalItem]:
    """An audio file, every audio file under a folder, the files a manifest lists, or the rows of
    parquet/arrow files."""
    if is_table_path(path, AUDIO_EXTENSIONS):
        return table_audio_items(cfg, path)
    if path.is_dir():
        files = find_audio_files(path)
    elif path.suffix.lower() in AUDIO_EXTENSIONS:
        files = [path]
    else:
        files = [f for f, _ in read_manifest(path)]
        if not files:
            raise ValueError(f"{path}: the manifest lists no audio files")
    rate = cfg.data.audio.sample_rate
    return [EvalItem(str(f), header_length(f, rate), partial(_load_clip, cfg, f)) for f in files]


def text_items(cfg: RunConfig, path: Path, tokenizer: str | Path | None = None) -> tuple[list[EvalItem], int]:
    """The documents of a text file or folder, tokenised, and how many were cut to fit."""
    tok = load_text_tokenizer(cfg, tokenizer)
    limit = cfg.model.text.max_positions - 2
    items: list[EvalItem] = []
    truncated = 0
    for f in list_text_files(path):
        docs = list(read_documents(f, cfg.data.text, column=cfg.data.column))
        single = len(docs) == 1 and cfg.data.text.document == "file"
        for k, ids in enumerate(tok.encode_batch(docs), start=1):
            truncated += len(ids) > limit
            seq = _text_tensor(cfg, ids)
            items.append(EvalItem(str(f) if single else f"{f}#{k}", len(seq), partial(_same, seq)))
    return items, truncated


def check_exists(path: Path) -> None:
    """FileNotFoundError unless `path` exists or is a glob of parquet/arrow files that matches."""
    if not path.exists() and not (any(c in str(path) for c in "*?[") and is_table_path(path)):
        raise FileNotFoundError(f"{path}: no such file or folder")


def read_inputs(cfg: RunConfig, path: str | Path, tokenizer: str | Path | None = None) -> list[EvalItem]:
    """The inputs in a file or folder, for the model `cfg` describes (see the module doc); a
    file that cannot be used raises `BadInputError` naming it (when it is read)."""
    p = Path(path)
    check_exists(p)
    modality = cfg.model.modality
    if modality == "image":
        return image_items(cfg, p)
    if modality == "audio":
        return audio_items(cfg, p)
    items, truncated = text_items(cfg, p, tokenizer)
    if truncated:
        warnings.warn(
            f"{truncated} document(s) longer than the model's {cfg.model.text.max_positions} positions were cut",
            stacklevel=2,
        )
    return items


def prepare_example(cfg: RunConfig, raw: Any) -> Tensor:
    """One raw labelled example (`LabelledSet.load`) as the model's input: an image at the
    model's size, normalised; a float32 waveform; or <s> ids </s>, cut to the model's length."""
    modality = cfg.model.modality
    if modality == "image":
        return _image_tensor(cfg, raw)
    if modality == "audio":
        return torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
    return _text_tensor(cfg, raw)


def _load_example(cfg: RunConfig, data: LabelledSet, i: int) -> Tensor:
    return prepare_example(cfg, data.load(i))


def labelled_items(
    cfg: RunConfig, data: LabelledSet, limit: int | None = None, *, preload: bool = False
) -> list[EvalItem]:
    """The first `limit` examples of `data` (all by default) as extraction inputs. With `preload`
    every example is read and prepared now (a probe that extracts them many times); otherwise
    when it is extracted (audio and text are read once now, for their lengths)."""
    n = len(data) if limit is None else min(len(data), limit)
    image = cfg.model.modality == "image"
    items = []
    for i in range(n):
        name = f"{data.name} {i}" if data.name else str(i)
        if preload:
            x = _load_example(cfg, data, i)
            items.append(EvalItem(name, 1 if image else int(x.shape[0]), partial(_same, x)))
        else:
            length = 1 if image else int(_load_example(cfg, data, i).shape[0])
            items.append(EvalItem(name, length, partial(_load_example, cfg, data, i)))
    return items
