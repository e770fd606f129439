"""bf16 against fp32 on this machine: matrix products of the tiny and base widths, and whole
training steps of the digits-tiny presets, one thread. Says whether the CPU multiplies bf16 in
hardware (AMX / AVX512-BF16) and what `train.precision=auto` picks here.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/precision.py

Writes benchmarks/results/precision/results.{md,json}. Not run in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from data2vec.config import apply_overrides  # noqa: E402
from data2vec.presets import preset  # noqa: E402
from data2vec.training import train  # noqa: E402
from data2vec.training.devices import native_bf16, resolve_precision  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "precision"
SHAPES = [(2048, 192, 768), (2048, 768, 3072), (4096, 768, 768)]
"""(tokens, in, out): a tiny-preset MLP, a base MLP, a base projection."""


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 2.0) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(2):
        a @ b
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        calls += 1
    return 2 * m * k * n * calls / (time.perf_counter() - t0) / 1e9


def step_seconds(version: int, precision: str, steps: int, work: Path) -> float:
    cfg = apply_overrides(
        preset("digits-tiny", version),
        [
            f"train.steps={steps + 1}",
            f"train.precision={precision}",
            "data.num_workers=0",
            f"train.ckpt_every={steps + 1}",
        ],
    )
    run = work / f"v{version}-{precision}"
    shutil.rmtree(run, ignore_errors=True)
    train(cfg, run, progress=False, quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    per_sec = [r["samples_per_sec"] for r in rows[1:]]  # the first step warms up the kernels
    return cfg.data.batch_size / (sum(per_sec) / len(per_sec))


def main() -> None:
    torch.set_num_threads(1)
    work = Path("/tmp/precision-bench")
    work.mkdir(parents=True, exist_ok=True)
    cpu = torch.device("cpu")
    result: dict[str, Any] = {
        "machine": common.machine(),
        "native_bf16": native_bf16("cpu"),
        "auto": resolve_precision(cpu, "auto"),
        "matmul": [],
        "steps": [],
    }
    for m, k, n in SHAPES:
        fp32, bf16 = matmul_gflops(m, k, n, torch.float32), matmul_gflops(m, k, n, torch.bfloat16)
        result["matmul"].append({"shape": [m, k, n], "fp32_gflops": fp32, "bf16_gflops": bf16})
        print(json.dumps(result["matmul"][-1]), flush=True)
    for version in (1, 2):
        fp32, bf16 = step_seconds(version, "fp32", 5, work), step_seconds(version, "bf16", 3, work)
        result["steps"].append({"preset": f"digits-tiny {version}.0", "fp32_s": fp32, "bf16_s": bf16})
        print(json.dumps(result["steps"][-1]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# bf16 against fp32 on this CPU",
        "",
        f"Command: `OMP_NUM_THREADS=1 taskset -c 1 python {' '.join(sys.argv)}`. Machine: {result['machine']}. "
        f"bf16 matrix units: {'yes' if result['native_bf16'] else 'no (no AMX, no AVX512-BF16)'}; "
        f"`train.precision=auto` picks {result['auto']}.",
        "",
        "| matmul (M x K x N) | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |",
        "|---|---|---|---|",
    ]
    for r in result["matmul"]:
        m, k, n = r["shape"]
        lines.append(
            f"| {m} x {k} x {n} | {r['fp32_gflops']:.1f} | {r['bf16_gflops']:.1f} | "
            f"{r['bf16_gflops'] / r['fp32_gflops']:.2f}x |"
        )
    lines += ["", "| training step (batch of the preset) | fp32 s | bf16 s | bf16 / fp32 |", "|---|---|---|---|"]
    for r in result["steps"]:
        lines.append(f"| {r['preset']} | {r['fp32_s']:.2f} | {r['bf16_s']:.2f} | {r['bf16_s'] / r['fp32_s']:.1f}x |")
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
