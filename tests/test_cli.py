"""The command line: bad configs are one clear line naming the key or path."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from data2vec.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--set", "masking.nope=1"], "masking.nope: unknown key"),
        (["--set", "optim.lr=fast"], "optim.lr: expected a number"),
        (["--set", "train.steps=2.5"], "train.steps: expected an integer"),
        (["--set", "model.image.patch_size=5"], "model.image.patch_size: patch size 5 does not divide"),
        (["--set", "masking.mask_prob=1.2"], "masking.mask_prob: 1.2 is not in (0, 1)"),
        (["--set", "masking.mask_prob=0"], "masking.mask_prob: 0"),
        (["--set", "targets.top_k=99"], "targets.top_k: 99 is larger than"),
        (["--set", "lr"], "key=value"),
        (["--preset", "image-huge"], "unknown preset 'image-huge'"),
    ],
)
def test_bad_config_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], expected: str
) -> None:
    args = ["pretrain", "--modality", "image", "--data", "builtin:digits", "--out", str(tmp_path / "r")]
    if "--preset" not in extra:
        args += ["--preset", "image-tiny"]
    code, err = _run(capsys, *args, *extra)
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert expected in err
    assert not (tmp_path / "r").exists()  # nothing written for a bad config


def test_missing_and_empty_data_name_the_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = _run(
        capsys, "pretrain", "--data", str(tmp_path / "missing"), "--preset", "image-tiny", "--out", str(tmp_path / "r")
    )
    assert code == 2 and str(tmp_path / "missing") in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, err = _run(
        capsys, "pretrain", "--data", str(tmp_path / "empty"), "--preset", "image-tiny", "--out", str(tmp_path / "r")
    )
    assert code == 2 and "no images found" in err and str(tmp_path / "empty") in err


def test_modality_must_match_preset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = _run(capsys, "pretrain", "--modality", "image", "--preset", "image-tiny", "--out", str(tmp_path))
    assert code == 2 and "data.path" in err


def test_presets_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("image-base", "image-large", "image-tiny"):
        assert name in out


def test_pretrain_and_config_reproduce(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from tests.test_train import TINY

    sets = [a for s in [*TINY, "train.steps=2", "train.ckpt_every=2"] for a in ("--set", s)]
    assert (
        main(
            [
                "pretrain",
                "--preset",
                "digits-tiny",
                "--version",
                "1",
                "--no-progress",
                *sets,
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert (
        main(
            ["pretrain", "--config", str(tmp_path / "a" / "config.json"), "--no-progress", "--out", str(tmp_path / "b")]
        )
        == 0
    )
    a = (tmp_path / "a" / "checkpoints" / "step_00000002" / "student.safetensors").read_bytes()
    b = (tmp_path / "b" / "checkpoints" / "step_00000002" / "student.safetensors").read_bytes()
    assert a == b


# ----------------------------------------------------------------------------- joint detection, errors


def _pretrain_args(argv: list[str]) -> argparse.Namespace:
    from data2vec.cli import _parser

    return _parser().parse_args(["pretrain", *argv])


def test_joint_config_is_detected_by_its_kind_not_by_its_spelling(tmp_path: Path) -> None:
    from data2vec.cli import _is_joint_pretrain
    from data2vec.presets import preset

    joint = tmp_path / "joint.json"
    joint.write_text(json.dumps({"kind": "joint", "members": {}}, separators=(",", ":")))  # no space after ':'
    assert _is_joint_pretrain(_pretrain_args(["--config", str(joint)]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "joint"}, indent=4))
    assert _is_joint_pretrain(_pretrain_args(["--resume", str(run)]))
    # a single-modality config that merely contains the text is not joint
    single = preset("image-tiny", 2).to_dict()
    single["preset"] = 'image-tiny, see "kind": "joint"'
    plain = tmp_path / "single.json"
    plain.write_text(json.dumps(single, indent=2))
    assert not _is_joint_pretrain(_pretrain_args(["--config", str(plain)]))


def test_a_bug_is_not_turned_into_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import data2vec.cli as cli

    def broken(args: argparse.Namespace) -> int:
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(cli, "_convert", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["convert", "a", "b"])


def test_debug_shows_the_traceback_of_a_library_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from data2vec.config import ConfigError

    args = ["pretrain", "--preset", "image-huge", "--data", "builtin:digits", "--out", str(tmp_path / "r")]
    assert main(args) == 2  # one line without --debug
    assert "unknown preset" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown preset"):
        main(["--debug", *args])
