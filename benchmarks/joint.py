"""Joint vs single-modality pretraining at an equal per-modality step budget, on the demo corpora.

    python benchmarks/joint.py --per-modality 150 --out runs/bench-joint

Runs (all with the same shared-encoder architecture, loop and settings, `demo_joint.demo_config`):
- joint: image + audio + text, 3 x N steps, equal ratios (about N steps each);
- single: one run per modality, N steps (a joint config with one member, so only the
  modality mix differs).
Then each modality's demo probe (linear, frozen mean-pooled features) on every run, plus the
random-init encoder and each demo's non-neural baseline. Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from data2vec.demo_joint import corpora, demo_config, probe_joint
from data2vec.joint import JointConfig, initial_joint_model
from data2vec.training import train_joint

MODALITIES = ("image", "audio", "text")


def run(name: str, mods: tuple[str, ...], steps: int, out: Path, extra: list[str]) -> dict[str, object]:
    data = corpora(out, quiet=True)
    run_dir = out / name
    cfg = demo_config(data, mods, steps=steps, overrides=extra)
    t0 = time.perf_counter()
    result = train_joint(cfg, run_dir, progress=False, quiet=True)
    seconds = time.perf_counter() - t0
    run_cfg = JointConfig.load(run_dir / "config.json")
    probes = probe_joint(result.model, initial_joint_model(run_cfg), run_dir, data)
    row = {"steps": result.step, "steps_per_modality": result.steps_per_modality, "train_seconds": round(seconds, 1)}
    row["probes"] = probes
    print(name, json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-modality", type=int, default=150)
    p.add_argument("--out", default="runs/bench-joint")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.per_modality
    results = {"per_modality_steps": n, "joint": run("joint", MODALITIES, 3 * n, out, args.overrides)}
    for m in MODALITIES:
        results[f"single_{m}"] = run(f"single_{m}", (m,), n, out, args.overrides)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
