"""`data2vec demo` end to end on a shrunken model (the full demo runs by hand: see README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data2vec.cli import main
from data2vec.tiny import IMAGE_SHAPE

SHRINK = [
    *IMAGE_SHAPE,
    "data.batch_size=16",
    "data.num_workers=0",
]


@pytest.mark.parametrize("version", [1, 2])
def test_image_demo_runs_and_reports(capsys: pytest.CaptureFixture[str], tmp_path: Path, version: int) -> None:
    sets = [a for s in SHRINK for a in ("--set", s)]
    code = main(["demo", "--out", str(tmp_path), "--steps", "6", "--version", str(version), "--no-progress", *sets])
    assert code == 0
    out = capsys.readouterr().out
    assert f"data2vec {version}.0 pretrained encoder" in out and "raw pixels" in out
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["steps"] == 6
    for key in ("pretrained", "random_init", "pixels"):
        assert 0.1 < probe[key] <= 1.0  # ten classes: anything learned beats chance
    assert probe["pixels"] > 0.9  # logistic regression on digits pixels
    for name in ("loss.png", "masked_inputs.png", "metrics.jsonl", "config.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_unknown_demo_modality(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--modality", "smell", "--out", str(tmp_path)]) == 2
    assert "no demo for 'smell'" in capsys.readouterr().err
