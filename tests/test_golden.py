"""The golden runs (tests/golden/cases.py): every pretraining path reproduces, on CPU in fp32, what
the code recorded before the training engine was restructured; and a run directory written by that
code resumes. Bit for bit on the machine that recorded them; another CPU (a different kernel path in
oneDNN) changes the last bits of the float reductions, so floats compare to a relative 1e-4. The
`rewind` case was re-recorded when a rewind began to read a newly seeded data stream (its steps
up to the rewind are unchanged)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.golden.cases import CASES, OLD_RUN, RECORDED, outcome

from data2vec.training import train

RTOL = 1e-4


def same_row(got: dict, want: dict) -> bool:
    if got.keys() != want.keys():
        return False
    for k, w in want.items():
        g = got[k]
        if isinstance(w, float) and isinstance(g, float):
            if math.isnan(w) and math.isnan(g):
                continue
            if not math.isclose(g, w, rel_tol=RTOL, abs_tol=1e-7):
                return False
        elif g != w:
            return False
    return True


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=RTOL, atol=1e-4))


def assert_same(got: dict, name: str) -> None:
    want = RECORDED / name
    rows = [json.loads(ln) for ln in (want / "metrics.jsonl").read_text().splitlines()]
    assert len(got["metrics"]) == len(rows)
    for g, w in zip(got["metrics"], rows, strict=True):
        assert same_row(g, w), f"step {w['step']}: {g} != {w}"
    assert got["summary"] == json.loads((want / "summary.json").read_text())
    assert got["files"] == json.loads((want / "files.json").read_text())
    weights = load_file(str(want / "final.safetensors"))
    assert sorted(got["weights"]) == sorted(weights)
    for k, v in weights.items():
        assert same_tensor(got["weights"][k], v), k


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_run(tmp_path: Path, name: str) -> None:
    CASES[name](tmp_path)
    assert_same(outcome(tmp_path / "run"), name)


def test_old_run_directory_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    result = train(None, run, resume=True, progress=False, quiet=True)  # type: ignore[arg-type]
    assert result.step == 6
    got = outcome(run)
    assert got["summary"] == json.loads((RECORDED / "stop_resume" / "summary.json").read_text())
    weights = load_file(str(RECORDED / "stop_resume" / "final.safetensors"))
    for k, v in weights.items():
        assert same_tensor(got["weights"][k], v), k
    rows = [json.loads(ln) for ln in (RECORDED / "stop_resume" / "metrics.jsonl").read_text().splitlines()]
    assert len(got["metrics"]) == len(rows)
    assert all(same_row(g, w) for g, w in zip(got["metrics"], rows, strict=True))
