"""Joint pretraining throughput: one modality per optimizer step ("one") against a batch of every
modality per step ("mixed"), fp32 and bf16 autocast, in one run on the same model.

Both modes train the `joint-tiny` model (one 4-block width-192 encoder, image + audio + text,
equal ratios) on synthetic batches of each modality's configured size (image 32 x 32x32,
speech 8 x 3 s, text 16 x 128 tokens), so data loading is excluded. A "cycle" is one batch of
each modality: three optimizer steps in "one" mode, one in "mixed" mode; both modes see the
same samples per modality per cycle. Each timed step is the whole training step of
`training.train_joint` (`training.objectives.backward_step`, gradient clipping, AdamW, EMA update). The two
modes are timed alternately, cycle by cycle (which goes first alternates too), so load on the
machine hits both alike. Reported: the median cycle time after warm-up, its quartiles, samples
per second of training (per modality and overall), and the median time of the update part
alone (clipping, AdamW, EMA), which a mixed step runs once per cycle instead of once per
modality. Prints a markdown table; writes it and a JSON copy (raw times too) next to --out.

    python benchmarks/joint_step.py [--steps 10] [--warmup 3] [--threads 1] [--out benchmarks/results/joint_step]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from data2vec.doctor import cpu_name
from data2vec.joint import JointConfig, JointData2Vec, joint_tiny, step_weights
from data2vec.model import Batch
from data2vec.schedules import ema_decay
from data2vec.training import build_optimizer
from data2vec.training.objectives import backward_step

CPU = torch.device("cpu")


def synthetic_batches(cfg: JointConfig) -> dict[str, Batch]:
    """One fixed batch per modality, of the size its data config gives (masks drawn by the model)."""
    g = torch.Generator().manual_seed(0)
    image, audio, text = cfg.section("image"), cfg.section("audio"), cfg.section("text")
    ad = audio.data.audio
    clips = min(ad.max_batch_size, int(ad.batch_seconds * ad.sample_rate) // ad.max_sample_size)
    return {
        "image": Batch(torch.randn(image.data.batch_size, image.model.image.channels, *image.model.image.image_size)),
        "audio": Batch(torch.randn(clips, ad.max_sample_size, generator=g)),
        "text": Batch(torch.randint(5, text.data.text.vocab_size, (text.data.batch_size, text.data.text.block_size))),
    }


class Trainer:
    """A joint model and its optimizer, stepping exactly as `train_joint` does."""

    def __init__(self, cfg: JointConfig, batches: dict[str, Batch]) -> None:
        torch.manual_seed(cfg.train.seed)
        self.cfg, self.batches = cfg, batches
        self.model = JointData2Vec(cfg).train()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.step = 0

    def timed_step(self, weights: dict[str, float]) -> tuple[float, float]:
        """(whole step, update part) in seconds."""
        t0 = time.perf_counter()
        backward_step(self.model, weights, self.batches.__getitem__, self.cfg.train, CPU)
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.model.update_teacher(ema_decay(self.step, self.cfg.teacher.decay, self.cfg.teacher.end_decay, 1000))
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1


def measure(precision: str, steps: int, warmup: int) -> dict[str, Any]:
    base = replace(joint_tiny(), train=replace(joint_tiny().train, precision=precision, device="cpu"))
    batches = synthetic_batches(base)
    one, mixed = Trainer(replace(base, step="one"), batches), Trainer(replace(base, step="mixed"), batches)
    mods = base.modalities

    def one_cycle() -> list[tuple[float, float]]:
        return [one.timed_step({m: 1.0}) for m in mods]

    def mixed_cycle() -> list[tuple[float, float]]:
        return [mixed.timed_step(step_weights(mixed.cfg, mixed.step))]

    times: dict[str, list[list[tuple[float, float]]]] = {"one": [], "mixed": []}
    for i in range(warmup + steps):
        order = (("one", one_cycle), ("mixed", mixed_cycle))
        for mode, run in order if i % 2 == 0 else order[::-1]:
            cycle = run()
            if i >= warmup:
                times[mode].append(cycle)
    sizes = {m: int(b.inputs.shape[0]) for m, b in batches.items()}
    rows = {mode: summarize(cycles, sizes) for mode, cycles in times.items()}
    rows["one"]["step_ms"] = {m: statistics.median(c[j][0] for c in times["one"]) * 1e3 for j, m in enumerate(mods)}
    return {"precision": precision, "batch": sizes, "modes": rows}


def summarize(cycles: list[list[tuple[float, float]]], sizes: dict[str, int]) -> dict[str, Any]:
    """Median cycle time and the throughput it gives; quartiles, update time and raw times."""
    totals = [sum(step for step, _ in c) for c in cycles]
    t = statistics.median(totals)
    q1, _, q3 = statistics.quantiles(totals, n=4)
    return {
        "cycle_ms": t * 1e3,
        "cycle_ms_quartiles": [q1 * 1e3, q3 * 1e3],
        "update_ms_per_cycle": statistics.median(sum(u for _, u in c) for c in cycles) * 1e3,
        "samples_per_s": {m: n / t for m, n in sizes.items()},
        "overall_samples_per_s": sum(sizes.values()) / t,
        "cycle_ms_raw": [x * 1e3 for x in totals],
    }


def table(results: list[dict[str, Any]], header: str) -> str:
    mods = list(results[0]["batch"])
    lines = [
        header,
        "",
        "| precision | step | ms per cycle (quartiles) | of which update | "
        + " | ".join(f"{m} samples/s" for m in mods)
        + " | overall samples/s | mixed / one |",
        "|---|---|---|---|" + "---|" * len(mods) + "---|---|",
    ]
    for r in results:
        one_t = r["modes"]["one"]["cycle_ms"]
        for mode, row in r["modes"].items():
            per = " | ".join(f"{row['samples_per_s'][m]:.1f}" for m in mods)
            speed = f"{one_t / row['cycle_ms']:.2f}x" if mode == "mixed" else ""
            q1, q3 = row["cycle_ms_quartiles"]
            lines.append(
                f"| {r['precision']} | {mode} | {row['cycle_ms']:.0f} ({q1:.0f}-{q3:.0f}) | "
                f"{row['update_ms_per_cycle']:.0f} | {per} | "
                f"{row['overall_samples_per_s']:.1f} | {speed} |"
            )
    for r in results:
        per = ", ".join(f"{m} {v:.0f}" for m, v in r["modes"]["one"]["step_ms"].items())
        lines.append(f"\n{r['precision']}, one-modality steps (median ms): {per}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed cycles per mode and precision")
    ap.add_argument("--warmup", type=int, default=3, help="untimed cycles first")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/joint_step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [measure(p, args.steps, args.warmup) for p in ("fp32", "bf16")]
    batch = ", ".join(f"{m} {n}" for m, n in results[0]["batch"].items())
    header = (
        f"joint-tiny training step, one batch of each modality per cycle (batch: {batch}); median of "
        f"{args.steps} cycles after {args.warmup} warm-up; {cpu_name()}, {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}"
    )
    text = table(results, header)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    meta = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    out.with_suffix(".json").write_text(json.dumps({**meta, **vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
