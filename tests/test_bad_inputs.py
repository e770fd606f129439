"""Bad input corpus (images): each kind is either decoded correctly or named in a one-line error."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.test_train import TINY

from data2vec.cli import main
from data2vec.data.errors import BadInputError
from data2vec.data.images import ImageFolderSource, PretrainTransform, TarShardSource

TINY_NO_DATA = [s for s in TINY if not s.startswith("data.path=")]

TRANSFORM = PretrainTransform(size=(32, 32), channels=3)


def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def _gradient(w: int = 40, h: int = 30) -> np.ndarray:
    return (np.arange(w * h).reshape(h, w) % 256).astype(np.uint8)


def usable_kinds(d: Path) -> dict[str, Path]:
    g = _gradient()
    return {
        "16-bit grey PNG": _save(Image.fromarray(g.astype(np.uint16) * 250), d / "deep16.png"),
        "CMYK JPEG": _save(Image.fromarray(np.stack([g] * 3, -1)).convert("CMYK"), d / "cmyk.jpg"),
        "palette PNG": _save(Image.fromarray(np.stack([g] * 3, -1)).convert("P"), d / "palette.png"),
        "4-channel RGBA PNG": _save(Image.fromarray(np.stack([g] * 4, -1)), d / "rgba.png"),
        "1x1 image": _save(Image.new("RGB", (1, 1), (200, 10, 10)), d / "dot.bmp"),
        "20,000 px wide image": _save(Image.new("RGB", (20_000, 3), (1, 2, 3)), d / "wide.png"),
        "grey-scale WebP": _save(Image.fromarray(g), d / "grey.webp"),
    }


def broken_kinds(d: Path) -> dict[str, Path]:
    (d / "empty.png").write_bytes(b"")
    (d / "notes.jpg").write_text("this is not an image\n")
    buf = io.BytesIO()
    Image.fromarray(np.stack([_gradient(200, 200)] * 3, -1)).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (d / "garbage.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(range(256)))
    return {
        "zero-length file": d / "empty.png",
        "text file named .jpg": d / "notes.jpg",
        "truncated JPEG": d / "truncated.jpg",
        "corrupt WebP": d / "garbage.webp",
    }


def test_unusual_but_valid_images_decode(tmp_path: Path) -> None:
    kinds = usable_kinds(tmp_path)
    src = ImageFolderSource(tmp_path)
    by_name = {Path(src.name(i)).name: i for i in range(len(src))}
    for kind, path in kinds.items():
        x = TRANSFORM(src.load(by_name[path.name]), np.random.default_rng(0))
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all(), kind
    deep = TRANSFORM(src.load(by_name["deep16.png"]), np.random.default_rng(0))
    assert deep.std() > 0.1  # 16-bit values are rescaled, not clipped to white


def test_broken_images_are_named(tmp_path: Path) -> None:
    kinds = broken_kinds(tmp_path)
    src = ImageFolderSource(tmp_path)
    by_name = {Path(src.name(i)).name: i for i in range(len(src))}
    for kind, path in kinds.items():
        with pytest.raises(BadInputError) as err:
            src.load(by_name[path.name])
        assert str(path) in str(err.value), kind
        assert len(str(err.value).splitlines()) == 1, kind


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("RGB", (400, 300)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 120,000 px is > 2x the limit
    with pytest.raises(BadInputError, match="big.png.*too large"):
        ImageFolderSource(tmp_path).load(0)
    assert path.exists()


def test_tar_member_that_is_not_an_image(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in [("a.jpg", b"not a jpeg"), ("a.cls", b"3")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(BadInputError, match=r"s\.tar:a"):
        TarShardSource([str(tmp_path / "s.tar")]).load(0)


def _corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(d / f"good{i:02d}.png")
    usable_kinds(d)
    broken_kinds(d)
    return d


def test_pretrain_skips_and_lists_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _corpus(tmp_path)
    sets = [
        a
        for s in [*TINY_NO_DATA, "train.steps=12", "train.ckpt_every=6", "data.on_bad_input=skip"]
        for a in ("--set", s)
    ]
    code = main(
        [
            "pretrain",
            "--preset",
            "digits-tiny",
            "--data",
            str(data),
            "--no-progress",
            *sets,
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # 41 files, 4 broken; 12 steps x 8 = 96 samples read, so every file is seen at least twice.
    assert summary["skipped_inputs"] == 4
    assert {Path(f.split(":")[0]).name for f in summary["skipped_input_files"]} == {
        "empty.png",
        "notes.jpg",
        "truncated.jpg",
        "garbage.webp",
    }
    assert "skipped 4 bad input file(s)" in capsys.readouterr().out


def test_pretrain_fails_on_first_bad_file_and_keeps_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _corpus(tmp_path)
    sets = [a for s in [*TINY_NO_DATA, "train.steps=12", "train.ckpt_every=100"] for a in ("--set", s)]
    code = main(
        [
            "pretrain",
            "--preset",
            "digits-tiny",
            "--data",
            str(data),
            "--no-progress",
            *sets,
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "data.on_bad_input=skip" in err
    assert any(name in err for name in ("empty.png", "notes.jpg", "truncated.jpg", "garbage.webp"))
