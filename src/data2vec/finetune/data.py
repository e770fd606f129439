"""The batches a fine-tuning model eats, from labelled examples (read by data/labelled.py)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data2vec.config import RunConfig
from data2vec.data import labelled
from data2vec.data.images import PretrainTransform, eval_transform
from data2vec.data.labelled import LabelledSet, Targets, load_text_tokenizer
from data2vec.data.text import wrap_document
from data2vec.finetune.config import FinetuneConfig
from data2vec.tokenizer import TextTokenizer

_TARGETS: dict[str, Targets] = {"audio_ctc": "transcript", "text_reg": "value"}


def load_tokenizer(cfg: FinetuneConfig, rcfg: RunConfig) -> TextTokenizer:
    """`cfg.tokenizer`, or else the one the pretrained model was trained with."""
    return load_text_tokenizer(rcfg, cfg.tokenizer or None)


def read_labelled(
    path: str | Path,
    cfg: FinetuneConfig,
    rcfg: RunConfig,
    classes: Sequence[str] | None = None,
    tokenizer: Any = None,
) -> LabelledSet:
    """The labelled examples in `path` for `cfg.task` (formats: data/labelled.py). `classes`:
    the training set's class names, so that an eval set maps names to the same indices."""
    return labelled.read_labelled(
        path,
        rcfg,
        modality=cfg.modality,
        targets=_TARGETS.get(cfg.task, "class"),
        classes=classes,
        tokenizer=tokenizer if tokenizer is not None else cfg.tokenizer or None,
        label_column=cfg.label_column,
        text_column=cfg.text_column,
        column=cfg.column,
    )


def _crop(wav: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    if size <= 0 or len(wav) <= size:
        return wav
    start = rng.randrange(len(wav) - size + 1)
    return wav[start : start + size]


class Batcher:
    """Turns example indices into model inputs for one modality."""

    def __init__(self, cfg: FinetuneConfig, rcfg: RunConfig, vocab: Sequence[str]) -> None:
        self.cfg, self.rcfg, self.vocab = cfg, rcfg, vocab
        icfg, d = rcfg.model.image, rcfg.data
        self.train_tf = PretrainTransform(
            icfg.image_size,
            icfg.channels,
            crop_scale=cfg.crop_scale,
            hflip=cfg.hflip,
            mean=d.mean,
            std=d.std,
        )
        tcfg = rcfg.model.text
        self.max_tokens = min(cfg.max_tokens or tcfg.max_positions, tcfg.max_positions)

    def inputs(
        self, data: LabelledSet, idx: Sequence[int], train: bool, rng: random.Random
    ) -> tuple[Tensor, Tensor | None]:
        modality = self.cfg.modality
        if modality == "image":
            icfg, d = self.rcfg.model.image, self.rcfg.data
            if train:
                nrng = np.random.default_rng(rng.getrandbits(32))
                return torch.stack([self.train_tf(data.load(i), nrng) for i in idx]), None
            return torch.stack(
                [eval_transform(data.load(i), icfg.image_size, icfg.channels, d.mean, d.std) for i in idx]
            ), None
        if modality == "audio":
            wavs = [data.load(i) for i in idx]
            if train:
                wavs = [_crop(w, self.cfg.max_sample_size, rng) for w in wavs]
            T = max(len(w) for w in wavs)
            x = torch.zeros(len(wavs), T)
            pad = torch.ones(len(wavs), T, dtype=torch.bool)
            for k, w in enumerate(wavs):
                x[k, : len(w)] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
                pad[k, : len(w)] = False
            return x, pad if bool(pad.any()) else None
        tcfg = self.rcfg.model.text
        seqs = [wrap_document(data.load(i), tcfg.bos_id, tcfg.eos_id, self.max_tokens) for i in idx]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), tcfg.pad_id, dtype=torch.long)
        for k, s in enumerate(seqs):
            ids[k, : len(s)] = torch.tensor(s, dtype=torch.long)
        return ids, None

    def length(self, data: LabelledSet, i: int) -> int:
        return 1 if self.cfg.modality == "image" else len(data.load(i))


def index_batches(n: int, batch_size: int, rng: random.Random | None) -> Iterator[list[int]]:
    order = list(range(n))
    if rng is not None:
        rng.shuffle(order)
    for k in range(0, n, batch_size):
        yield order[k : k + batch_size]
