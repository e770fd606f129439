"""benchmarks/levers.py at the tiny size: every lever measured, and each new form computing what
the old one does (the timings mean nothing at this size)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import levers  # noqa: E402


def test_every_lever_is_timed_and_agrees_with_the_old_form(tmp_path: Path) -> None:
    levers.main(["--size", "tiny", "--reps", "1", "--out", str(tmp_path / "levers")])
    rows = json.loads((tmp_path / "levers.json").read_text())["rows"]
    assert {r["lever"] for r in rows} == set(levers.LEVERS)
    for r in rows:
        assert r["old_ms"] > 0 and r["new_ms"] > 0 and r["speedup"] == pytest.approx(r["old_ms"] / r["new_ms"])
        limit = 1e-5 if r["lever"] == "adamw" else 5e-2  # bf16 rounding elsewhere
        assert r["rel_diff"] < limit, r
    text = (tmp_path / "levers.md").read_text()
    assert "| lever | case | old | new |" in text and "Command: `python benchmarks/levers.py --size tiny" in text


def test_an_unknown_lever_is_named() -> None:
    with pytest.raises(SystemExit):
        levers.main(["--levers", "adamw,warp-drive"])
