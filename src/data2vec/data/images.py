"""Image data: folders, WebDataset-style tar shards, scikit-learn's digits, and augmentation.

Sources give random access to decoded PIL images (plus an optional integer label):

- `ImageFolderSource`: every jpg/jpeg/png/webp/bmp under a folder, recursively; a
  `<class>/` sub-folder layout gives labels but none are required.
- `TarShardSource`: `key.jpg` (+ `key.cls`) members of one or more tar files, read in
  place: the member headers are indexed once, then each image is read at its byte offset,
  never extracted.
- `ArraySource`: images in a uint8 array (the built-in `builtin:digits`).

`PretrainTransform` is the augmentation of the official recipes (RandomResizedCrop, horizontal
flip, colour jitter; docs/design.md, 'Presets and their numbers'), written with Pillow and
driven by an explicit numpy generator.
"""

from __future__ import annotations

import glob
import io
import os
import tarfile
from abc import ABC, abstractmethod
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, UnidentifiedImageError
from torch import Tensor

from data2vec.data.errors import BadInputError
from data2vec.data.index import StringTableBuilder, sorted_table, walk_files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


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


def decode_image(data: bytes | str, where: str) -> Image.Image:
    """An image file (its path, or its bytes) decoded; BadInputError names `where`."""
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        img.load()
    except Image.DecompressionBombError as e:
        raise BadInputError(where, f"image too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadInputError(where, f"not a readable image ({e})") from None
    if img.width < 1 or img.height < 1:
        raise BadInputError(where, f"empty image {img.width}x{img.height}")
    return img


class ImageFolderSource(ImageSource):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
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
        return decode_image(self.files[index], self.files[index])

    def label(self, index: int) -> int | None:
        return int(self._labels[index]) if self.classes else None


class TarShardSource(ImageSource):
    """Random access into uncompressed tar shards by member offset."""

    def __init__(self, shards: list[str], on_bad_input: str = "fail") -> None:
        if not shards:
            raise ValueError("no tar shards given")
        self.shards = shards
        self.problems: list[str] = []
        """Shards that are cut short or unreadable (kept only under on_bad_input='skip')."""
        # Compact columns (no Python object per sample): see data/index.py.
        shard_ids, offsets, sizes, labels = array("i"), array("q"), array("q"), array("q")
        keys = StringTableBuilder()
        for s_id, shard in enumerate(shards):
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            cls_values: dict[str, int] = {}
            problem = None
            try:
                file_size = os.path.getsize(shard)
                with tarfile.open(shard, mode="r:") as tf:
                    try:
                        for info in tf:
                            if not info.isfile():
                                continue
                            if info.offset_data + info.size > file_size:
                                problem = f"cut short inside member {info.name} (truncated tar)"
                                break
                            base = os.path.basename(info.name)
                            if "." not in base:
                                continue
                            stem, ext = base.split(".", 1)
                            key = os.path.join(os.path.dirname(info.name), stem)
                            members.setdefault(key, {})[ext.lower()] = info
                        else:
                            # A complete archive ends with two zero blocks after the last member.
                            if problem is None and file_size - tf.offset < 1024:
                                problem = "cut short after its last complete member (truncated tar)"
                    except (tarfile.TarError, OSError) as e:
                        problem = f"unreadable after {sum(len(m) for m in members.values())} members ({e})"
                    for key, exts in members.items():
                        if "cls" in exts:
                            f = tf.extractfile(exts["cls"])
                            raw = f.read().decode(errors="replace").strip() if f is not None else ""
                            cls_values[key] = int(raw) if raw.lstrip("-").isdigit() else -1
            except (tarfile.TarError, OSError) as e:
                problem = f"not a readable tar file ({e})"
            if problem is not None:
                if on_bad_input == "fail":
                    raise BadInputError(shard, problem)
                self.problems.append(f"{shard}: {problem}")
            for key, exts in members.items():
                img = next((exts[e[1:]] for e in IMAGE_EXTENSIONS if e[1:] in exts), None)
                if img is None:
                    continue
                shard_ids.append(s_id)
                offsets.append(img.offset_data)
                sizes.append(img.size)
                keys.add(key)
                labels.append(cls_values.get(key, -1))
        if not keys.count:
            raise ValueError(f"{', '.join(shards)}: no images found in the tar shard(s)")
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
        return decode_image(data, self.name(index))

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


def open_image_source(path: str, image_size: int = 32, on_bad_input: str = "fail") -> ImageSource:
    """A source for a folder, a tar file, a folder of tar files, a glob of tar files, or builtin:digits."""
    if path.startswith("builtin:digits"):
        split = path.removeprefix("builtin:digits").lstrip(":") or "all"
        if split not in DIGITS_SPLITS:
            raise FileNotFoundError(f"{path}: unknown built-in data (use builtin:digits[:train|:test])")
        images, labels = digits_array(image_size)
        idx = digits_split(split)
        return ArraySource(images[idx], labels[idx], name=path)
    if any(ch in path for ch in "*?["):
        shards = sorted(glob.glob(path))
        if not shards:
            raise FileNotFoundError(f"{path}: no files match")
        return TarShardSource(shards, on_bad_input)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() != ".tar":
            raise ValueError(f"{path}: expected a folder of images or a .tar shard")
        return TarShardSource([str(p)], on_bad_input)
    tars = sorted(str(t) for t in p.glob("*.tar"))
    has_images = any(q.suffix.lower() in IMAGE_EXTENSIONS for q in p.rglob("*"))
    if tars and not has_images:
        return TarShardSource(tars, on_bad_input)
    return ImageFolderSource(p)


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
