"""Speech data: folders or manifests of audio files, batched by duration (docs/design.md, 'Presets
and their numbers', and docs/audio.md).

Sources:
- a folder: every .wav, .flac and .ogg file under it, recursively (read with soundfile);
- a manifest (any other file, e.g. `train.tsv`): one `path[<TAB>num_samples]` per line,
  paths relative to the manifest's folder, or fairseq's form whose first line is the root
  folder. A given `num_samples` is taken as the length at `data.audio.sample_rate` (as in
  fairseq's 16 kHz manifests) and spares opening the file to learn it; when the file is
  read, a decoded length that differs from it by more than 1% (a count taken at another
  sample rate, a truncated file) makes the clip a bad input, since its batch was planned
  with the wrong length.

Folder scans leave out hidden files and folders (names starting with ".", macOS `._*`
files among them). Bad files (missing, a symbolic link that loops, empty, not audio, cut
short so that the decoder fails, NaN or infinite samples) raise `BadInputError` naming the
file (and, for a missing one, the manifest that lists it): at scan time when the header
shows it, otherwise when the clip is read; under `data.on_bad_input=skip` they are left
out and counted. A WAV
whose header promises more frames than the file holds is read up to its end (libsndfile
reports the true length). If two epochs of batches bring no usable clip, the run stops
with an error instead of looping.

Each utterance is read, mixed down to mono, resampled with soxr when its rate differs
from `data.audio.sample_rate`, normalised to zero mean and unit variance (as fairseq's
`task.normalize`), then randomly cropped to `max_sample_size`. Clips shorter than
`min_sample_size` are dropped (and counted) when the source is scanned.

Batches hold up to `batch_seconds` of audio: utterances are sorted by length (ties broken
at random per epoch), cut greedily into batches whose (count x longest) fits the budget,
and the batches are shuffled per epoch. Each batch is then cropped to its shortest
utterance, so pretraining batches hold no padding (fairseq), and the masks are drawn after
that crop. Micro-batch k of a run is a pure function of (seed, k), so runs resume exactly.
"""

from __future__ import annotations

import io
import itertools
import math
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from data2vec.config import AudioDataConfig, RunConfig
from data2vec.data.batch import NothingUsable, PretrainBatch, PretrainItem
from data2vec.data.errors import BadInputError, check_file, stable_reason
from data2vec.data.index import StringTableBuilder, sorted_table, walk_files
from data2vec.data.sampling import batch_generator, sample_seed
from data2vec.data.tables import RowGroupBatchSampler, RowSpec, TableRows, is_table_path, row_bytes
from data2vec.data.workers import ignore_stop_signals
from data2vec.masking import masks_from_config
from data2vec.modalities.audio import conv_output_length, conv_output_lengths

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
_OTHER_AUDIO = (".aiff", ".aif", ".au", ".caf", ".w64", ".mp3", ".opus")
LENGTH_TOLERANCE = 0.01
"""A manifest's sample count may differ from the decoded length by this fraction (resampling
rounds); beyond it the clip is a bad input."""


# ---------------------------------------------------------------------- reading files


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """A file as a mono float32 waveform at `sample_rate`; BadInputError names the file."""
    where = str(path)
    check_file(where)  # missing, a looping link, a folder, 0 bytes: said plainly (libsndfile: 'System error.')
    return decode_audio(where, where, sample_rate)


def decode_audio(data: str | bytes, where: str, sample_rate: int) -> np.ndarray:
    """Encoded audio (a file's path, or its bytes: wav, flac, ogg) as a mono float32 waveform at
    `sample_rate`; BadInputError names `where`."""
    try:
        frames, rate = sf.read(io.BytesIO(data) if isinstance(data, bytes) else data, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as e:
        raise BadInputError(where, f"not a readable audio file ({stable_reason(e)})") from None
    return to_waveform(frames, rate, where, sample_rate)


def to_waveform(samples: np.ndarray, rate: int, where: str, sample_rate: int) -> np.ndarray:
    """(frames,) or (frames, channels) samples at `rate` -> mono float32 at `sample_rate`, checked."""
    data = np.asarray(samples, dtype=np.float32)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2 or data.shape[0] == 0:
        raise BadInputError(where, "empty audio (0 samples)")
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wav).all():
        raise BadInputError(where, "audio holds NaN or infinite samples")
    if rate <= 0:
        raise BadInputError(where, f"sampling rate {rate} is not positive")
    if rate != sample_rate:
        wav = soxr.resample(wav, rate, sample_rate)
    return np.ascontiguousarray(wav, dtype=np.float32)


