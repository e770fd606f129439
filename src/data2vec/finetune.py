"""Supervised fine-tuning of a pretrained encoder (SPEC section 4).

    from data2vec.finetune import finetune, finetune_preset
    cfg = finetune_preset("image_cls", epochs=10)
    result = finetune("runs/cifar", cfg, "train_images/", "test_images/", "runs/cifar-ft")
    result.best_metric, result.best_epoch

Tasks (`FinetuneConfig.task`):

- `image_cls`: mean over the patch tokens (CLS excluded) -> LayerNorm -> Linear, with
  layer-wise lr decay, drop-path, mixup/cutmix and label smoothing; metric: accuracy.
- `audio_cls`: mean over the valid frames -> LayerNorm -> Linear; metric: accuracy.
  (`head_norm="batch"`: BatchNorm without affine in place of the LayerNorm, both tasks.)
- `audio_ctc`: a Linear per frame over letters (`|` between words, blank = 0), CTC loss with
  the CNN frozen and time/channel masking kept on while training (v1 replaces masked frames
  by the learned mask vector, v2 by N(0, 0.01) noise); greedy decoding; metrics: CER (used to
  pick the best epoch) and WER.
- `text_cls`: first token -> Linear(D, D) -> tanh -> Linear(D, classes) (RoBERTa head,
  dropout 0); metric: accuracy.
- `text_reg`: the same head with one output and a mean-squared-error loss (STS-style);
  metric: Pearson correlation.

Optimiser: AdamW with warm-up + cosine per step, no weight decay on 1-D parameters; every
parameter group carries a layer-wise lr scale (`layer_decay`; BEiT grouping: front-end and
prefix tokens are layer 0, block i is layer i, the head is layer L + 1). The model is
evaluated after every epoch; the best epoch by the eval metric is kept in `OUT/best/`
(`model.safetensors`, `config.json` = the pretrained RunConfig, `finetune.json` = this config,
the classes or letters and the metric), written atomically. `OUT/metrics.jsonl` holds a line
per logged step and one per epoch (`eval_<metric>`), `OUT/metrics.png` plots them.

Labelled data (see `read_labelled`):

- images: a folder with one subfolder per class, or tar shards with `<key>.cls` labels;
- audio: a folder with one subfolder per class, or a TSV manifest with a header line, a path
  column (`path`, `file`, `audio` or `id`; relative to the manifest's folder, a suffix-less id
  is looked up as `<id>.wav/.flac/.ogg` there or in `flac/`, `wav/`, `wavs/`) and a label
  column (`label`) or a transcript column (`transcript`, `text`, `sentence`);
- text: a TSV with a header line or a JSONL file, with a text column (`sentence` or `text` by
  default) and a `label` column (an integer or a class name; a number for `text_reg`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.config import ConfigError, RunConfig, from_dict, to_dict
from data2vec.modalities.base import Tokens
from data2vec.model import Data2Vec, no_weight_decay, trunc_normal_
from data2vec.schedules import cosine_lr

Task = Literal["image_cls", "audio_cls", "audio_ctc", "text_cls", "text_reg"]
TASKS: tuple[str, ...] = ("image_cls", "audio_cls", "audio_ctc", "text_cls", "text_reg")
TASK_MODALITY = {
    "image_cls": "image",
    "audio_cls": "audio",
    "audio_ctc": "audio",
    "text_cls": "text",
    "text_reg": "text",
}


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run; saved in `OUT/best/finetune.json`."""

    task: Task = "image_cls"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    """Peak learning rate (of the head; blocks get lr x layer_decay^(L + 1 - layer))."""
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    """Share of all steps spent warming up linearly."""
    layer_decay: float = 1.0
    """Layer-wise lr decay; 1 = the same lr everywhere."""
    drop_path: float = 0.0
    """Stochastic depth of the encoder (max rate, linear over the blocks)."""
    layerdrop: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    """Mixup Beta(alpha, alpha); 0 = off (images)."""
    cutmix: float = 0.0
    """CutMix Beta(alpha, alpha); 0 = off (images)."""
    mix_prob: float = 1.0
    """Share of batches mixed when mixup or cutmix is on."""
    mix_switch_prob: float = 0.5
    """With both on: probability of cutmix instead of mixup for a batch."""
    crop_scale: tuple[float, float] = (0.35, 1.0)
    """Training images: RandomResizedCrop area range (1, 1 = no crop); plus a horizontal flip."""
    hflip: bool = True
    clip_grad: float = 0.0
    head_norm: Literal["layer", "batch"] = "layer"
    """Classification heads on pooled features (image_cls, audio_cls): LayerNorm, or "batch":
    BatchNorm without affine (each feature standardised over the batch, as in MAE's linear
    probe), which lets the head use small differences between clips whose pooled features
    share a large common part."""
    freeze_cnn: bool = True
    """Audio: keep the CNN feature extractor frozen (feature_grad_mult 0)."""
    freeze_encoder_steps: int = 0
    """Only the head trains for this many first steps (fairseq freeze_finetune_updates)."""
    mask_prob: float = 0.0
    """Audio: share of frames that start a time-mask span while training (0 = off)."""
    mask_length: int = 10
    mask_channel_prob: float = 0.0
    """Audio: share of channels that start a channel-mask span while training (0 = off)."""
    mask_channel_length: int = 64
    max_sample_size: int = 0
    """Audio training clips are randomly cropped to this many samples; 0 = whole clips."""
    max_tokens: int = 0
    """Text: tokens per sequence including <s> and </s>; 0 = the model's maximum."""
    text_column: str = ""
    """TSV/JSONL text column; empty = `sentence` or `text`, whichever exists."""
    label_column: str = "label"
    tokenizer: str = ""
    """Text: tokenizer.json or folder; empty = the one the pretrained model was trained with."""
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        _check(self.task in TASKS, "task", f"{self.task!r} is not one of {', '.join(TASKS)}")
        for name in ("epochs", "batch_size", "log_every", "mask_length", "mask_channel_length"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.lr > 0, "lr", "must be positive")
        _check(0 <= self.min_lr <= self.lr, "min_lr", "must be in [0, lr]")
        _check(all(0 <= b < 1 for b in self.betas), "betas", "must be in [0, 1)")
        _check(self.eps > 0, "eps", "must be positive")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(0 <= self.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)")
        _check(0 < self.layer_decay <= 1, "layer_decay", "must be in (0, 1]")
        for name in ("drop_path", "layerdrop", "label_smoothing", "mask_prob", "mask_channel_prob"):
            _check(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        for name in ("mixup", "cutmix", "clip_grad"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("mix_prob", "mix_switch_prob"):
            _check(0 <= getattr(self, name) <= 1, name, "must be in [0, 1]")
        lo, hi = self.crop_scale
        _check(0 < lo <= hi <= 1, "crop_scale", "must satisfy 0 < min <= max <= 1")
        for name in ("freeze_encoder_steps", "max_sample_size", "max_tokens"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(self.max_tokens == 0 or self.max_tokens >= 3, "max_tokens", "must be 0 or >= 3")
        _check(bool(self.label_column), "label_column", "must not be empty")
        _check(self.head_norm in ("layer", "batch"), "head_norm", f"{self.head_norm!r} is not 'layer' or 'batch'")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            f"{self.device!r} is not 'auto', 'cpu' or 'cuda[:N]'",
        )

    @property
    def modality(self) -> str:
        return TASK_MODALITY[self.task]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = to_dict(self)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return from_dict(cls, data)


FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    # SPEC 4.1 (v2 base): layer decay 0.65, drop-path 0.1, mixup 0.8 / cutmix 1.0, smoothing 0.1.
    "image_cls": dict(
        lr=1e-3,
        betas=(0.9, 0.95),
        weight_decay=0.05,
        layer_decay=0.65,
        drop_path=0.1,
        label_smoothing=0.1,
        mixup=0.8,
        cutmix=1.0,
        mix_prob=0.9,
    ),
    "audio_cls": dict(lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01, layer_decay=0.75, mask_prob=0.2, mask_length=5),
    # SPEC 4.2: CNN frozen, time masks 0.65 x 10, channel masks 0.25 x 64, Adam (0.9, 0.98).
    "audio_ctc": dict(
        lr=5e-5,
        betas=(0.9, 0.98),
        weight_decay=0.0,
        mask_prob=0.65,
        mask_length=10,
        mask_channel_prob=0.25,
        mask_channel_length=64,
        layerdrop=0.1,
    ),
    # SPEC 4.3: Adam (0.9, 0.98), eps 1e-6, weight decay 0.1, 6% warm-up, lr 2e-5, 10 epochs.
    "text_cls": dict(lr=2e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, warmup_fraction=0.06),
    "text_reg": dict(lr=4e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, warmup_fraction=0.06, batch_size=16),
}


def finetune_preset(task: str, **changes: Any) -> FinetuneConfig:
    """The recipe for `task` (SPEC section 4) with `changes` applied."""
    if task not in FINETUNE_PRESETS:
        raise ConfigError(f"task: {task!r} is not one of {', '.join(TASKS)}")
    return FinetuneConfig(task=task, **{**FINETUNE_PRESETS[task], **changes})  # type: ignore[arg-type]


# ============================================================================ labelled data


@dataclass
class LabelledSet:
    """`n` labelled examples: `load(i)` gives example i raw (a PIL image, a float32 waveform at
    the model's rate, already normalised, or a list of token ids without <s>/</s>); `targets[i]`
    is a class index, a float (regression) or a transcript."""

    load: Callable[[int], Any]
    targets: list[Any]
    classes: list[str] = field(default_factory=list)
    name: str = ""

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, indices: Sequence[int]) -> LabelledSet:
        idx = [int(i) for i in indices]
        load = self.load
        return LabelledSet(lambda i: load(idx[i]), [self.targets[i] for i in idx], self.classes, self.name)


