"""Large data: indexing 100,000 files keeps memory within a few bytes per file.

The index of an image folder, of WebDataset-style tar shards and of an audio manifest stores
packed names and numeric columns (data/index.py), never one Python object per file, and the
folder walk and the manifest read are streamed. tracemalloc measures the peak growth of
Python allocations while indexing; the bound below is per file.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from data2vec.config import AudioDataConfig
from data2vec.data.audio import scan_audio
from data2vec.data.images import ImageFolderSource, TarShardSource
from data2vec.data.index import StringTable, sorted_table

N_FILES = 100_000
NAME_COPIES = 4
BYTES_PER_FILE = 64
"""Bound on the peak growth while indexing: NAME_COPIES x the UTF-8 bytes of all names (the
packed table, a sort key and the buffer growth) + BYTES_PER_FILE per file (offsets, lengths,
labels). For comparison, a list of `Path` objects costs ~250 bytes per file plus the names."""


def _bound(names_bytes: int, n: int) -> int:
    return NAME_COPIES * names_bytes + BYTES_PER_FILE * n


def _peak_growth(fn: Callable[[], object]) -> tuple[int, object]:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - base, result


def test_string_table_roundtrip_and_order() -> None:
    names = ["b/x.png", "a-b/y.png", "a/z.png", "é/ü.png", ""]
    t = StringTable(names)
    assert list(t) == names and len(t) == 5 and t[-1] == ""
    # Sorted like Path objects: by components ("a" < "a-b"), not by raw characters.
    assert list(sorted_table(names[:4], sep="/")) == [str(p) for p in sorted(Path(n) for n in names[:4])]
    with pytest.raises(IndexError):
        t[5]


def test_image_folder_of_100k_files(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    for d in range(10):
        folder = tmp_path / f"class_{d}"
        folder.mkdir()
        for i in range(N_FILES // 10):
            (folder / f"img_{i:06d}.png").touch()  # indexing never opens them
    made = time.perf_counter() - t0
    growth, source = _peak_growth(lambda: ImageFolderSource(tmp_path))
    assert isinstance(source, ImageFolderSource)
    assert len(source) == N_FILES and source.classes == [f"class_{d}" for d in range(10)]
    assert source.name(0) == os.path.join(tmp_path, "class_0", "img_000000.png")
    assert source.label(N_FILES - 1) == 9
    names = source.files.nbytes - 8 * N_FILES
    assert growth < _bound(names, N_FILES), f"{growth / N_FILES:.0f} bytes per file (making files: {made:.1f} s)"


def test_tar_shards_with_100k_members(tmp_path: Path) -> None:
    per_shard = N_FILES // 4
    for s in range(4):
        with tarfile.open(tmp_path / f"shard-{s}.tar", "w") as tf:
            for i in range(per_shard):
                for ext, data in (("png", b""), ("cls", str(i % 7).encode())):
                    info = tarfile.TarInfo(f"{s:02d}_{i:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    growth, source = _peak_growth(lambda: TarShardSource(shards))
    assert isinstance(source, TarShardSource)
    assert len(source) == N_FILES and source.label(8) == 1
    assert source.name(per_shard).endswith("shard-1.tar:01_000000")
    # Parsing a shard holds that shard's member headers for a moment: bounded by the shard
    # size, not the number of shards. The final index is a few bytes per sample.
    names = source.keys.nbytes - 8 * N_FILES
    assert growth < _bound(names, N_FILES) + 1500 * per_shard, f"{growth / N_FILES:.0f} bytes per file"


def test_audio_manifest_of_100k_lines(tmp_path: Path) -> None:
    manifest = tmp_path / "train.tsv"
    with open(manifest, "w") as f:
        f.write(f"{tmp_path}\n")
        for i in range(N_FILES):
            f.write(f"spk{i % 100:03d}/utt_{i:06d}.flac\t{32000 + i}\n")  # lengths given: no file opened
    cfg = AudioDataConfig(min_sample_size=32000)
    growth, source = _peak_growth(lambda: scan_audio(str(manifest), cfg))
    clips = source.clips  # type: ignore[attr-defined]
    assert len(clips) == N_FILES and clips[5].samples == 32005 and clips[5].listed
    assert clips[-1].path == str(tmp_path / "spk099" / "utt_099999.flac")
    names = sum(len(c.path.encode()) for c in clips)
    assert growth < _bound(names, N_FILES), f"{growth / N_FILES:.0f} bytes per clip, names {names / N_FILES:.0f}"
