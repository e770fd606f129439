"""More bad inputs: data with nothing usable left, symbolic-link loops, cut and corrupt tar
shards, huge images, hidden and AppleDouble files, files a manifest lists that do not exist.

Runs that could hang (every input bad under `skip`) go through the CLI in a subprocess with a
timeout, so a regression fails the test instead of stalling the suite.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from tests.test_audio_data import tiny_cfg, tone, write_clips
from tests.test_bad_inputs_media import AUDIO_SHRINK
from tests.test_extract import make_run, make_tiny_config
from tests.test_text_cli import SHRINK
from tests.test_train import TINY

from data2vec.cli import main
from data2vec.config import AudioDataConfig, TextDataConfig
from data2vec.data import images
from data2vec.data.audio import AudioDataset, find_audio_files, load_audio, scan_audio
from data2vec.data.errors import BadInputError
from data2vec.data.images import ImageFolderSource, PretrainTransform, TarShardSource, decode_image, open_image_source
from data2vec.data.pipeline import PIPELINES
from data2vec.data.text import list_text_files, tokenize_corpus
from data2vec.tokenizer import TextTokenizer

TINY_NO_DATA = [s for s in TINY if not s.startswith("data.path=")]
IMAGE_SETS = [*TINY_NO_DATA, "train.steps=4", "train.ckpt_every=100"]
SCAN = AudioDataConfig(min_sample_size=4000)
ROOT = Path(__file__).resolve().parents[1]


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _png(path: Path, seed: int = 0, size: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _jpeg_bytes(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        buf, format="JPEG"
    )
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m data2vec ARGV` in a subprocess; a run that hangs fails with TimeoutExpired."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "data2vec", *argv], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("data2vec:") or "Traceback" in ln]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------- item 8: nothing usable left


def _zero_byte_images(d: Path) -> list[str]:
    d.mkdir()
    for i in range(20):
        (d / f"img{i:02d}.jpg").write_bytes(b"")
    return ["--preset", "digits-tiny", *_sets(IMAGE_SETS)]


def _bad_tar_members(d: Path) -> list[str]:
    d.mkdir()
    _write_tar(d / "shard-000.tar", [(f"s{i:02d}.jpg", b"not a jpeg") for i in range(20)])
    return ["--preset", "digits-tiny", *_sets(IMAGE_SETS)]


def _zero_byte_wavs(d: Path) -> list[str]:
    d.mkdir()
    for i in range(6):
        (d / f"c{i}.wav").write_bytes(b"")
    return ["--preset", "audio-tiny", *_sets([*AUDIO_SHRINK, "train.steps=4", "data.audio.batch_seconds=1.0"])]


def _manifest_of_missing_files(d: Path) -> list[str]:
    d.mkdir()
    (d / "train.tsv").write_text("".join(f"gone{i}.wav\t8000\n" for i in range(6)))
    return ["--preset", "audio-tiny", *_sets([*AUDIO_SHRINK, "train.steps=4", "data.audio.batch_seconds=1.0"])]


def _empty_text_files(d: Path) -> list[str]:
    d.mkdir()
    for i in range(3):
        (d / f"doc{i}.txt").write_text("\n\n  \n")
    return ["--preset", "text-tiny", *_sets([*SHRINK, "train.steps=2"])]


NOTHING_USABLE = {
    "image folder of zero-byte .jpg": (_zero_byte_images, "no usable images"),
    "tar shard of non-image members": (_bad_tar_members, "no usable images"),
    "audio folder of zero-byte .wav": (_zero_byte_wavs, "no usable clips"),
    "manifest of missing files": (_manifest_of_missing_files, "no usable clips"),
    "text folder of empty files": (_empty_text_files, "no usable text"),
}


@pytest.mark.parametrize("kind", list(NOTHING_USABLE))
def test_nothing_usable_under_skip_stops_with_one_line(kind: str, tmp_path: Path) -> None:
    make, reason = NOTHING_USABLE[kind]
    data = tmp_path / "data"
    args = make(data)
    data_arg = str(data / "train.tsv") if kind == "manifest of missing files" else str(data)
    proc = _cli("pretrain", *args, "--data", data_arg, "--no-progress", "--on-bad-input", "skip", "--out",
                str(tmp_path / "run"))  # fmt: skip
    line = _one_error_line(proc)
    assert data_arg in line and reason in line, line


def test_image_folder_of_zero_byte_files_under_fail_names_one(tmp_path: Path) -> None:
    args = _zero_byte_images(tmp_path / "data")
    proc = _cli("pretrain", *args, "--data", str(tmp_path / "data"), "--no-progress", "--out", str(tmp_path / "run"))
    line = _one_error_line(proc)
    assert str(tmp_path / "data" / "img") in line and "empty file (0 bytes)" in line, line


# ---------------------------------------------------------------------- item 9: symbolic-link loops


def _folder_with_loops(d: Path, n_good: int = 16) -> tuple[Path, Path]:
    d.mkdir(parents=True)
    for i in range(n_good):
        _png(d / f"good{i:02d}.png", i)
    loop = d / "loop.jpg"
    loop.symlink_to("loop.jpg")  # a link to itself: ELOOP on stat
    (d / "sub").symlink_to(".")  # a folder link back to its parent: not followed
    return d, loop


def test_symlink_loop_in_image_folder_is_a_bad_file(tmp_path: Path) -> None:
    d, loop = _folder_with_loops(tmp_path / "imgs")
    src = ImageFolderSource(d)
    assert len(src) == 17
    with pytest.raises(BadInputError) as err:
        src.load([src.name(i) for i in range(len(src))].index(str(loop)))
    msg = str(err.value)
    assert msg.startswith(f"{loop}: ") and "symbolic link" in msg and len(msg.splitlines()) == 1, msg


def test_symlink_loop_in_pretrain_is_skipped_or_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, loop = _folder_with_loops(tmp_path / "imgs")
    argv = ["pretrain", "--preset", "digits-tiny", "--data", str(d), "--no-progress"]
    sets = _sets([*TINY_NO_DATA, "train.steps=6", "train.ckpt_every=100"])  # 48 samples: every file read
    assert main([*argv, *sets, "--on-bad-input", "skip", "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_inputs"] == 1 and summary["skipped_input_files"][0].startswith(f"{loop}: ")
    capsys.readouterr()
    assert main([*argv, *sets, "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(loop) in err and "symbolic link" in err, err


def test_symlink_loop_in_extract_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run", make_tiny_config(2))
    d, loop = _folder_with_loops(tmp_path / "imgs", n_good=2)
    code = main(
        ["extract", "--checkpoint", str(tmp_path / "run"), "--input", str(d)]
        + ["--out", str(tmp_path / "f.npy"), "--no-progress"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(loop) in err and "symbolic link" in err, err


def test_symlink_loops_in_audio_and_text_folders_are_named(tmp_path: Path) -> None:
    wavs = tmp_path / "wavs"
    write_clips(wavs, [8000] * 2)
    (wavs / "loop.wav").symlink_to("loop.wav")
    source = scan_audio(str(wavs), SCAN, "skip")
    assert len(source) == 2 and len(source.skipped) == 1
    assert source.skipped[0].startswith(f"{wavs / 'loop.wav'}: ") and "symbolic link" in source.skipped[0]
    with pytest.raises(BadInputError, match="loop.wav: .*symbolic link"):
        scan_audio(str(wavs), SCAN, "fail")
    with pytest.raises(BadInputError, match="loop.wav: .*symbolic link"):
        load_audio(wavs / "loop.wav", 16_000)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("one document\nanother document\n")
    (texts / "loop.txt").symlink_to("loop.txt")
    files = list_text_files(texts)
    assert texts / "loop.txt" in files
    tok = TextTokenizer.train(["one document", "another document"] * 20, 300)
    stats = tokenize_corpus(files, tok, TextDataConfig(), "skip", tmp_path / "tokens.bin")
    assert stats.files == 1 and len(stats.skipped) == 1
    assert stats.skipped[0].startswith(f"{texts / 'loop.txt'}: ") and "symbolic link" in stats.skipped[0]


# ---------------------------------------------------------------------- item 11: cut and corrupt tar shards


def _shard(path: Path, n: int = 24, bad_at: int = 3) -> Path:
    members = [(f"{i:03d}.jpg", _jpeg_bytes(i)) for i in range(n)]
    members.insert(bad_at, ("bad.jpg", b"not a jpeg at all"))
    return _write_tar(path, members)


def test_bad_tar_member_message_is_the_same_every_time(tmp_path: Path) -> None:
    src = TarShardSource([str(_shard(tmp_path / "s.tar"))])
    i = [src.name(k) for k in range(len(src))].index(f"{tmp_path / 's.tar'}:bad")
    messages = set()
    for _ in range(3):
        with pytest.raises(BadInputError) as err:
            src.load(i)
        messages.add(str(err.value))
    assert len(messages) == 1 and " at 0x" not in messages.pop()


def test_cut_tar_shard_is_reported_once_with_offset_and_member(tmp_path: Path) -> None:
    whole = _shard(tmp_path / "whole.tar").read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tf:
        offsets = {m.name: m.offset_data for m in tf}
    cut_at = offsets["012.jpg"] + 100
    cut = tmp_path / "data" / "cut.tar"
    cut.parent.mkdir()
    cut.write_bytes(whole[:cut_at])
    with pytest.raises(BadInputError) as err:
        TarShardSource([str(cut)])
    msg = str(err.value)
    assert msg.startswith(f"{cut}: ") and f"byte {cut_at}" in msg and "012.jpg" in msg, msg
    src = TarShardSource([str(cut)], "skip")
    assert len(src) == 13 and len(src.problems) == 1  # 000..011 and bad: the members before the cut
    argv = ["pretrain", "--preset", "digits-tiny", "--data", str(cut), "--no-progress", "--on-bad-input", "skip"]
    assert main([*argv, *_sets([*TINY_NO_DATA, "train.steps=6"]), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    listed = summary["skipped_input_files"]
    assert summary["skipped_inputs"] == 2, listed  # the cut, and the one bad member once
    assert [s for s in listed if "012.jpg" in s] == [src.problems[0]]
    assert any(s.startswith(f"{cut}:bad: ") for s in listed)


def test_corrupt_header_mid_shard_is_reported_and_later_members_kept(tmp_path: Path) -> None:
    path = _shard(tmp_path / "s.tar", n=12, bad_at=12)
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        header = next(m for m in tf if m.name == "005.jpg").offset
    data[header : header + 100] = b"x" * 100  # its header's checksum no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match=rf"s\.tar: .*byte {header}"):
        TarShardSource([str(path)])
    src = TarShardSource([str(path)], "skip")
    keys = {src.keys[i] for i in range(len(src))}
    assert keys == {f"{i:03d}" for i in range(12) if i != 5} | {"bad"}  # only the damaged member lost
    assert len(src.problems) == 1 and f"byte {header}" in src.problems[0]
    good = [i for i in range(len(src)) if src.keys[i] == "011"][0]
    assert np.asarray(src.load(good)).shape == (32, 32, 3)


def test_tar_shard_with_nothing_readable_names_the_problem(tmp_path: Path) -> None:
    path = _shard(tmp_path / "s.tar", n=2)
    path.write_bytes(path.read_bytes()[:700])  # cut inside the first member
    with pytest.raises(ValueError, match=r"no images found.*000\.jpg"):
        TarShardSource([str(path)], "skip")


# ---------------------------------------------------------------------- item 14: huge images


def _huge_png(path: Path, width: int, height: int) -> Path:
    """A valid grey PNG of width x height zero pixels, written without holding the image."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_huge_png_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _huge_png(tmp_path / "huge.png", 12_000, 12_000)
    assert images.DEFAULT_MAX_IMAGE_PIXELS < 12_000 * 12_000
    with pytest.raises(BadInputError) as err:
        decode_image(str(path), str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "12000x12000" in msg and "data.max_image_pixels" in msg, msg
    assert len(msg.splitlines()) == 1
    # the limit is a parameter: a small one refuses a small PNG, through the source too
    small = _png(tmp_path / "small.png", size=200)
    with pytest.raises(BadInputError, match="small.png: .*200x200"):
        open_image_source(str(tmp_path), max_pixels=10_000).load(1)
    assert decode_image(str(small), str(small)).size == (200, 200)


def test_huge_png_costs_no_memory(tmp_path: Path) -> None:
    path = _huge_png(tmp_path / "huge.png", 12_000, 12_000)
    code = (
        "import resource, sys\n"
        "from data2vec.data.images import decode_image\n"
        "from data2vec.data.errors import BadInputError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    decode_image(sys.argv[1], sys.argv[1])\n"
        "except BadInputError:\n"
        "    pass\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) < 20, out.stdout  # MB; decoding it takes 144 MB (grew ~105 MB before)


def test_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1600, 2400, 3), dtype=np.uint8)).save(path)
    full = decode_image(str(path), str(path))
    assert full.size == (2400, 1600)
    small = decode_image(str(path), str(path), min_size=(100, 100))
    assert small.size == (300, 200)  # 1/8 scale: the smallest that stays >= 100 px both ways
    src = open_image_source(str(tmp_path), min_size=(700, 700))
    assert src.load(0).size == (1200, 800)  # 1/2 scale
    # pretraining asks for enough pixels that the smallest crop is not upsampled
    x = PretrainTransform(size=(32, 32))(src.load(0), np.random.default_rng(0))
    assert x.shape == (3, 32, 32) and torch.isfinite(x).all()


