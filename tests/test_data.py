"""Image sources, augmentation, deterministic resumable sampling."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.test_train import tiny_run_config

from data2vec.data.errors import BadInputError
from data2vec.data.images import (
    ImageFolderSource,
    PretrainTransform,
    TarShardSource,
    open_image_source,
)
from data2vec.data.pipeline import build_pretrain_loader
from data2vec.data.sampling import ResumableBatchSampler


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _make_tar(path: Path, n: int, with_cls: bool = True) -> None:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            for name, data in [(f"sample{i:03d}.jpg", _png((i * 10 % 256, 0, 0), fmt="JPEG"))] + (
                [(f"sample{i:03d}.cls", str(i % 3).encode())] if with_cls else []
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_image_folder_is_recursive_and_labels_optional(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "a" / "deep" / "y.JPG").write_bytes(_png((0, 255, 0), fmt="JPEG"))
    (tmp_path / "b" / "z.bmp").write_bytes(_png((0, 0, 255), fmt="BMP"))
    (tmp_path / "b" / "w.webp").write_bytes(_png((9, 9, 9), fmt="WEBP"))
    (tmp_path / "notes.txt").write_text("not an image")
    src = ImageFolderSource(tmp_path)
    assert len(src) == 4
    assert {Path(src.name(i)).name for i in range(4)} == {"x.png", "y.JPG", "z.bmp", "w.webp"}
    assert src.load(0).size == (40, 30)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "one.png").write_bytes(_png((1, 2, 3)))
    assert ImageFolderSource(flat).label(0) is None


def test_empty_folder_and_missing_path_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=str(tmp_path)):
        open_image_source(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope"):
        open_image_source(str(tmp_path / "nope"))


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    src = ImageFolderSource(tmp_path)
    with pytest.raises(BadInputError, match="bad.png"):
        src.load(0)


def test_tar_shards_read_in_place_with_labels(tmp_path: Path) -> None:
    _make_tar(tmp_path / "train-00.tar", 5)
    _make_tar(tmp_path / "train-01.tar", 4, with_cls=False)
    src = open_image_source(str(tmp_path / "train-*.tar"))
    assert isinstance(src, TarShardSource)
    assert len(src) == 9
    assert [src.label(i) for i in range(5)] == [0, 1, 2, 0, 1]
    assert src.label(6) is None
    img = src.load(3)
    assert img.size == (40, 30)
    assert abs(np.asarray(img)[..., 0].mean() - 30) < 8  # the red value written for sample 3
    assert "train-01.tar:sample002" in src.name(7)
    # A folder holding only shards is read as shards too.
    assert len(open_image_source(str(tmp_path))) == 9


def test_truncated_tar_is_reported(tmp_path: Path) -> None:
    _make_tar(tmp_path / "s.tar", 20)
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(BadInputError, match="cut.tar.*truncated"):
        TarShardSource([str(tmp_path / "cut.tar")])
    kept = TarShardSource([str(tmp_path / "cut.tar")], on_bad_input="skip")
    assert 0 < len(kept) < 20 and "cut.tar" in kept.problems[0]
    kept.load(len(kept) - 1)  # every member kept is complete


@pytest.mark.parametrize("channels", [1, 3])
def test_transform_shape_determinism_and_range(channels: int) -> None:
    t = PretrainTransform(
        size=(32, 48),
        channels=channels,
        crop_scale=(0.08, 1.0),
        color_jitter=0.4,
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
    )
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    a = t(img, np.random.default_rng(7))
    b = t(img, np.random.default_rng(7))
    c = t(img, np.random.default_rng(8))
    assert a.shape == (channels, 32, 48) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1.0 - 1e-6 and a.max() <= 1.0 + 1e-6


def test_crop_box_respects_scale_and_ratio() -> None:
    t = PretrainTransform(size=(32, 32), crop_scale=(0.2, 0.5))
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = t.crop_box(100, 80, rng)
        w, h = right - left, bottom - top
        assert left >= 0 and right <= 100 and top >= 0 and bottom <= 80
        assert 0.2 * 8000 * 0.9 <= w * h <= 0.5 * 8000 * 1.1
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_sampler_resume_gives_the_same_batches() -> None:
    full = ResumableBatchSampler(50, 8, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(14)]  # crosses two epoch boundaries (6 batches/epoch)
    resumed = iter(ResumableBatchSampler(50, 8, seed=3, start_batch=9))
    assert [next(resumed) for _ in range(5)] == batches[9:]
    epoch0 = [i for b in batches[:6] for i, _ in b]
    assert len(set(epoch0)) == 48  # no repeats within an epoch
    assert [i for i, _ in batches[6]] != [i for i, _ in batches[0]]  # reshuffled per epoch


def test_sampler_splits_global_batch_across_ranks() -> None:
    r0 = next(iter(ResumableBatchSampler(64, 4, seed=0, world_size=2, rank=0)))
    r1 = next(iter(ResumableBatchSampler(64, 4, seed=0, world_size=2, rank=1)))
    one = next(iter(ResumableBatchSampler(64, 8, seed=0)))
    assert r0 + r1 == one


def test_too_small_dataset_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableBatchSampler(5, 8, seed=0)


def test_loader_batches_have_masks_and_are_reproducible() -> None:
    cfg = tiny_run_config(2)
    it1, n = build_pretrain_loader(cfg, start_batch=0)
    b0, b1 = next(it1), next(it1)
    it2, _ = build_pretrain_loader(cfg, start_batch=1)
    again = next(it2)
    M = cfg.masking.num_masks
    assert n == 1000
    assert b0.inputs.shape == (8, 1, 32, 32)
    assert b0.mask.shape == (8 * M, 64) and b0.mask.dtype == torch.bool
    assert torch.equal(b1.inputs, again.inputs) and torch.equal(b1.mask, again.mask)
    assert len(set(b0.mask.sum(1).tolist())) == 1  # equal counts per row
