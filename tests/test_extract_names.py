"""Input names beside extracted features: any file name (bytes that are not UTF-8, line breaks,
quotes) is written losslessly, one entry per feature row, and `read_names` gives it back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import make_tiny_config
from tests.test_extract import make_run, write_images

from data2vec.cli import main
from data2vec.extract import read_names, sidecar_path, write_features

ODD_NAMES = [
    "plain.png",
    os.fsdecode(b"caf\xe9-latin1.png"),  # not UTF-8: os.fsdecode gives a lone surrogate
    "new\nline.png",
    "carriage\rreturn.png",
    "para\u2029sep and \u2028line sep.png",  # str.splitlines() splits on these
    '"starts with a quote.png',
    "back\\slash \\n and tab\t.png",
    "ünïcødé ✓.png",
]


def test_write_features_round_trips_every_name(tmp_path: Path) -> None:
    feats = {3: np.arange(len(ODD_NAMES) * 4, dtype=np.float32).reshape(len(ODD_NAMES), 4)}
    written = write_features(tmp_path / "f.npy", ODD_NAMES, feats, "mean")
    side = sidecar_path(tmp_path / "f.npy")
    assert written == [tmp_path / "f.npy", side]
    raw = side.read_bytes()
    raw.decode("utf-8")  # the list itself is valid UTF-8
    lines = raw.decode("utf-8").splitlines()
    assert len(lines) == len(ODD_NAMES) == np.load(tmp_path / "f.npy").shape[1]  # one line per row, any reader
    assert lines[0] == "plain.png" and lines[-1] == "ünïcødé ✓.png"  # ordinary names as they are
    assert json.loads(lines[2]) == "new\nline.png"  # unusual ones as JSON strings
    assert read_names(tmp_path / "f.npy") == ODD_NAMES == read_names(side)
    assert os.fsencode(read_names(side)[1]) == b"caf\xe9-latin1.png"
    # the one-line reader the docs give
    one_line = [json.loads(s) if s.startswith('"') else s for s in side.read_text("utf-8").split("\n")[:-1]]
    assert one_line == ODD_NAMES
    # per-token output (an .npz beside) and .npz: the same list
    per_token = {3: [np.zeros((2, 4), np.float32) for _ in ODD_NAMES]}
    written = write_features(tmp_path / "g.npz", ODD_NAMES, per_token, "none")
    assert read_names(written[0]) == ODD_NAMES
    # nothing temporary left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.files.txt", "f.npy", "g.files.txt", "g.npz"]


def test_old_name_lists_still_read(tmp_path: Path) -> None:
    side = tmp_path / "old.files.txt"
    side.write_text("a.png\nb c.png\n")  # as written before names were escaped
    assert read_names(side) == ["a.png", "b c.png"]


def test_names_must_match_the_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 names for 2 rows"):
        write_features(tmp_path / "f.npy", ["a", "b", "c"], {1: np.zeros((2, 4), np.float32)}, "mean")
    assert not list(tmp_path.iterdir())


def test_cli_extract_writes_odd_file_names_losslessly(tmp_path: Path) -> None:
    make_run(tmp_path / "run", make_tiny_config(2))
    folder = tmp_path / "imgs"
    src = write_images(folder, len(ODD_NAMES))
    for p, name in zip(src, ODD_NAMES, strict=True):
        os.rename(p, folder / name)
    out = tmp_path / "features.npy"
    code = main(
        ["extract", "--checkpoint", str(tmp_path / "run"), "--input", str(folder), "--out", str(out), "--no-progress"]
    )
    assert code == 0
    rows = np.load(out).shape[1]
    names = read_names(out)
    assert rows == len(names) == len(ODD_NAMES)
    assert sorted(names) == sorted(str(folder / n) for n in ODD_NAMES)
    for name in names:
        assert Path(name).is_file()  # the exact os path: it opens the file
    assert len(sidecar_path(out).read_text("utf-8").splitlines()) == rows