# ---------------------------------------------------------------------- item 14: hidden files


def test_hidden_files_and_folders_are_not_indexed(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    (d / "cats").mkdir(parents=True)
    (d / "dogs").mkdir()
    (d / ".thumbs").mkdir()
    for i in range(3):
        _png(d / "cats" / f"c{i}.png", i)
        _png(d / "dogs" / f"d{i}.png", i)
        (d / "cats" / f"._c{i}.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    _png(d / ".thumbs" / "t.png")
    (d / ".hidden.jpg").write_bytes(b"junk")
    src = ImageFolderSource(d)
    names = sorted(Path(src.name(i)).relative_to(d).as_posix() for i in range(len(src)))
    assert names == [f"cats/c{i}.png" for i in range(3)] + [f"dogs/d{i}.png" for i in range(3)]
    assert src.classes == ["cats", "dogs"]
    # tar shards made on macOS carry ._ members, and hidden folders
    members = [("a.jpg", _jpeg_bytes(0)), ("._a.jpg", b"junk"), (".cache/b.jpg", b"junk"), ("./c.jpg", _jpeg_bytes(1))]
    tar = TarShardSource([str(_write_tar(tmp_path / "s.tar", members))])
    assert sorted(tar.keys[i] for i in range(len(tar))) == ["./c", "a"]
    # audio and text folders share the walk
    wavs = tmp_path / "wavs"
    write_clips(wavs, [8000, 8000])
    (wavs / "._clip000.wav").write_bytes(b"junk")
    (wavs / ".trash").mkdir()
    sf.write(wavs / ".trash" / "old.wav", tone(8000), 16_000)
    source = scan_audio(str(wavs), SCAN, "fail")
    assert len(source) == 2 and not source.skipped
    assert [f.name for f in find_audio_files(wavs)] == ["clip000.wav", "clip001.wav"]
    texts = tmp_path / ".data" / "corpus"  # a hidden folder above the data does not hide it
    (texts / ".git").mkdir(parents=True)
    (texts / "a.txt").write_text("a document\n")
    (texts / "._a.txt").write_bytes(b"\x00\x05junk")
    (texts / ".git" / "notes.txt").write_text("not data\n")
    assert list_text_files(texts) == [texts / "a.txt"]


# ---------------------------------------------------------------------- item 14: missing files in a manifest


def test_missing_file_in_manifest_is_named(tmp_path: Path) -> None:
    write_clips(tmp_path, [8000] * 2)
    (tmp_path / "train.tsv").write_text("clip000.wav\t8000\ngone.wav\t8000\nclip001.wav\t8000\n")
    cfg = tiny_cfg(tmp_path / "train.tsv", 2, "data.on_bad_input=skip")
    source = scan_audio(str(tmp_path / "train.tsv"), cfg.data.audio, "skip")
    item = AudioDataset(source, cfg.data.audio)[(1, 0)]
    assert item.x is None and item.error is not None
    assert item.error.startswith(f"{tmp_path / 'gone.wav'}: ") and "does not exist" in item.error, item.error
    assert "System error" not in item.error and "train.tsv" in item.error
    with pytest.raises(BadInputError, match=r"gone\.wav: no such file \(it does not exist\)"):
        load_audio(tmp_path / "gone.wav", 16_000)
    it, _ = PIPELINES["audio"].loader(tiny_cfg(tmp_path / "train.tsv", 2), 0, 0, 1)
    with pytest.raises(BadInputError, match=r"gone\.wav: no such file"):
        for _ in range(4):
            next(it)


def test_the_pixel_limit_is_the_config_key(tmp_path: Path) -> None:
    from tests.test_train import tiny_run_config

    from data2vec.data.errors import BadInputError
    from data2vec.training import train

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(8):
        Image.new("L", (64, 64), color=i * 30).save(folder / f"{i}.png")
    cfg = tiny_run_config(2, f"data.path={folder}", "train.steps=1", "data.max_image_pixels=1000")
    with pytest.raises(BadInputError, match=r"64x64 image \(4,096 pixels\) is over data.max_image_pixels=1,000"):
        train(cfg, tmp_path / "run", progress=False, quiet=True)
    cfg = tiny_run_config(2, f"data.path={folder}", "train.steps=1")
    assert train(cfg, tmp_path / "run2", progress=False, quiet=True).step == 1
