"""`data2vec doctor`: the report, the self-test, and its exit status when a check fails."""

from __future__ import annotations

import pytest
import torch

import data2vec.doctor as doctor
from data2vec.cli import main


def test_doctor_reports_and_every_check_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"torch                    {torch.__version__}" in out and "precision=auto picks" in out
    lines = [ln for ln in out.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert len(lines) == 18 and all(ln.startswith("PASS") for ln in lines), out  # 3 modalities x 2 versions x 3
    assert "two runs bit-identical" in out and "verifies and holds the" in out
    assert "18 of 18 checks passed" in out


def test_report_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--no-self-test"]) == 0
    out = capsys.readouterr().out
    assert "cpu bf16 matrix units" in out and "extra: transformers" in out and "PASS" not in out


def test_a_failed_check_fails_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(doctor, "BF16_RTOL", -1.0)  # no bf16 run can be that close
    assert doctor.main("cpu", echo=seen.append, modalities=("image",)) == 1
    fails = [ln for ln in seen if ln.startswith("FAIL")]
    assert [ln.split(":")[0] for ln in fails] == ["FAIL  image 1.0 cpu bf16", "FAIL  image 2.0 cpu bf16"]
    assert "FAILED: image 1.0 cpu bf16, image 2.0 cpu bf16" in seen[-1]


def test_a_check_that_crashes_is_a_failed_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(doctor, "train", broken)
    seen: list[str] = []
    assert doctor.main("cpu", echo=seen.append, modalities=("text",)) == 1
    assert "FAIL  text 1.0: RuntimeError: the device fell over" in seen