def table_waveform(rows: TableRows, index: int, sample_rate: int) -> np.ndarray:
    """Row `index` of a parquet/arrow audio column (data/tables.py) as a mono float32 waveform:
    encoded bytes (plain, or the hub's `{bytes, path}` struct), a `{array, sampling_rate}`
    struct, or a list of samples with the rate in its own column."""
    where = rows.name(index)
    value = rows.row(index)
    if isinstance(value, dict) and "array" in value:
        if value.get("array") is None:
            raise BadInputError(where, "null value (no samples in the row)")
        return to_waveform(np.asarray(value["array"]), int(value.get("sampling_rate") or 0), where, sample_rate)
    if isinstance(value, list):
        return to_waveform(np.asarray(value), int(rows.row(index, "rate") or 0), where, sample_rate)
    return decode_audio(row_bytes(value, where), where, sample_rate)


def _listed_in(error: BadInputError, manifest: str) -> BadInputError:
    """A missing file's error, saying which manifest lists it."""
    if manifest and error.reason.startswith("no such file"):
        return BadInputError(error.path, f"{error.reason}; listed in {manifest}")
    return error


def normalize_waveform(wav: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Zero mean, unit variance over the whole utterance (fairseq: F.layer_norm over the waveform)."""
    w = wav.astype(np.float64)
    out: np.ndarray = ((w - w.mean()) / math.sqrt(w.var() + eps)).astype(np.float32)
    return out


def resampled_length(frames: int, rate: int, sample_rate: int) -> int:
    """Samples after resampling `frames` from `rate` to `sample_rate` (soxr rounds)."""
    return frames if rate == sample_rate else int(round(frames * sample_rate / rate))


@dataclass(frozen=True)
class AudioClip:
    path: str
    samples: int
    """Length at the target sample rate."""
    listed: bool = False
    """`samples` comes from a manifest (checked against the decoded length when read)."""


class ClipTable(Sequence[AudioClip]):
    """Clips stored column-wise (packed paths, int64 lengths): a few bytes per clip, so a
    manifest of millions of clips fits in every loader worker (data/index.py)."""

    def __init__(self, clips: Iterable[AudioClip] = ()) -> None:
        self._paths = StringTableBuilder()
        self._samples: array[int] = array("q")
        self._listed: array[int] = array("b")
        for c in clips:
            self.append(c)

    def append(self, clip: AudioClip) -> None:
        self._paths.add(clip.path)
        self._samples.append(clip.samples)
        self._listed.append(int(clip.listed))

    def __len__(self) -> int:
        return len(self._samples)

    @overload
    def __getitem__(self, index: int) -> AudioClip: ...
    @overload
    def __getitem__(self, index: slice) -> list[AudioClip]: ...
    def __getitem__(self, index: int | slice) -> AudioClip | list[AudioClip]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(index)
        index %= n
        b = self._paths
        start = int(b.ends[index - 1]) if index else 0
        path = bytes(b.data[start : int(b.ends[index])]).decode("utf-8", errors="surrogateescape")
        return AudioClip(path, self._samples[index], bool(self._listed[index]))

    def total_samples(self) -> int:
        return int(np.frombuffer(self._samples, dtype=np.int64).sum()) if len(self) else 0


@dataclass
class AudioSource:
    """The usable clips of a folder or manifest, and what was left out."""

    location: str
    sample_rate: int
    clips: Sequence[AudioClip]
    too_short: int = 0
    """Clips below min_sample_size, dropped."""
    min_samples: int = 0
    skipped: list[str] = field(default_factory=list)
    """'path: reason' for unreadable files (on_bad_input=skip)."""
    manifest: str = ""
    """The manifest the clips are listed in ('' for a folder or a single file)."""

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def seconds(self) -> float:
        if isinstance(self.clips, ClipTable):
            return self.clips.total_samples() / self.sample_rate
        return sum(c.samples for c in self.clips) / self.sample_rate

    def notes(self) -> list[str]:
        lines = [f"audio: {len(self.clips)} clips ({self.seconds / 3600:.2f} h) from {self.location}"]
        if self.too_short:
            lines.append(
                f"audio: dropped {self.too_short} clip(s) shorter than data.audio.min_sample_size "
                f"({self.min_samples} samples = {self.min_samples / self.sample_rate:.2f} s)"
            )
        if self.skipped:
            lines.append(f"audio: skipped {len(self.skipped)} unreadable file(s) (data.on_bad_input=skip)")
        return lines


def read_manifest(path: Path) -> list[tuple[Path, int | None]]:
    """`path[<TAB>num_samples]` lines; an optional first line naming the root folder (fairseq)."""
    return list(iter_manifest(path))


def iter_manifest(path: Path) -> Iterator[tuple[Path, int | None]]:
    """`read_manifest`, streamed line by line (memory flat in the manifest's length)."""

    def lines() -> Iterator[str]:
        try:
            with open(path, encoding="utf-8") as f:
                for ln in f:
                    ln = ln.rstrip("\r\n")
                    if ln.strip():
                        yield ln
        except UnicodeDecodeError:
            raise ValueError(
                f"{path}: not a manifest (not UTF-8 text); give a folder of audio files or a TSV"
            ) from None

    it = lines()
    first_line = next(it, None)
    if first_line is None:
        return
    root = path.parent
    pending: list[str] = [first_line]
    if "\t" not in first_line:
        first = Path(first_line.strip())
        if first.is_dir() or first.suffix.lower() not in (*AUDIO_EXTENSIONS, *_OTHER_AUDIO):
            root = first if first.is_absolute() else path.parent / first
            pending = []
    for lineno, line in enumerate(itertools.chain(pending, it), start=1):
        parts = line.split("\t")
        rel = Path(parts[0].strip())
        n: int | None = None
        if len(parts) > 1 and parts[1].strip():
            try:
                n = int(parts[1])
            except ValueError:
                raise ValueError(f"{path}: line {lineno}: {parts[1]!r} is not a number of samples") from None
        yield (rel if rel.is_absolute() else root / rel, n)


def find_audio_files(folder: Path) -> list[Path]:
    """Every audio file under `folder`, recursively, in path order (evaluation inputs and labelled
    sets); hidden files and folders are left out, as in every folder scan (data/index.py)."""
    files = [Path(f) for f in sorted_table(walk_files(folder, AUDIO_EXTENSIONS), sep=os.sep)]
    if not files:
        raise ValueError(f"{folder}: no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)})")
    return files


def scan_audio(path: str, cfg: AudioDataConfig, on_bad_input: str = "fail") -> AudioSource:
    """List the clips of a folder or manifest with their lengths, dropping short ones."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    entries: Iterable[tuple[Path, int | None]]
    manifest = ""
    if p.is_dir():
        files = sorted_table(walk_files(p, AUDIO_EXTENSIONS), sep=os.sep)
        if not len(files):
            raise ValueError(f"{path}: no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)})")
        entries = ((Path(f), None) for f in files)
    elif p.suffix.lower() in AUDIO_EXTENSIONS:
        entries = [(p, None)]
    else:
        entries = iter_manifest(p)  # streamed: a long manifest is never held as a list
        manifest = str(path)
    clips = ClipTable()
    source = AudioSource(str(path), cfg.sample_rate, clips, min_samples=cfg.min_sample_size, manifest=manifest)
    listed_any = False
    for f, n in entries:
        listed_any = True
        listed = n is not None
        if n is None:
            try:
                n = header_length(f, cfg.sample_rate)
            except BadInputError as e:
                if on_bad_input == "fail":
                    raise _listed_in(e, manifest) from None
                source.skipped.append(str(_listed_in(e, manifest)))
                continue
        if n < cfg.min_sample_size:
            source.too_short += 1
            continue
        clips.append(AudioClip(str(f), n, listed=listed))
    if not listed_any:
        raise ValueError(f"{path}: the manifest lists no audio files")
    if not source.clips:
        raise ValueError(
            f"{path}: no usable clips ({source.too_short} shorter than data.audio.min_sample_size="
            f"{cfg.min_sample_size}, {len(source.skipped)} unreadable)"
        )
    return source


def header_length(path: Path, sample_rate: int) -> int:
    """A file's length at `sample_rate`, from its header; BadInputError for a file that is missing,
    empty or not audio."""
    where = str(path)
    check_file(where)
    try:
        info = sf.info(where)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as e:
        raise BadInputError(where, f"not a readable audio file ({e})") from None
    if info.frames <= 0:
        raise BadInputError(where, "empty audio (0 samples)")
    return resampled_length(info.frames, info.samplerate, sample_rate)


# ---------------------------------------------------------------------- batching


def plan_batches(sizes: np.ndarray, budget: int, seed: int, epoch: int, max_batch_size: int = 0) -> list[list[int]]:
    """One epoch's batches (lists of clip indices), a pure function of (sizes, seed, epoch).

    Clips are sorted by size (longest first, ties at random), cut greedily so that
    count x longest <= budget samples (a clip longer than the budget gets a batch alone), and
    the batches are shuffled. The batch count does not depend on the epoch.
    """
    rng = np.random.default_rng(sample_seed(seed, epoch, 0x7FFFFFFF))
    order = np.lexsort((rng.permutation(len(sizes)), -sizes))
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order.tolist():
        s = int(sizes[i])
        full = max_batch_size > 0 and len(cur) >= max_batch_size
        if cur and (full or max(longest, s) * (len(cur) + 1) > budget):
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, s)
    if cur:
        batches.append(cur)
    return [batches[j] for j in rng.permutation(len(batches)).tolist()]


class AudioBatchSampler:
    """Yields micro-batches of (clip index, sample seed) forever, from micro-batch `start_batch`.

    With `world_size` processes, rank r reads batches r, r + world_size, ... of each epoch;
    the epoch's last batches that do not fill every rank are dropped.
    """

    def __init__(
        self,
        sizes: list[int],
        budget: int,
        seed: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_batch_size: int = 0,
    ) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.budget, self.seed, self.max_batch_size = budget, seed, max_batch_size
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        total = len(plan_batches(self.sizes, budget, seed, 0, max_batch_size))
        self.batches_per_epoch = total // world_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the data makes {total} batch(es), fewer than the {world_size} processes; "
                "lower data.audio.batch_seconds or add data"
            )

    def batch(self, k: int) -> list[tuple[int, int]]:
        """Micro-batch k of the run."""
        epoch, j = divmod(k, self.batches_per_epoch)
        plan = plan_batches(self.sizes, self.budget, self.seed, epoch, self.max_batch_size)
        return [(i, sample_seed(self.seed, epoch, i)) for i in plan[j * self.world_size + self.rank]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.start_batch
        epoch, plan = -1, []
        while True:
            e, j = divmod(k, self.batches_per_epoch)
            if e != epoch:
                epoch, plan = e, plan_batches(self.sizes, self.budget, self.seed, e, self.max_batch_size)
            yield [(i, sample_seed(self.seed, epoch, i)) for i in plan[j * self.world_size + self.rank]]
            k += 1


# ---------------------------------------------------------------------- dataset and collation


class AudioDataset(Dataset[PretrainItem]):
    """Loads clip i, normalises it and crops it at random (from the sample seed) to max_sample_size."""

    def __init__(self, source: AudioSource, cfg: AudioDataConfig) -> None:
        self.source, self.cfg = source, cfg

    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int) -> np.ndarray | None:
        """Clip `index` as a waveform at the model's rate (None: too short to use)."""
        clip = self.source.clips[index]
        wav = load_audio(clip.path, self.cfg.sample_rate)
        if clip.listed and abs(len(wav) - clip.samples) > max(2, LENGTH_TOLERANCE * clip.samples):
            raise BadInputError(
                clip.path,
                f"decodes to {len(wav)} samples at {self.cfg.sample_rate} Hz but the manifest gives "
                f"{clip.samples} (a count taken at another sample rate, or a truncated file?); "
                "fix the count or leave it out",
            )
        return wav

    def __getitem__(self, item: tuple[int, int]) -> PretrainItem:
        index, seed = item
        try:
            wav = self.read(index)
        except BadInputError as e:
            return PretrainItem(None, seed, str(_listed_in(e, self.source.manifest)))
        if wav is None:
            return PretrainItem(None, seed, None)
        if self.cfg.normalize:
            wav = normalize_waveform(wav)
        n, limit = len(wav), self.cfg.max_sample_size
        if n > limit:
            start = int(np.random.default_rng(seed).integers(0, n - limit + 1))
            wav = wav[start : start + limit]
        return PretrainItem(torch.from_numpy(wav.copy()), seed, None)


class TableAudioDataset(AudioDataset):
    """Clips from a parquet/arrow audio column, read a row group at a time; a clip shorter than
    min_sample_size is dropped from its batch (its length is learned only when it is read)."""

    def __init__(self, rows: TableRows, source: AudioSource, cfg: AudioDataConfig) -> None:
        super().__init__(source, cfg)
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, index: int) -> np.ndarray | None:
        wav = table_waveform(self.rows, index, self.cfg.sample_rate)
        return wav if len(wav) >= self.cfg.min_sample_size else None


class AudioCollate:
    """Crops a batch to its shortest clip (or pads it) and draws the masks for the final length."""

    def __init__(self, cfg: RunConfig) -> None:
        self.masking, self.version = cfg.masking, cfg.model.version
        self.conv_layers = cfg.model.audio.conv_layers
        self.crop = cfg.data.audio.crop_to_shortest

    def __call__(self, items: list[PretrainItem]) -> PretrainBatch:
        good = [it.x for it in items if it.x is not None]
        skipped = [it.error for it in items if it.error is not None]
        if not good:
            return PretrainBatch(torch.empty(0), torch.empty(0, dtype=torch.bool), skipped)
        g = batch_generator([it.seed for it in items if it.x is not None])
        lengths = torch.tensor([len(w) for w in good])
        padding_mask: Tensor | None = None
        valid: Tensor | None = None
        if self.crop:
            n = int(lengths.min())
            crops = []
            for w in good:
                start = int(torch.randint(0, len(w) - n + 1, (), generator=g))
                crops.append(w[start : start + n])
            x = torch.stack(crops)
        else:
            n = int(lengths.max())
            x = torch.zeros(len(good), n)
            for i, w in enumerate(good):
                x[i, : len(w)] = w
            padding_mask = torch.arange(n)[None, :] >= lengths[:, None]
            if bool(padding_mask.any()):
                valid = conv_output_lengths(lengths, self.conv_layers)
            else:
                padding_mask = None
        frames = conv_output_length(n, self.conv_layers)
        mask = masks_from_config(
            self.masking, len(good), (1, frames), version=self.version, generator=g, valid_lengths=valid
        )
        return PretrainBatch(x, mask, skipped, padding_mask)


class AudioBatches(Iterator[PretrainBatch]):
    """The loader's batches; adds the files skipped while scanning to the first batch and, with
    on_bad_input=fail, raises BadInputError for a file that could not be decoded. With skip,
    `empty_limit` batches in a row without one usable clip (two epochs' worth: every clip was
    tried) raise BadInputError for the source instead of looping forever."""

    def __init__(
        self, it: Iterator[PretrainBatch], source: AudioSource, on_bad_input: str, empty_limit: int = 0
    ) -> None:
        self._it, self.source, self.on_bad_input = it, source, on_bad_input
        self._pending = list(source.skipped)
        self.notes = source.notes()
        self._nothing_usable = NothingUsable(source.location, "clips", len(source.clips), empty_limit)

    def __next__(self) -> PretrainBatch:
        b = next(self._it)
        if self.on_bad_input != "fail":
            self._nothing_usable.check(b)
        if b.skipped and self.on_bad_input == "fail":
            msg = b.skipped[0]
            path = next((c.path for c in self.source.clips if msg.startswith(c.path + ": ")), "")
            if path:  # otherwise (a table's row) the training loop raises it as it stands
                raise BadInputError(path, msg[len(path) + 2 :])
        if self._pending:
            b = b._replace(skipped=self._pending + b.skipped)
            self._pending = []
        return b


def is_table(cfg: RunConfig) -> bool:
    """Whether the run reads parquet/arrow files (data/tables.py) rather than audio files."""
    return bool(cfg.data.path) and is_table_path(cfg.data.path, AUDIO_EXTENSIONS)


def table_rows(cfg: RunConfig) -> TableRows:
    return TableRows(cfg.data.path, RowSpec("audio", cfg.data.column), cfg.data.on_bad_input)


def table_batch_size(acfg: AudioDataConfig) -> int:
    """Clips per batch from a table, whose clip lengths are unknown until read: as many clips of
    max_sample_size as batch_seconds holds (at most max_batch_size)."""
    n = max(1, int(acfg.batch_seconds * acfg.sample_rate) // acfg.max_sample_size)
    return min(n, acfg.max_batch_size) if acfg.max_batch_size else n


def audio_source_for(cfg: RunConfig) -> AudioSource:
    if not cfg.data.path:
        raise FileNotFoundError("data.path: no data given (pass --data PATH)")
    return scan_audio(cfg.data.path, cfg.data.audio, cfg.data.on_bad_input)


def check_frames(cfg: RunConfig) -> None:
    frames = conv_output_length(cfg.data.audio.min_sample_size, cfg.model.audio.conv_layers)
    if frames < 2:
        raise ValueError(
            f"data.audio.min_sample_size: {cfg.data.audio.min_sample_size} samples give {frames} frame(s) "
            "after the CNN; raise it"
        )


class AudioPipeline:
    """`PretrainPipeline` for speech."""

    def check(self, cfg: RunConfig) -> None:
        check_frames(cfg)
        if is_table(cfg):
            table_rows(cfg)
        else:
            audio_source_for(cfg)

    def prepare(self, cfg: RunConfig, run_dir: Path) -> RunConfig:
        return cfg

    def loader(self, cfg: RunConfig, start_batch: int, rank: int, world_size: int) -> tuple[AudioBatches, int]:
        check_frames(cfg)
        acfg = cfg.data.audio
        dataset: AudioDataset
        sampler: AudioBatchSampler | RowGroupBatchSampler
        if is_table(cfg):
            rows = table_rows(cfg)
            source = AudioSource(cfg.data.path, acfg.sample_rate, ClipTable(), skipped=list(rows.problems))
            dataset = TableAudioDataset(rows, source, acfg)
            sampler = RowGroupBatchSampler(
                rows.group_rows,
                table_batch_size(acfg),
                cfg.train.seed,
                start_batch,
                rank,
                world_size,
                cfg.data.shuffle_buffer,
            )
            rows.cache_groups = sampler.cache_groups
        else:
            source = audio_source_for(cfg)
            dataset = AudioDataset(source, acfg)
            sampler = AudioBatchSampler(
                [min(c.samples, acfg.max_sample_size) for c in source.clips],
                budget=int(acfg.batch_seconds * acfg.sample_rate),
                seed=cfg.train.seed,
                start_batch=start_batch,
                rank=rank,
                world_size=world_size,
                max_batch_size=acfg.max_batch_size,
            )
        loader_kwargs: dict[str, Any] = {}
        if cfg.data.num_workers > 0:
            loader_kwargs = {"persistent_workers": True, "prefetch_factor": 4}
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=AudioCollate(cfg),
            num_workers=cfg.data.num_workers,
            worker_init_fn=ignore_stop_signals,
            generator=torch.Generator().manual_seed(cfg.train.seed),
            **loader_kwargs,
        )
        batches = AudioBatches(iter(loader), source, cfg.data.on_bad_input, 2 * sampler.batches_per_epoch)
        if isinstance(dataset, TableAudioDataset):
            batches.notes = [
                f"audio: {len(dataset)} rows in {len(dataset.rows.group_rows)} row group(s) from {cfg.data.path}; "
                f"batches of {table_batch_size(acfg)} clips"
            ]
            if source.skipped:
                batches.notes.append(f"audio: skipped {len(source.skipped)} unusable file(s) (data.on_bad_input=skip)")
        return batches, len(dataset)
