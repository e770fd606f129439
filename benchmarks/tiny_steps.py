"""Optimizer steps per second of the `image-tiny` preset, data2vec 1.0 and 2.0, fp32 and bf16.

Measures the full training step (teacher targets, student, loss, backward, AdamW, EMA)
on synthetic 32x32 batches with masks drawn as the data loader would, so data loading
is excluded. Prints a markdown table and writes it with a JSON copy next to --out.

    python benchmarks/tiny_steps.py [--steps 20] [--out benchmarks/results/tiny_steps]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from common import write_report

from data2vec.model import Batch, Data2Vec
from data2vec.presets import preset
from data2vec.training import autocast, build_optimizer


def measure(version: int, precision: str, steps: int, warmup: int = 3) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = preset("image-tiny", version)
    model = Data2Vec.from_config(cfg)
    model.train()
    opt = build_optimizer(model, cfg.optim)
    B = cfg.data.batch_size
    x = torch.randn(B, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        mask = model.draw_masks(B, g)
        t0 = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            out = model(Batch(x, mask))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_teacher(0.999)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "batch": B,
        "masks": cfg.masking.num_masks if version == 2 else 1,
        "step_ms": med * 1e3,
        "steps_per_s": 1 / med,
        "samples_per_s": B / med,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/tiny_steps")
    args = ap.parse_args()
    rows = []
    for version in (1, 2):
        for precision in ("fp32", "bf16"):
            r = measure(version, precision, args.steps)
            rows.append({"version": version, "precision": precision, **r})
    lines = [
        f"image-tiny training step, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        "| mode | precision | batch x masks | ms/step | steps/s | samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['version']}.0 | {r['precision']} | {r['batch']} x {r['masks']} | {r['step_ms']:.0f} | "
            f"{r['steps_per_s']:.2f} | {r['samples_per_s']:.0f} |"
        )
    write_report(args.out, "\n".join(lines), rows)


if __name__ == "__main__":
    main()
