"""Labelled examples, for fine-tuning and probes.

- images: a folder with one sub-folder per class, tar shards with `.cls` members, or `builtin:digits`;
- audio: a folder with one sub-folder per class, or a TSV/JSONL manifest with a path column
  (`path`, `file`, `audio` or `id`; relative to the manifest's folder, the extension may be left
  out) and a label column (or, for transcripts, `transcript`, `text` or `sentence`);
- text: a TSV/JSONL file with a text column (`sentence` or `text` unless named) and a label column;
- any modality: parquet/arrow files (a file, folder or glob; data/tables.py) with a column of
  images, audio or text and a label column (`label` unless named; for transcripts `transcript`,
  `text` or `sentence`); class names recorded as a `datasets` ClassLabel feature are used.

Class labels that are all integers are taken as class indices; names are sorted, or looked up in
the training set's classes so that an eval set maps them to the same indices.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from data2vec.config import ConfigError, RunConfig
from data2vec.data.audio import AUDIO_EXTENSIONS, find_audio_files, load_audio, normalize_waveform, table_waveform
from data2vec.data.errors import BadInputError
from data2vec.data.images import IMAGE_EXTENSIONS, ImageFolderSource, TableImageSource, open_image_source
from data2vec.data.tables import RowSpec, TableRows, is_table_path
from data2vec.data.text import JSONL_SUFFIXES, PLAIN_SUFFIXES, TSV_SUFFIXES
from data2vec.tokenizer import TextTokenizer

Targets = Literal["class", "transcript", "value"]
"""What a labelled set's targets are: class indices, transcripts (speech) or numbers (regression)."""


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


def load_text_tokenizer(rcfg: RunConfig, tokenizer: str | Path | None = None) -> TextTokenizer:
    """`tokenizer` (a tokenizer.json or its folder), or else the one the model `rcfg` was trained with."""
    path = tokenizer or rcfg.data.text.tokenizer
    if not path:
        raise ConfigError("data.text.tokenizer: the model has no tokenizer on record; pass one (--tokenizer)")
    tok = TextTokenizer.load(path)
    limit = rcfg.model.text.vocab_size
    if tok.vocab_size > limit:
        raise ValueError(f"{path}: {tok.vocab_size} token types, more than the model's {limit}")
    return tok


def read_labelled(
    path: str | Path,
    rcfg: RunConfig,
    *,
    modality: str | None = None,
    targets: Targets = "class",
    classes: Sequence[str] | None = None,
    tokenizer: Any = None,
    label_column: str = "label",
    text_column: str = "",
    column: str = "",
) -> LabelledSet:
    """The labelled examples in `path` (formats: see the module doc) for a `modality` model
    (default: the one `rcfg` describes; audio reads at its sample rate).

    Args:
        targets: "class" labels, "transcript"s (audio manifests) or "value"s (text regression).
        classes: the training set's class names, so that an eval set maps names to the same indices.
        tokenizer: text: a tokenizer, or the path of one; None = the model's (`load_text_tokenizer`).
        label_column, text_column: the table's columns ("" = `sentence` or `text`).
        column: parquet/arrow data: the column holding the inputs ("" = found from the schema).
    """
    p = str(path)
    if not Path(p).exists() and not p.startswith("builtin:") and not any(c in p for c in "*?["):
        raise FileNotFoundError(f"{path}: no such file or folder")
    modality = modality or rcfg.model.modality
    own = {"image": (*IMAGE_EXTENSIONS, ".tar"), "audio": AUDIO_EXTENSIONS}.get(
        modality, PLAIN_SUFFIXES + JSONL_SUFFIXES + TSV_SUFFIXES
    )
    if is_table_path(p, own):
        if modality == "text" and (tokenizer is None or isinstance(tokenizer, (str, Path))):
            tokenizer = load_text_tokenizer(rcfg, tokenizer or None)
        return _table_set(p, rcfg, modality, targets, classes, tokenizer, label_column, column or text_column)
    if modality == "image":
        return _image_set(p)
    if modality == "audio":
        return _audio_set(p, rcfg, targets, classes, label_column)
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer = load_text_tokenizer(rcfg, tokenizer or None)
    return _text_set(p, targets, classes, tokenizer, label_column, text_column)


def _image_set(path: str, on_bad_input: str = "fail") -> LabelledSet:
    source = open_image_source(path, on_bad_input=on_bad_input)
    labels = [source.label(i) for i in range(len(source))]
    if any(lab is None for lab in labels):
        raise ValueError(f"{path}: unlabelled images (use a folder with one subfolder per class, or .cls in tars)")
    classes = source.classes if isinstance(source, ImageFolderSource) else []
    if not classes:
        classes = [str(c) for c in range(max(int(lab or 0) for lab in labels) + 1)]
    return LabelledSet(source.load, [int(lab or 0) for lab in labels], classes, path)


