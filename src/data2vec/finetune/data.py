"""Labelled examples (image folders/tars, audio folders/manifests, TSV/JSONL text) and the
batches a fine-tuning model eats."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data2vec.config import ConfigError, RunConfig
from data2vec.finetune.config import FinetuneConfig


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


def _crop(wav: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    if size <= 0 or len(wav) <= size:
        return wav
    start = rng.randrange(len(wav) - size + 1)
    return wav[start : start + size]


class Batcher:
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


def index_batches(n: int, batch_size: int, rng: random.Random | None) -> Iterator[list[int]]:
    order = list(range(n))
    if rng is not None:
        rng.shuffle(order)
    for k in range(0, n, batch_size):
        yield order[k : k + batch_size]