def _image_set(path: str, on_bad_input: str = "fail") -> LabelledSet:
    from data2vec.data.images import ImageFolderSource, open_image_source

    source = open_image_source(path, on_bad_input=on_bad_input)
    labels = [source.label(i) for i in range(len(source))]
    if any(lab is None for lab in labels):
        raise ValueError(f"{path}: unlabelled images (use a folder with one subfolder per class, or .cls in tars)")
    classes = source.classes if isinstance(source, ImageFolderSource) else []
    if not classes:
        classes = [str(c) for c in range(max(int(lab or 0) for lab in labels) + 1)]
    return LabelledSet(source.load, [int(lab or 0) for lab in labels], classes, path)


def _audio_loader(files: list[Path], sample_rate: int, normalize: bool) -> Callable[[int], np.ndarray]:
    from data2vec.data.audio import load_audio, normalize_waveform

    def load(i: int) -> np.ndarray:
        wav = load_audio(files[i], sample_rate)
        return normalize_waveform(wav) if normalize else wav

    return load


def _read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a TSV with a header line, or of a JSONL file (values as strings)."""
    rows: list[dict[str, str]] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {lineno}: not JSON ({e})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}: line {lineno}: expected a JSON object")
                rows.append({k: str(v) for k, v in rec.items()})
        return rows
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: empty file")
    header = [h.strip() for h in lines[0].split("\t")]
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) < len(header):
            raise ValueError(f"{path}: line {lineno}: {len(parts)} columns, the header has {len(header)}")
        rows.append({h: parts[k].strip() for k, h in enumerate(header)})
    return rows


def _column(rows: list[dict[str, str]], path: Path, wanted: Sequence[str], what: str) -> str:
    have = list(rows[0]) if rows else []
    for name in wanted:
        if name in have:
            return name
    raise ValueError(f"{path}: no {what} column (looked for {', '.join(wanted)}; the columns are {', '.join(have)})")


def _class_targets(values: list[str], classes: Sequence[str] | None) -> tuple[list[int], list[str]]:
    """Labels -> class indices: integers stay integers, names are sorted (or looked up in `classes`)."""
    if classes:
        index = {c: i for i, c in enumerate(classes)}
        missing = sorted({v for v in values if v not in index})
        if missing:
            raise ValueError(f"labels {missing[:5]} are not among the training classes {list(classes)[:10]}")
        return [index[v] for v in values], list(classes)
    if all(v.lstrip("-").isdigit() for v in values):
        ints = [int(v) for v in values]
        if min(ints) < 0:
            raise ValueError("integer labels must be >= 0")
        return ints, [str(c) for c in range(max(ints) + 1)]
    names = sorted(set(values))
    index = {c: i for i, c in enumerate(names)}
    return [index[v] for v in values], names


def _find_audio(root: Path, value: str) -> Path:
    from data2vec.data.audio import AUDIO_EXTENSIONS

    p = Path(value)
    p = p if p.is_absolute() else root / p
    if p.suffix.lower() in AUDIO_EXTENSIONS:
        return p
    for folder in (root, root / "flac", root / "wav", root / "wavs"):
        for ext in AUDIO_EXTENSIONS:
            cand = folder / f"{value}{ext}"
            if cand.is_file():
                return cand
    raise FileNotFoundError(f"{root}: no audio file for {value!r}")


def _audio_set(path: str, cfg: FinetuneConfig, rcfg: RunConfig, classes: Sequence[str] | None) -> LabelledSet:
    from data2vec.data.audio import AUDIO_EXTENSIONS

    p = Path(path)
    sr, norm = rcfg.data.audio.sample_rate, rcfg.data.audio.normalize
    if p.is_dir():
        if cfg.task == "audio_ctc":
            raise ValueError(f"{path}: CTC needs a manifest TSV with a transcript column, not a folder")
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_EXTENSIONS and f.is_file())
        if not files:
            raise ValueError(f"{path}: no audio files found")
        values = [f.parent.relative_to(p).as_posix() for f in files]
        targets, names = _class_targets(values, classes)
        return LabelledSet(_audio_loader(files, sr, norm), list(targets), names, path)
    rows = _read_table(p)
    if not rows:
        raise ValueError(f"{path}: no rows")
    path_col = _column(rows, p, ("path", "file", "audio", "id"), "audio path")
    files = [_find_audio(p.parent, r[path_col]) for r in rows]
    if cfg.task == "audio_ctc":
        col = _column(rows, p, ("transcript", "text", "sentence", cfg.label_column), "transcript")
        return LabelledSet(_audio_loader(files, sr, norm), [r[col] for r in rows], [], path)
    col = _column(rows, p, (cfg.label_column,), "label")
    targets, names = _class_targets([r[col] for r in rows], classes)
    return LabelledSet(_audio_loader(files, sr, norm), list(targets), names, path)


def load_tokenizer(cfg: FinetuneConfig, rcfg: RunConfig) -> Any:
    from data2vec.tokenizer import TextTokenizer

    tok = cfg.tokenizer or rcfg.data.text.tokenizer
    if not tok:
        raise ConfigError("tokenizer: the model names no tokenizer; pass one (--tokenizer)")
    return TextTokenizer.load(tok)


def _text_set(
    path: str, cfg: FinetuneConfig, rcfg: RunConfig, classes: Sequence[str] | None, tokenizer: Any
) -> LabelledSet:
    p = Path(path)
    rows = _read_table(p)
    if not rows:
        raise ValueError(f"{path}: no rows")
    text_col = _column(rows, p, (cfg.text_column,) if cfg.text_column else ("sentence", "text"), "text")
    label_col = _column(rows, p, (cfg.label_column,), "label")
    ids = tokenizer.encode_batch([r[text_col] for r in rows])
    values = [r[label_col] for r in rows]
    if cfg.task == "text_reg":
        try:
            targets: list[Any] = [float(v) for v in values]
        except ValueError as e:
            raise ValueError(f"{path}: regression labels must be numbers ({e})") from None
        names: list[str] = []
    else:
        targets, names = _class_targets(values, classes)
    return LabelledSet(lambda i: ids[i], targets, names, path)


def read_labelled(
    path: str | Path,
    cfg: FinetuneConfig,
    rcfg: RunConfig,
    classes: Sequence[str] | None = None,
    tokenizer: Any = None,
) -> LabelledSet:
    """The labelled examples in `path` for `cfg.task` (formats: see the module doc). `classes`:
    the training set's class names, so that an eval set maps names to the same indices."""
    if not Path(path).exists() and not str(path).startswith("builtin:") and not any(c in str(path) for c in "*?["):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if cfg.modality == "image":
        return _image_set(str(path))
    if cfg.modality == "audio":
        return _audio_set(str(path), cfg, rcfg, classes)
    return _text_set(str(path), cfg, rcfg, classes, tokenizer or load_tokenizer(cfg, rcfg))