def _table_set(
    path: str,
    rcfg: RunConfig,
    modality: str,
    targets: Targets,
    classes: Sequence[str] | None,
    tokenizer: Any,
    label_column: str,
    column: str,
) -> LabelledSet:
    """Labelled rows of parquet/arrow files: inputs from `column` (or the one that fits), targets
    from the label column."""
    if targets == "transcript":
        spec = RowSpec(modality, column, label=True, label_names=("transcript", "text", "sentence", label_column))
    else:
        spec = RowSpec(modality, column, label=True, label_column=label_column)
    load: Callable[[int], Any]
    if modality == "image":
        source = TableImageSource(path, column=column, label_column=spec.label_column)
        rows, load = source.rows, source.load
    else:
        rows = TableRows(path, spec)
    raw: list[Any] = []
    for i, value in rows.iter_values("label"):
        if isinstance(value, BadInputError):
            raise value
        if value is None:
            raise BadInputError(rows.name(i), "no label (null value)")
        raw.append(value)
    if modality == "audio":
        sr, norm = rcfg.data.audio.sample_rate, rcfg.data.audio.normalize

        def load(i: int) -> np.ndarray:
            wav = table_waveform(rows, i, sr)
            return normalize_waveform(wav) if norm else wav

    elif modality == "text":
        docs = []
        for i, value in rows.iter_values():
            if isinstance(value, BadInputError):
                raise value
            if not isinstance(value, str) or not value.strip():
                raise BadInputError(rows.name(i), "empty document")
            docs.append(value)
        ids = tokenizer.encode_batch(docs)
        load = ids.__getitem__
    if targets == "transcript":
        return LabelledSet(load, [str(v) for v in raw], [], path)
    if targets == "value":
        return LabelledSet(load, [float(v) for v in raw], [], path)
    if rows.classes and not classes and all(isinstance(v, int) for v in raw):
        return LabelledSet(load, raw, list(rows.classes), path)  # a datasets ClassLabel: names recorded
    if rows.classes and all(isinstance(v, int) and 0 <= v < len(rows.classes) for v in raw):
        raw = [rows.classes[v] for v in raw]  # names, to be looked up in the training set's classes
    indices, names = _class_targets([str(v) for v in raw], classes)
    return LabelledSet(load, list(indices), names, path)


def _audio_loader(files: list[Path], sample_rate: int, normalize: bool) -> Callable[[int], np.ndarray]:
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


def _audio_set(
    path: str, rcfg: RunConfig, targets: Targets, classes: Sequence[str] | None, label_column: str
) -> LabelledSet:
    p = Path(path)
    sr, norm = rcfg.data.audio.sample_rate, rcfg.data.audio.normalize
    if p.is_dir():
        if targets == "transcript":
            raise ValueError(f"{path}: transcripts (CTC) need a manifest TSV with a transcript column, not a folder")
        files = find_audio_files(p)
        values = [f.parent.relative_to(p).as_posix() for f in files]
        indices, names = _class_targets(values, classes)
        return LabelledSet(_audio_loader(files, sr, norm), list(indices), names, path)
    rows = _read_table(p)
    if not rows:
        raise ValueError(f"{path}: no rows")
    path_col = _column(rows, p, ("path", "file", "audio", "id"), "audio path")
    files = [_find_audio(p.parent, r[path_col]) for r in rows]
    if targets == "transcript":
        col = _column(rows, p, ("transcript", "text", "sentence", label_column), "transcript")
        return LabelledSet(_audio_loader(files, sr, norm), [r[col] for r in rows], [], path)
    col = _column(rows, p, (label_column,), "label")
    indices, names = _class_targets([r[col] for r in rows], classes)
    return LabelledSet(_audio_loader(files, sr, norm), list(indices), names, path)


def _text_set(
    path: str,
    targets: Targets,
    classes: Sequence[str] | None,
    tokenizer: Any,
    label_column: str,
    text_column: str,
) -> LabelledSet:
    p = Path(path)
    rows = _read_table(p)
    if not rows:
        raise ValueError(f"{path}: no rows")
    text_col = _column(rows, p, (text_column,) if text_column else ("sentence", "text"), "text")
    label_col = _column(rows, p, (label_column,), "label")
    ids = tokenizer.encode_batch([r[text_col] for r in rows])
    values = [r[label_col] for r in rows]
    if targets == "value":
        try:
            values_out: list[Any] = [float(v) for v in values]
        except ValueError as e:
            raise ValueError(f"{path}: regression labels must be numbers ({e})") from None
        names: list[str] = []
    else:
        values_out, names = _class_targets(values, classes)
    return LabelledSet(lambda i: ids[i], values_out, names, path)
