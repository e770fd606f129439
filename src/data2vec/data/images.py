"""Image data: folders, WebDataset-style tar shards, scikit-learn's digits, and augmentation.

Sources give random access to decoded PIL images (plus an optional integer label):

- `ImageFolderSource`: every jpg/jpeg/png/webp/bmp under a folder, recursively; a
  `<class>/` sub-folder layout gives labels but none are required. Hidden files and folders
  (names starting with ".", macOS `._*` files among them) are left out.
- `TarShardSource`: `key.jpg` (+ `key.cls`) members of one or more tar files, read in
  place: the member headers are indexed once, then each image is read at its byte offset,
  never extracted. A shard cut short, or with a damaged member header, is reported once
  (shard, byte offset, the member lost); reading resumes at the next readable header.
- `ArraySource`: images in a uint8 array (the built-in `builtin:digits`).
- `TableImageSource`: an image column of parquet or arrow files (data/tables.py), read a row
  group at a time.

Decoding never holds more than it needs: a JPEG is decoded at the smallest 1/2, 1/4 or 1/8
scale that keeps it at least `min_size` (the model's input is far smaller than a photo),
and an image of more than `max_pixels` pixels (after that reduction) is refused before it
is decoded (data.max_image_pixels; other formats cannot be decoded at a reduced scale).

`PretrainTransform` is the augmentation of the official recipes (RandomResizedCrop, horizontal
flip, colour jitter; docs/design.md, 'Presets and their numbers'), written with Pillow and
driven by an explicit numpy generator.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
import warnings
from abc import ABC, abstractmethod
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, UnidentifiedImageError
from torch import Tensor

from data2vec.data.errors import BadInputError, check_file, file_problem, stable_reason
from data2vec.data.index import StringTableBuilder, sorted_table, walk_files
from data2vec.data.tables import RowSpec, TableRows, is_table_path, row_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
"""Images with more pixels than this (after a JPEG's reduced-scale decoding) are refused
before decoding (data.max_image_pixels): 50 MP is 150 MB as 8-bit RGB."""


class ImageSource(ABC):
    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def name(self, index: int) -> str:
        """Human-readable location of sample `index` (for error messages)."""

    @abstractmethod
    def load(self, index: int) -> Image.Image: ...

    def label(self, index: int) -> int | None:
        return None


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode (16-bit, float, CMYK, palette, alpha, ...) -> 8-bit 'RGB' or 'L'."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8))
    elif img.mode in ("P", "PA", "LA", "RGBA") or img.info.get("transparency") is not None:
        img = img.convert("RGBA")  # resolve palettes and transparency before dropping alpha
    return img.convert("RGB" if channels == 3 else "L")


def decode_image(
    data: bytes | str,
    where: str,
    *,
    min_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """An image file (its path, or its bytes) decoded; BadInputError names `where`.

    `min_size` (height, width): a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that
    keeps it at least this large both ways (Pillow's `draft`; the full image otherwise). An
    image of more than `max_pixels` pixels after that is refused before it is decoded."""
    if isinstance(data, bytes):
        if not data:
            raise BadInputError(where, "empty file (0 bytes)")
    else:
        check_file(data)  # missing, a looping symbolic link, a folder, 0 bytes: said plainly
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels applies below
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            if min_size is not None and img.format in ("JPEG", "MPO"):  # MPO: a camera's multi-picture JPEG
                img.draft(None, (max(1, min_size[1]), max(1, min_size[0])))
            w, h = img.size
            if w * h > max_pixels:
                mb = w * h * len(img.getbands()) / 1e6
                img.close()
                raise BadInputError(
                    where,
                    f"{w}x{h} image ({w * h:,} pixels) is over data.max_image_pixels={max_pixels:,}; "
                    f"not decoded (it would take {mb:,.0f} MB): shrink it or raise the limit",
                )
            img.load()
    except Image.DecompressionBombError as e:
        raise BadInputError(where, f"image too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise BadInputError(where, "not a readable image (no image format recognises its data)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, BadInputError):
            raise
        raise BadInputError(where, f"not a readable image ({stable_reason(e)})") from None
    if img.width < 1 or img.height < 1:
        raise BadInputError(where, f"empty image {img.width}x{img.height}")
    return img


class ImageFolderSource(ImageSource):
    def __init__(
        self,
        root: str | Path,
        *,
        min_size: tuple[int, int] | None = None,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.min_size, self.max_pixels = min_size, max_pixels
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder")
        # A compact, streamed index (data/index.py): a few bytes per file, for folders of millions.
        self.files = sorted_table(walk_files(self.root, IMAGE_EXTENSIONS), sep=os.sep)
        if not len(self.files):
            raise ValueError(f"{self.root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
        folder_ids: dict[str, int] = {}
        ids = np.empty(len(self.files), dtype=np.int32)
        for i, f in enumerate(self.files):
            ids[i] = folder_ids.setdefault(os.path.dirname(f), len(folder_ids))
        names = {i: Path(d).relative_to(self.root).as_posix() for d, i in folder_ids.items()}
        classes = sorted(set(names.values()))
        self.classes = classes if len(classes) > 1 else []
        index = {c: i for i, c in enumerate(self.classes)}
        lookup = np.array([index.get(names[i], -1) for i in range(len(names))], dtype=np.int64)
        self._labels = lookup[ids]

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return self.files[index]

    def load(self, index: int) -> Image.Image:
        return decode_image(self.files[index], self.files[index], min_size=self.min_size, max_pixels=self.max_pixels)

    def label(self, index: int) -> int | None:
        return int(self._labels[index]) if self.classes else None


Members = dict[str, dict[str, tarfile.TarInfo]]
"""A shard's members by key (`dir/stem`), then by extension (`jpg`, `cls`, ...)."""

_USTAR_MAGIC_AT = 257


def _hidden_member(name: str) -> bool:
    """A member in a hidden folder, or a hidden or `._*` (macOS AppleDouble) file."""
    return any(part.startswith(".") and part not in (".", "..") for part in name.split("/"))


def _next_header(f: io.BufferedReader, start: int, file_size: int) -> int | None:
    """Offset of the next block at or after `start` (512-aligned) that parses as a ustar member
    header, or None. Reads in 1 MiB pieces; only blocks with the ustar magic are parsed."""
    pos = start
    piece = 1 << 20
    while pos < file_size:
        f.seek(pos)
        buf = f.read(piece + tarfile.BLOCKSIZE)
        i = buf.find(b"ustar", _USTAR_MAGIC_AT)
        while 0 <= i < piece + _USTAR_MAGIC_AT:
            at = i - _USTAR_MAGIC_AT
            if at % tarfile.BLOCKSIZE == 0 and at + tarfile.BLOCKSIZE <= len(buf):
                try:
                    tarfile.TarInfo.frombuf(buf[at : at + tarfile.BLOCKSIZE], tarfile.ENCODING, "surrogateescape")
                    return pos + at
                except tarfile.HeaderError:
                    pass
            i = buf.find(b"ustar", i + 1)
        pos += piece
    return None


def _first_nonzero_block(f: io.BufferedReader, start: int, file_size: int) -> int | None:
    """Offset of the first 512-byte block at or after `start` holding a non-zero byte, or None."""
    pos = start
    while pos < file_size:
        f.seek(pos)
        buf = f.read(1 << 20)
        stripped = len(buf) - len(buf.lstrip(b"\0"))
        if stripped < len(buf):
            return pos + stripped - stripped % tarfile.BLOCKSIZE
        pos += len(buf)
    return None


def index_shard(shard: str) -> tuple[Members, list[str]]:
    """The file members of a tar shard by key, and what is wrong with it ('problem' phrases,
    without the shard's name): cut short (at which byte, inside or after which member), or a
    damaged member header (at which byte; reading resumes at the next readable header, so
    only the damaged member is lost)."""
    members: Members = {}
    problems: list[str] = []
    unusable = file_problem(shard)  # missing, a looping link, 0 bytes
    if unusable is not None:
        return members, [unusable]
    try:
        file_size = os.path.getsize(shard)
        f = open(shard, "rb")  # noqa: SIM115 (closed below)
    except OSError as e:
        return members, [f"not a readable tar file ({e.strerror or e})"]
    with f:
        pos: int | None = 0
        last = ""  # the last member read, to say where a problem is
        while pos is not None:
            f.seek(pos)
            tf: tarfile.TarFile | None = None
            error = ""
            try:
                with tarfile.open(fileobj=f, mode="r:") as tf:  # closing it leaves `f` open
                    for info in tf:
                        if not info.isfile():
                            continue
                        if info.offset_data + info.size > file_size:
                            problems.append(
                                f"truncated tar: cut short at byte {file_size}, inside member {info.name} "
                                f"(bytes {info.offset_data}-{info.offset_data + info.size}); "
                                "that member and any after it are lost"
                            )
                            return members, problems
                        last = info.name
                        base = os.path.basename(info.name)
                        if "." not in base or _hidden_member(info.name):
                            continue
                        stem, ext = base.split(".", 1)
                        key = os.path.join(os.path.dirname(info.name), stem)
                        members.setdefault(key, {})[ext.lower()] = info
            except (tarfile.TarError, OSError) as e:
                error = stable_reason(e)
            end = tf.offset if tf is not None else pos  # where the next header was expected
            after = f"after member {last}" if last else "before any member"
            f.seek(end)
            block = f.read(tarfile.BLOCKSIZE)
            if len(block) == tarfile.BLOCKSIZE and block.strip(b"\0"):  # a damaged header, or not a tar
                nxt = _next_header(f, end + tarfile.BLOCKSIZE, file_size)
                why = f" ({error})" if error else ""
                if end == 0 and nxt is None:
                    problems.append(f"not a readable tar file{why or ' (no tar member header in it)'}")
                elif nxt is None:
                    problems.append(
                        f"unreadable member header at byte {end}, {after}{why}: it and the remaining "
                        f"{file_size - end} bytes are lost (no readable member header follows)"
                    )
                else:
                    problems.append(
                        f"unreadable member header at byte {end}, {after}{why}: the member there is lost; "
                        f"reading resumes at byte {nxt}"
                    )
                pos = nxt
                continue
            if len(block) < tarfile.BLOCKSIZE:  # the data ends where a header should be
                if end == 0 and error:
                    problems.append(f"not a readable tar file ({error})")
                else:
                    problems.append(
                        f"truncated tar: cut short at byte {file_size}, {after} (no end-of-archive marker); "
                        "any members after it are lost"
                    )
                break
            # A zero block: the end-of-archive marker, which is two zero blocks.
            nonzero = _first_nonzero_block(f, end, file_size)
            if nonzero is None:
                if file_size - end < 2 * tarfile.BLOCKSIZE:
                    problems.append(
                        f"truncated tar: cut short at byte {file_size}, {after} (in its end-of-archive marker); "
                        "any members after it are lost"
                    )
                break
            nxt = _next_header(f, nonzero, file_size)  # more after the marker: concatenated tars, or junk
            if nxt != nonzero:
                problems.append(
                    f"unreadable data at byte {nonzero}, after the end-of-archive marker at byte {end}"
                    + (
                        f"; reading resumes at byte {nxt}"
                        if nxt is not None
                        else f"; its {file_size - nonzero} bytes are lost"
                    )
                )
            pos = nxt
    return members, problems


class TarShardSource(ImageSource):
    """Random access into uncompressed tar shards by member offset."""

    def __init__(
        self,
        shards: list[str],
        on_bad_input: str = "fail",
        *,
        min_size: tuple[int, int] | None = None,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if not shards:
            raise ValueError("no tar shards given")
        self.shards = shards
        self.min_size, self.max_pixels = min_size, max_pixels
        self.problems: list[str] = []
        """'shard: problem' for shards cut short, damaged or unreadable (kept only under
        on_bad_input='skip'; the pretraining loader reports them once, with the skipped inputs)."""
        # Compact columns (no Python object per sample): see data/index.py.
        shard_ids, offsets, sizes, labels = array("i"), array("q"), array("q"), array("q")
        keys = StringTableBuilder()
        for s_id, shard in enumerate(shards):
            members, problems = index_shard(shard)
            if problems and on_bad_input == "fail":
                raise BadInputError(shard, problems[0])
            self.problems.extend(f"{shard}: {p}" for p in problems)
            cls_values: dict[str, int] = {}
            cls_members = [(key, exts["cls"]) for key, exts in members.items() if "cls" in exts]
            if cls_members:
                with open(shard, "rb") as f:
                    for key, info in cls_members:
                        f.seek(info.offset_data)
                        raw = f.read(info.size).decode(errors="replace").strip()
                        cls_values[key] = int(raw) if raw.lstrip("-").isdigit() else -1
            for key, exts in members.items():
                img = next((exts[e[1:]] for e in IMAGE_EXTENSIONS if e[1:] in exts), None)
                if img is None:
                    continue
                shard_ids.append(s_id)
                offsets.append(img.offset_data)
                sizes.append(img.size)
                keys.add(key)
                labels.append(cls_values.get(key, -1))
            del members, cls_members  # one shard's member headers at a time (tests/test_streaming.py)
        if not keys.count:
            why = f" ({'; '.join(self.problems)})" if self.problems else ""
            raise ValueError(f"{', '.join(shards)}: no images found in the tar shard(s){why}")
        self.shard_ids = np.asarray(shard_ids, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.keys = keys.finish()
        self._handles: dict[int, object] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.keys)

    def name(self, index: int) -> str:
        return f"{self.shards[self.shard_ids[index]]}:{self.keys[index]}"

    def load(self, index: int) -> Image.Image:
        if self._pid != os.getpid():  # file handles do not survive a fork into loader workers
            self._handles, self._pid = {}, os.getpid()
        s = int(self.shard_ids[index])
        f = self._handles.get(s)
        if f is None:
            f = self._handles[s] = open(self.shards[s], "rb")  # noqa: SIM115
        f.seek(int(self.offsets[index]))  # type: ignore[attr-defined]
        data = f.read(int(self.sizes[index]))  # type: ignore[attr-defined]
        if len(data) != int(self.sizes[index]):
            raise BadInputError(self.name(index), "truncated tar member")
        return decode_image(data, self.name(index), min_size=self.min_size, max_pixels=self.max_pixels)

    def label(self, index: int) -> int | None:
        value = int(self.labels[index])
        return value if value >= 0 else None


class ArraySource(ImageSource):
    """Images from a uint8 array (N, H, W) or (N, H, W, C), with optional labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "array") -> None:
        self.images = images
        self.labels = labels
        self._name = name

    def __len__(self) -> int:
        return len(self.images)

    def name(self, index: int) -> str:
        return f"{self._name}[{index}]"

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def label(self, index: int) -> int | None:
        return None if self.labels is None else int(self.labels[index])


class TableImageSource(ImageSource):
    """Images in a column of parquet/arrow files: the hub's `{bytes, path}` struct or plain
    binary (data/tables.py); with `label_column` not None, labels from that column ("" = `label`)."""

    def __init__(
        self,
        path: str,
        on_bad_input: str = "fail",
        *,
        column: str = "",
        label_column: str | None = None,
        min_size: tuple[int, int] | None = None,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        spec = RowSpec("image", column, label=label_column is not None, label_column=label_column or "")
        self.rows = TableRows(path, spec, on_bad_input)
        self.problems = self.rows.problems
        self.classes = self.rows.classes
        self.min_size, self.max_pixels = min_size, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, index: int) -> str:
        return self.rows.name(index)

    def load(self, index: int) -> Image.Image:
        where = self.rows.name(index)
        data = row_bytes(self.rows.row(index), where)
        return decode_image(data, where, min_size=self.min_size, max_pixels=self.max_pixels)

    def label(self, index: int) -> int | None:
        if "label" not in self.rows.columns[0]:
            return None
        value = self.rows.row(index, "label")
        return int(value) if isinstance(value, (int, np.integer)) and value >= 0 else None


def digits_array(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797 images), upsampled to size x size uint8."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    up = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in imgs])
    return up, d.target.astype(np.int64)


DIGITS_SPLITS = ("all", "train", "test")


def digits_split(split: str) -> np.ndarray:
    """Indices of a fixed split of the 1,797 digits: 1,000 train, 797 test."""
    order = np.random.default_rng(0).permutation(1797)
    return {"all": np.arange(1797), "train": np.sort(order[:1000]), "test": np.sort(order[1000:])}[split]


def open_image_source(
    path: str,
    image_size: int = 32,
    on_bad_input: str = "fail",
    *,
    min_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    column: str = "",
    label_column: str | None = None,
) -> ImageSource:
    """A source for a folder, a tar file, a folder of tar files, a glob of tar files, parquet/arrow
    files (a file, folder or glob; `column` and `label_column`: see `TableImageSource`), or
    builtin:digits. `min_size` and `max_pixels`: see `decode_image`."""
    if path.startswith("builtin:digits"):
        split = path.removeprefix("builtin:digits").lstrip(":") or "all"
        if split not in DIGITS_SPLITS:
            raise FileNotFoundError(f"{path}: unknown built-in data (use builtin:digits[:train|:test])")
        images, labels = digits_array(image_size)
        idx = digits_split(split)
        return ArraySource(images[idx], labels[idx], name=path)
    if is_table_path(path, (*IMAGE_EXTENSIONS, ".tar")):
        return TableImageSource(
            path, on_bad_input, column=column, label_column=label_column, min_size=min_size, max_pixels=max_pixels
        )
    if any(ch in path for ch in "*?["):
        shards = sorted(glob.glob(path))
        if not shards:
            raise FileNotFoundError(f"{path}: no files match")
        return TarShardSource(shards, on_bad_input, min_size=min_size, max_pixels=max_pixels)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() != ".tar":
            raise ValueError(f"{path}: expected a folder of images or a .tar shard")
        return TarShardSource([str(p)], on_bad_input, min_size=min_size, max_pixels=max_pixels)
    tars = sorted(str(t) for t in p.glob("*.tar") if not t.name.startswith("."))
    if tars and next(walk_files(p, IMAGE_EXTENSIONS), None) is None:
        return TarShardSource(tars, on_bad_input, min_size=min_size, max_pixels=max_pixels)
    return ImageFolderSource(p, min_size=min_size, max_pixels=max_pixels)


@dataclass(frozen=True)
class PretrainTransform:
    """RandomResizedCrop (bicubic) -> horizontal flip -> colour jitter -> tensor, normalised."""

    size: tuple[int, int]
    channels: int = 3
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    color_jitter: float = 0.0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a random crop with area in crop_scale and aspect in crop_ratio."""
        area = width * height
        log_r = np.log(self.crop_ratio)
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            ratio = float(np.exp(rng.uniform(log_r[0], log_r[1])))
            w = int(round(np.sqrt(target * ratio)))
            h = int(round(np.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return left, top, left + w, top + h
        # Fallback: the largest centred crop with an allowed aspect ratio.
        in_ratio = width / height
        if in_ratio < self.crop_ratio[0]:
            w, h = width, int(round(width / self.crop_ratio[0]))
        elif in_ratio > self.crop_ratio[1]:
            h, w = height, int(round(height * self.crop_ratio[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return left, top, left + w, top + h

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Tensor:
        img = to_mode(img, self.channels)
        box = self.crop_box(img.width, img.height, rng)
        img = img.resize((self.size[1], self.size[0]), Image.Resampling.BICUBIC, box=box)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.color_jitter > 0:
            s = self.color_jitter
            ops = [ImageEnhance.Brightness, ImageEnhance.Contrast]
            if self.channels == 3:
                ops.append(ImageEnhance.Color)
            for k in rng.permutation(len(ops)):
                img = ops[k](img).enhance(float(rng.uniform(1 - s, 1 + s)))
        return to_tensor(img, self.mean, self.std)


def to_tensor(img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(arr).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def eval_transform(
    img: Image.Image, size: tuple[int, int], channels: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Tensor:
    """Deterministic resize (bicubic) to `size` for feature extraction and probes."""
    img = to_mode(img, channels).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return to_tensor(img, mean, std)