# ============================================================================ CTC letters and metrics

BLANK = "<blank>"
WORD_SEP = "|"


def letter_vocab(transcripts: Sequence[str]) -> list[str]:
    """Blank, the word separator and every other character seen (lower-cased), sorted."""
    chars = sorted({c for t in transcripts for c in t.lower() if not c.isspace()} - {WORD_SEP})
    return [BLANK, WORD_SEP, *chars]


def encode_letters(text: str, vocab: Sequence[str]) -> list[int]:
    """Lower-cased letters -> ids, words separated by `|`; unknown characters are dropped."""
    index = {c: i for i, c in enumerate(vocab)}
    words = [[index[c] for c in w if c in index] for w in text.lower().split()]
    out: list[int] = []
    for w in words:
        if w:
            if out:
                out.append(index[WORD_SEP])
            out.extend(w)
    return out


def greedy_decode(log_probs: Tensor, lengths: Tensor | None, vocab: Sequence[str]) -> list[str]:
    """(B, T, V) frame scores -> text: best class per frame, repeats merged, blanks removed,
    `|` read as a space."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for b in range(best.shape[0]):
        n = int(lengths[b]) if lengths is not None else best.shape[1]
        prev = -1
        chars: list[str] = []
        for k in best[b, :n].tolist():
            if k != prev and k != 0:
                chars.append(" " if vocab[k] == WORD_SEP else vocab[k])
            prev = k
        out.append(" ".join("".join(chars).split()))
    return out


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i]
        for j, y in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def error_rates(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """(WER, CER) over a corpus: total edits / total reference words (characters)."""
    w_err = w_tot = c_err = c_tot = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = hyp.lower().split(), ref.lower().split()
        w_err += edit_distance(h, r)
        w_tot += len(r)
        hc, rc = " ".join(h), " ".join(r)
        c_err += edit_distance(hc, rc)
        c_tot += len(rc)
    return w_err / max(w_tot, 1), c_err / max(c_tot, 1)


# ============================================================================ mixup / cutmix


def smooth_one_hot(targets: Tensor, num_classes: int, smoothing: float) -> Tensor:
    off = smoothing / num_classes
    return torch.full((len(targets), num_classes), off, device=targets.device).scatter_(
        1, targets[:, None], 1.0 - smoothing + off
    )


def mix_batch(
    images: Tensor, soft_targets: Tensor, cfg: FinetuneConfig, rng: random.Random
) -> tuple[Tensor, Tensor, float]:
    """Mixup or CutMix with the batch flipped: returns (images, targets, lambda); each target
    row still sums to 1. Untouched when both are off or the batch is not drawn (`mix_prob`)."""
    use_mix, use_cut = cfg.mixup > 0, cfg.cutmix > 0
    if not (use_mix or use_cut) or rng.random() >= cfg.mix_prob:
        return images, soft_targets, 1.0
    cut = use_cut and (not use_mix or rng.random() < cfg.mix_switch_prob)
    alpha = cfg.cutmix if cut else cfg.mixup
    lam = float(np.random.default_rng(rng.getrandbits(32)).beta(alpha, alpha))
    flipped = images.flip(0)
    if cut:
        H, W = images.shape[-2:]
        rh, rw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = rng.randrange(H), rng.randrange(W)
        y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, H)
        x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, W)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually pasted
    else:
        images = images * lam + flipped * (1 - lam)
    return images, soft_targets * lam + soft_targets.flip(0) * (1 - lam), lam


# ============================================================================ the model


class FinetuneModel(nn.Module):
    """A pretrained front-end and encoder with a task head."""

    def __init__(self, backbone: Data2Vec, task: str, num_outputs: int, head_norm: str = "layer") -> None:
        super().__init__()
        self.task = task
        self.version = backbone.cfg.version
        self.frontend = backbone.frontend
        self.encoder = backbone.encoder
        dim = backbone.cfg.encoder.dim
        self.head: nn.Module
        if task in ("text_cls", "text_reg"):
            self.head = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, num_outputs))
            for m in self.head:
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight)
                    nn.init.zeros_(m.bias)
        elif task == "audio_ctc":
            self.head = nn.Linear(dim, num_outputs)
            trunc_normal_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            norm = nn.LayerNorm(dim, eps=1e-6) if head_norm == "layer" else nn.BatchNorm1d(dim, affine=False)
            self.head = nn.Sequential(norm, nn.Linear(dim, num_outputs))
            lin = self.head[1]
            assert isinstance(lin, nn.Linear)
            trunc_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.mask_prob = 0.0
        self.mask_length = 10
        self.mask_channel_prob = 0.0
        self.mask_channel_length = 64

    @property
    def num_layers(self) -> int:
        return len(self.encoder.prenet) + len(self.encoder.blocks)

    def _mask_frames(self, tokens: Tokens, generator: torch.Generator | None) -> tuple[Tokens, Tensor | None]:
        """Fine-tuning masks (speech, training only): time spans and channel spans."""
        from data2vec.masking import draw_masks

        x, pad = tokens
        B, T, D = x.shape
        mask = None
        gen = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        if self.mask_prob > 0:
            valid = torch.full((B,), T) if pad is None else (~pad).sum(1).cpu()
            length = max(1, min(self.mask_length, int(valid.min()) - 1))
            mask = draw_masks("span", B, (1, T), self.mask_prob, generator=gen, mask_length=length, valid_lengths=valid)
            mask = mask.to(x.device)
            if pad is not None:
                mask = mask & ~pad
            if self.version == 2:  # v2: N(0, 0.01) noise in place of masked frames, all frames kept
                noise = torch.randn(x.shape, generator=None, device=x.device, dtype=x.dtype) * 0.01
                x = torch.where(mask[..., None], noise, x)
                mask = None
        if self.mask_channel_prob > 0:
            length = max(1, min(self.mask_channel_length, D - 1))
            ch = draw_masks("span", B, (1, D), self.mask_channel_prob, generator=gen, mask_length=length)
            x = x.masked_fill(ch.to(x.device)[:, None, :], 0.0)
        return Tokens(x, pad), mask

    def features(
        self, inputs: Tensor, padding_mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Encoder output (B, P + T, D) and the (B, P + T) token padding (True = pad)."""
        tokens = self.frontend.local(inputs, padding_mask)
        mask = None
        if self.training and (self.mask_prob > 0 or self.mask_channel_prob > 0):
            tokens, mask = self._mask_frames(tokens, generator)
        enc_in = self.frontend.context(tokens, mask=mask)
        out = self.encoder(enc_in.x, enc_in.padding_mask, enc_in.positions)
        return out.x, enc_in.padding_mask

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Task outputs: (B, classes) logits, (B,) regression values, or (B, T, letters) CTC
        log-probabilities with the (B, T) frame padding."""
        x, pad = self.features(inputs, padding_mask)
        P = self.frontend.num_prefix
        if self.task in ("text_cls", "text_reg"):
            y: Tensor = self.head(x[:, 0])
            return (y[:, 0] if self.task == "text_reg" else y), None
        x, pad = x[:, P:], None if pad is None else pad[:, P:]
        if self.task == "audio_ctc":
            return self.head(x).float().log_softmax(-1), pad
        if pad is None:
            pooled = x.mean(1)
        else:
            keep = (~pad).unsqueeze(-1).to(x.dtype)
            pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        if self.training and pooled.shape[0] == 1 and isinstance(self.head, nn.Sequential):
            norm, linear = self.head
            if isinstance(norm, nn.BatchNorm1d):  # a batch of one has no batch statistics: use the running ones
                pooled = nn.functional.batch_norm(pooled, norm.running_mean, norm.running_var, training=False)
                return linear(pooled), None
        return self.head(pooled), None


def layer_id(name: str, num_layers: int, num_prenet: int = 0) -> int:
    """BEiT layer of a parameter: front-end, prefix tokens and the encoder's input norm and
    position bias are 0; block i (1-based, prenet blocks first) is i; the head and the final
    norm are L + 1."""
    if name.startswith("frontend."):
        return 0
    if name.startswith("encoder."):
        parts = name.split(".")
        if parts[1] == "prenet":
            return int(parts[2]) + 1
        if parts[1] == "blocks":
            return num_prenet + int(parts[2]) + 1
        if parts[1] == "final_norm":
            return num_layers + 1
        return 0
    return num_layers + 1


def param_groups(model: FinetuneModel, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups by (layer, decay or not); each carries `lr_scale` = decay^(L + 1 - layer)."""
    L = model.num_layers
    n_prenet = len(model.encoder.prenet)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, L, n_prenet)
        nd = no_weight_decay(name, p)
        g = groups.setdefault(
            (lid, nd),
            {"params": [], "weight_decay": 0.0 if nd else weight_decay, "lr_scale": layer_decay ** (L + 1 - lid)},
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# ============================================================================ batches


def _crop(wav: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    if size <= 0 or len(wav) <= size:
        return wav
    start = rng.randrange(len(wav) - size + 1)
    return wav[start : start + size]


class _Batcher:
    """Turns example indices into model inputs for one modality."""

    def __init__(self, cfg: FinetuneConfig, rcfg: RunConfig, vocab: Sequence[str]) -> None:
        from data2vec.data.images import PretrainTransform

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
            from data2vec.data.images import eval_transform

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
        seqs = [[tcfg.bos_id, *list(data.load(i))[: self.max_tokens - 2], tcfg.eos_id] for i in idx]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), tcfg.pad_id, dtype=torch.long)
        for k, s in enumerate(seqs):
            ids[k, : len(s)] = torch.tensor(s, dtype=torch.long)
        return ids, None

    def length(self, data: LabelledSet, i: int) -> int:
        return 1 if self.cfg.modality == "image" else len(data.load(i))


