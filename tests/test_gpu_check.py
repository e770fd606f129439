"""benchmarks/gpu_check.sh's CPU fallback: the GPU checks' script runs every check on the CPU in a
reduced size, so that it cannot rot between the times a GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = (
    [f"steps image {v}.0 cpu {p}" for v in (1, 2) for p in ("fp32", "bf16")]  # all modalities on CUDA
    + [f"steps image {v}.0 checkpoint" for v in (1, 2)]
    + ["compile image 2.0"]
    + [
        f"sdpa {m} {v}.0 {p}"
        for m in ("image", "audio", "audio padded", "text")
        for v in (1, 2)
        for p in ("fp32", "bf16")
    ]
    + ["ddp 2 processes, 1 device"]
    + [f"extract {m}" for m in ("image", "audio", "text")]
    + [f"speed {m} tiny" for m in ("image", "audio", "text")]
    + ["total time"]
)


def _rows(table: str) -> dict[str, list[str]]:
    """check -> its cells, from the Markdown table's body rows."""
    cells = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in table.splitlines() if ln.startswith("| ")]
    return {c[0]: c for c in cells if c[0] != "check"}


def test_cpu_fallback_runs_every_check_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = _rows(res.stdout)
    assert sorted(rows) == sorted(CHECKS), res.stdout
    assert all(r[1] == "cpu" and r[4] == "PASS" for r in rows.values()), res.stdout
    assert f"{len(CHECKS)} of {len(CHECKS)} rows PASS" in res.stdout
    assert rows["ddp 2 processes, 1 device"][2] == "backend gloo"
    assert "two runs bit-identical" in rows["steps image 2.0 cpu fp32"][3]
    assert "aot_eager" in rows["compile image 2.0"][3]
    # The same table on disk, and the JSON record of it.
    assert _rows((out / "gpu_check.md").read_text()) == rows
    record = json.loads((out / "gpu_check.json").read_text())
    assert [r["check"] for r in record["rows"]] == list(rows) and record["device"] == "cpu"
    for name in ("speed.md", "speed.json", "speed.log"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "ddp_gloo.log").is_file()  # torchrun's output (empty when the quiet run worked)


def test_usage_error_without_an_out_dir() -> None:
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert res.returncode == 2 and "usage:" in res.stderr