def _batches(n: int, batch_size: int, rng: random.Random | None) -> Iterator[list[int]]:
    order = list(range(n))
    if rng is not None:
        rng.shuffle(order)
    for k in range(0, n, batch_size):
        yield order[k : k + batch_size]


# ============================================================================ evaluation


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[Any] = field(default_factory=list)


METRIC = {
    "image_cls": "accuracy",
    "audio_cls": "accuracy",
    "text_cls": "accuracy",
    "text_reg": "pearson",
    "audio_ctc": "cer",
}
"""The eval metric that picks the best epoch (CER: lower is better, the others higher)."""


def _better(task: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if METRIC[task] == "cer" else new > old


@torch.no_grad()
def evaluate(
    model: FinetuneModel,
    data: LabelledSet,
    cfg: FinetuneConfig,
    rcfg: RunConfig,
    vocab: Sequence[str] = (),
    batch_size: int | None = None,
) -> EvalResult:
    """Metrics of `model` on `data`: accuracy (+ loss), Pearson/Spearman (+ MSE), or CER/WER."""
    from scipy.stats import pearsonr, spearmanr

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    batcher = _Batcher(cfg, rcfg, vocab)
    rng = random.Random(0)
    preds: list[Any] = []
    loss_sum = 0.0
    try:
        for idx in _batches(len(data), batch_size or cfg.batch_size, None):
            x, pad = batcher.inputs(data, idx, False, rng)
            with _autocast(device, cfg.precision):
                out, frame_pad = model(x.to(device), None if pad is None else pad.to(device))
            out = out.float()
            if cfg.task == "audio_ctc":
                lengths = None if frame_pad is None else (~frame_pad).sum(1)
                preds.extend(greedy_decode(out, lengths, vocab))
            elif cfg.task == "text_reg":
                y = torch.tensor([float(data.targets[i]) for i in idx], device=device)
                loss_sum += float(F.mse_loss(out, y, reduction="sum"))
                preds.extend(out.cpu().tolist())
            else:
                y = torch.tensor([int(data.targets[i]) for i in idx], device=device)
                loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
                preds.extend(out.argmax(-1).cpu().tolist())
    finally:
        model.train(was)
    n = max(len(data), 1)
    if cfg.task == "audio_ctc":
        wer, cer = error_rates(preds, [str(t) for t in data.targets])
        return EvalResult({"cer": cer, "wer": wer}, preds)
    if cfg.task == "text_reg":
        t = np.asarray(data.targets, dtype=np.float64)
        p = np.asarray(preds, dtype=np.float64)
        ok = len(t) > 1 and p.std() > 0 and t.std() > 0
        pr = float(pearsonr(p, t)[0]) if ok else 0.0
        sr = float(spearmanr(p, t)[0]) if ok else 0.0
        return EvalResult({"pearson": pr, "spearman": sr, "mse": loss_sum / n}, preds)
    acc = float(np.mean(np.asarray(preds) == np.asarray(data.targets))) if len(data) else 0.0
    return EvalResult({"accuracy": acc, "loss": loss_sum / n}, preds)


# ============================================================================ saving and loading


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a folder into a temporary one, fsync it, and swap it into place."""
    from data2vec.checkpoint import _fsync_dir, _fsync_file

    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_finetuned(path: Path, model: FinetuneModel, rcfg: RunConfig, meta: dict[str, Any]) -> None:
    """`path/` = model.safetensors + config.json (the encoder's RunConfig) + finetune.json."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(rcfg.to_dict(), indent=2) + "\n")
        (tmp / "finetune.json").write_text(json.dumps(meta, indent=2) + "\n")

    _atomic_dir(path, write)


def load_finetuned(path: str | Path) -> tuple[FinetuneModel, RunConfig, dict[str, Any]]:
    """A fine-tuned model saved by `finetune` (its `best/` folder), in eval mode, with its
    encoder config and `finetune.json` (config, classes or letters, metric)."""
    from safetensors.torch import load_file

    p = Path(path)
    if (p / "best").is_dir():
        p = p / "best"
    if not (p / "finetune.json").is_file():
        raise FileNotFoundError(f"{path}: not a fine-tuned model (no finetune.json)")
    rcfg = RunConfig.load(p / "config.json")
    meta = json.loads((p / "finetune.json").read_text())
    cfg = FinetuneConfig.from_dict(meta["config"])
    model = FinetuneModel(Data2Vec.from_config(rcfg), cfg.task, int(meta["num_outputs"]), cfg.head_norm)
    model.load_state_dict(load_file(str(p / "model.safetensors")), strict=True)
    return model.eval(), rcfg, meta


# ============================================================================ the loop


@dataclass
class FinetuneResult:
    out_dir: Path
    model: FinetuneModel
    """The model after the last epoch (the best one is in `out_dir/best`)."""
    best_metric: float
    best_epoch: int
    metric: str
    history: list[dict[str, float]]
    """One row per epoch: epoch, step, train_loss, eval_<metric>..., seconds."""
    seconds: float


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _resolve_source(
    source: str | Path | RunConfig | Any, scratch_seed: int
) -> tuple[RunConfig, dict[str, Tensor] | None, str]:
    """(encoder config, student weights or None for a random init, description)."""
    from data2vec.extract import Pretrained, load_pretrained_state

    if isinstance(source, RunConfig):
        return source, None, "random init"
    pre = source if isinstance(source, Pretrained) else load_pretrained_state(source)
    return pre.config, pre.student, pre.source


def build_finetune_model(
    rcfg: RunConfig, weights: dict[str, Tensor] | None, cfg: FinetuneConfig, num_outputs: int
) -> tuple[FinetuneModel, RunConfig]:
    """The backbone (drop-path / layerdrop from `cfg`) with `weights` loaded, plus the head."""
    enc = replace(rcfg.model.encoder, drop_path=cfg.drop_path, layerdrop=cfg.layerdrop)
    rcfg = replace(rcfg, model=replace(rcfg.model, encoder=enc))
    torch.manual_seed(cfg.seed)
    backbone = Data2Vec.from_config(rcfg)
    if weights is not None:
        own = backbone.state_dict()
        wanted = {k: v for k, v in weights.items() if k.startswith(("frontend.", "encoder."))}
        wrong = [k for k in wanted if k in own and own[k].shape != wanted[k].shape]
        missing = [k for k in own if k.startswith(("frontend.", "encoder.")) and k not in wanted]
        missing = [k for k in missing if k != "frontend.context.mask_emb"]
        if wrong or missing:
            raise ValueError(f"pretrained weights do not fit the model: missing {missing[:5]}, wrong shape {wrong[:5]}")
        backbone.load_state_dict(wanted, strict=False)
    model = FinetuneModel(backbone, cfg.task, num_outputs, cfg.head_norm)
    return model, rcfg


def _num_outputs(cfg: FinetuneConfig, train: LabelledSet, vocab: Sequence[str]) -> int:
    if cfg.task == "audio_ctc":
        return len(vocab)
    if cfg.task == "text_reg":
        return 1
    return max(len(train.classes), max(int(t) for t in train.targets) + 1)


def finetune(
    source: str | Path | RunConfig | Any,
    cfg: FinetuneConfig,
    train_data: str | Path | LabelledSet,
    eval_data: str | Path | LabelledSet,
    out_dir: str | Path,
    *,
    quiet: bool = False,
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune `source` (a run directory, checkpoint, pretrained folder, transformers or
    fairseq checkpoint, a `Pretrained`, or a RunConfig = the same architecture from a random
    init) on `train_data`, evaluating on `eval_data` after every epoch."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    rcfg, weights, described = _resolve_source(source, cfg.seed)
    if rcfg.model.modality != cfg.modality:
        raise ConfigError(
            f"task: {cfg.task} needs a {cfg.modality} model; {described} is a {rcfg.model.modality} model"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "finetune.log"

    def log(msg: str) -> None:
        with open(log_path, "a") as f:
            f.write(msg + "\n")
        if not quiet:
            tqdm.write(msg)

    tokenizer = (
        load_tokenizer(cfg, rcfg) if cfg.modality == "text" and not isinstance(train_data, LabelledSet) else None
    )
    train_set = (
        train_data if isinstance(train_data, LabelledSet) else read_labelled(train_data, cfg, rcfg, None, tokenizer)
    )
    eval_set = (
        eval_data
        if isinstance(eval_data, LabelledSet)
        else read_labelled(eval_data, cfg, rcfg, train_set.classes or None, tokenizer)
    )
    if len(train_set) == 0 or len(eval_set) == 0:
        raise ValueError("the training and eval sets must not be empty")
    vocab = letter_vocab([str(t) for t in train_set.targets]) if cfg.task == "audio_ctc" else []
    n_out = _num_outputs(cfg, train_set, vocab)
    model, rcfg = build_finetune_model(rcfg, weights, cfg, n_out)
    from data2vec.train import resolve_device

    device = resolve_device(cfg.device)
    model.to(device)
    if cfg.modality == "audio":
        model.mask_prob, model.mask_length = cfg.mask_prob, cfg.mask_length
        model.mask_channel_prob, model.mask_channel_length = cfg.mask_channel_prob, cfg.mask_channel_length
        if cfg.freeze_cnn:
            cnn = getattr(model.frontend.local, "cnn", None)
            if cnn is not None:
                for p in cnn.parameters():
                    p.requires_grad_(False)
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_fraction * total)
    encoder_params = [p for n, p in model.named_parameters() if not n.startswith("head.") and p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metric = METRIC[cfg.task]
    log(
        f"fine-tune {cfg.task} from {described} | {n_params / 1e6:.2f}M trainable | {len(train_set)} train, "
        f"{len(eval_set)} eval | {cfg.epochs} epochs x {steps_per_epoch} steps | {cfg.precision} on {device}"
    )
    meta_base: dict[str, Any] = {
        "config": cfg.to_dict(),
        "source": described,
        "classes": train_set.classes,
        "letters": vocab,
        "num_outputs": n_out,
        "metric": metric,
    }
    (out / "finetune_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    rng = random.Random(cfg.seed)
    batcher = _Batcher(cfg, rcfg, vocab)
    history: list[dict[str, float]] = []
    best: float | None = None
    best_epoch = 0
    step = 0
    model.train()
    bar = tqdm(total=total, disable=not progress, dynamic_ncols=True, unit="step")
    try:
        for epoch in range(1, cfg.epochs + 1):
            loss_sum, count = 0.0, 0
            for idx in _batches(len(train_set), cfg.batch_size, rng):
                lr = cosine_lr(step, total, cfg.lr, cfg.min_lr, warmup)
                frozen = step < cfg.freeze_encoder_steps
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                for p in encoder_params:
                    p.requires_grad_(not frozen)
                x, pad = batcher.inputs(train_set, idx, True, rng)
                x = x.to(device)
                pad = None if pad is None else pad.to(device)
                loss = _train_loss(model, cfg, train_set, idx, x, pad, vocab, n_out, rng, device)
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                if cfg.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                step += 1
                loss_v = float(loss.detach())
                loss_sum, count = loss_sum + loss_v * len(idx), count + len(idx)
                if step % cfg.log_every == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": step, "epoch": epoch, "loss": loss_v, "lr": lr}) + "\n")
                bar.set_postfix(loss=f"{loss_v:.4f}")
                bar.update(1)
            for p in encoder_params:
                p.requires_grad_(True)
            ev = evaluate(model, eval_set, cfg, rcfg, vocab)
            row: dict[str, float] = {
                "epoch": epoch,
                "step": step,
                "train_loss": loss_sum / max(count, 1),
                **{f"eval_{k}": v for k, v in ev.metrics.items()},
                "seconds": time.perf_counter() - t_start,
            }
            history.append(row)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            value = ev.metrics[metric]
            improved = _better(cfg.task, value, best)
            if improved:
                best, best_epoch = value, epoch
                save_finetuned(
                    out / "best", model, rcfg, {**meta_base, "epoch": epoch, "step": step, "eval": ev.metrics}
                )
            log(
                f"epoch {epoch}: train loss {row['train_loss']:.4f} | "
                + " ".join(f"{k} {v:.4f}" for k, v in ev.metrics.items())
                + (" (best so far, saved)" if improved else "")
            )
    finally:
        bar.close()
        plot_finetune(metrics_path, out / "metrics.png", metric)
    seconds = time.perf_counter() - t_start
    summary = {"metric": metric, "best": best, "best_epoch": best_epoch, "seconds": seconds, "history": history}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    assert best is not None
    return FinetuneResult(out, model, best, best_epoch, metric, history, seconds)


def _train_loss(
    model: FinetuneModel,
    cfg: FinetuneConfig,
    data: LabelledSet,
    idx: list[int],
    x: Tensor,
    pad: Tensor | None,
    vocab: Sequence[str],
    n_out: int,
    rng: random.Random,
    device: torch.device,
) -> Tensor:
    if cfg.task == "image_cls":
        y = torch.tensor([int(data.targets[i]) for i in idx], device=device)
        soft = smooth_one_hot(y, n_out, cfg.label_smoothing)
        x, soft, _ = mix_batch(x, soft, cfg, rng)
        with _autocast(device, cfg.precision):
            logits, _ = model(x)
        return torch.sum(-soft * logits.float().log_softmax(-1), dim=-1).mean()
    with _autocast(device, cfg.precision):
        out, frame_pad = model(x, pad)
    out = out.float()
    if cfg.task == "audio_ctc":
        targets = [torch.tensor(encode_letters(str(data.targets[i]), vocab), dtype=torch.long) for i in idx]
        T = out.shape[1]
        in_lens = torch.full((len(idx),), T, dtype=torch.long) if frame_pad is None else (~frame_pad).sum(1).cpu()
        tgt_lens = torch.tensor([len(t) for t in targets], dtype=torch.long)
        flat = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
        return F.ctc_loss(
            out.transpose(0, 1), flat.to(device), in_lens, tgt_lens, blank=0, reduction="mean", zero_infinity=True
        )
    if cfg.task == "text_reg":
        y_reg = torch.tensor([float(data.targets[i]) for i in idx], device=device)
        return F.mse_loss(out, y_reg)
    y = torch.tensor([int(data.targets[i]) for i in idx], device=device)
    return F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)


def plot_finetune(metrics_path: Path, out: Path, metric: str) -> None:
    """Training loss per logged step and the eval metric per epoch, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    steps = [r for r in rows if "loss" in r]
    epochs = [r for r in rows if f"eval_{metric}" in r]
    if not rows:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax2.plot([r["epoch"] for r in epochs], [r[f"eval_{metric}"] for r in epochs], marker="o")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(f"eval {metric}")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
