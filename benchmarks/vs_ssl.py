"""data2vec against the single-purpose self-supervised method of a modality, at equal wall-clock.

Arms, all with the same encoder size (the tiny preset's width, depth, heads and patching), the
same data and the same precision (train.precision=auto: bf16 where the CPU multiplies bf16 in
hardware, else fp32 for every arm), each pretrained for the same wall-clock budget on one core:

- ours 2.0 and ours 1.0: this library's public API (`data2vec.training.train`), the tiny
  preset, its step count calibrated so the schedule ends on the budget;
- images: MAE with transformers' `ViTMAEForPreTraining` as published (mask 0.75, normalised-
  pixel loss, a decoder 2/3 the encoder's width and depth as MAE's ViT-B one, AdamW betas
  (0.9, 0.95), weight decay 0.05 off biases and norms, lr = 1.5e-4 x batch / 256, 5% warm-up
  then cosine), on the same augmented views (RandomResizedCrop 0.2-1, flip) of the CIFAR-10
  shards, its steps calibrated the same way.

Each arm is snapshotted at `--points` evenly spaced moments of its budget (ours: a checkpoint,
the run stopped there and resumed, each call's wall time counted whole, start-up and data
indexing included; the peer: its weights). Step counts are calibrated on 10 timed steps before
the clock starts, for every arm. Every snapshot is then evaluated identically: mean-pooled last-layer features of the
frozen encoder, logistic regression on the first 5,000 labelled training images (10%) scored
on the test images (the full 10,000 at the last point; `--curve-test` of them at the others).

    taskset -c 1 python benchmarks/vs_ssl.py --modality image --arms ours2,mae --budget-minutes 15 \\
        --out benchmarks/results/vs_ssl/image
    python benchmarks/vs_ssl.py --modality image --merge --out benchmarks/results/vs_ssl/image

Arms may run in separate processes (one per core); each writes `arm-<name>.json` under --out,
and `--merge` builds results.md, results.json and curves.png from them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from cifar10 import labelled
from torch import Tensor

from data2vec.checkpoint import list_checkpoints
from data2vec.config import RunConfig, apply_overrides
from data2vec.data.eval_inputs import labelled_items
from data2vec.data.images import ImageFolderSource, PretrainTransform, TarShardSource, eval_transform
from data2vec.data.sampling import sample_seed
from data2vec.extract import extract_items
from data2vec.finetune import LabelledSet
from data2vec.presets import preset
from data2vec.pretrained import build_model, load_pretrained
from data2vec.probe import linear_probe
from data2vec.training import train
from data2vec.training.devices import resolve_precision

ARM_NAMES = {"ours2": "ours data2vec 2.0", "ours1": "ours data2vec 1.0", "mae": "MAE (transformers)"}
PEER = {"image": "mae"}


# ---------------------------------------------------------------------- shared


class Snapshot(dict[str, Any]):
    """{'minutes', 'step', 'path'}: an arm's state at one moment of its budget."""


def precision() -> str:
    return resolve_precision(torch.device("cpu"), "auto")


def autocast() -> Any:
    if precision() == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def points_of(total: int, points: int) -> list[int]:
    """The steps at which to snapshot: `points` evenly spaced, the last = `total`."""
    return sorted({max(1, round(total * k / points)) for k in range(1, points + 1)})


# ---------------------------------------------------------------------- ours


def ours_config(version: int, shards: str, overrides: list[str]) -> RunConfig:
    return apply_overrides(
        preset("image-tiny", version),
        [f"data.path={shards}", "data.num_workers=0", "train.log_every=50", "train.ckpt_every=1000000", *overrides],
    )


def run_ours(
    version: int, shards: str, budget_s: float, points: int, work: Path, overrides: list[str]
) -> dict[str, Any]:
    """Pretrain with this library for `budget_s` seconds (steps calibrated on a short run), stopping
    at each snapshot step (a checkpoint) and resuming: the calls' wall time is the arm's clock."""
    cfg = ours_config(version, shards, overrides)
    calib = work / f"ours{version}-calib"
    shutil.rmtree(calib, ignore_errors=True)
    n = 12
    train(replace(cfg, train=replace(cfg.train, steps=n, log_every=1)), calib, progress=False, quiet=True)
    rows = [json.loads(line) for line in (calib / "metrics.jsonl").read_text().splitlines()]
    per_step = float(np.median([cfg.data.batch_size / r["samples_per_sec"] for r in rows[2:]]))
    shutil.rmtree(calib, ignore_errors=True)
    total = max(points, int(budget_s / per_step))
    cfg = replace(cfg, train=replace(cfg.train, steps=total, keep_last=points + 1))
    run = work / f"ours{version}"
    shutil.rmtree(run, ignore_errors=True)
    clock, snaps = 0.0, []
    for k, stop in enumerate(points_of(total, points)):
        t0 = time.perf_counter()
        train(cfg, run, resume=k > 0, stop_after=stop, progress=False, quiet=True)
        clock += time.perf_counter() - t0
        path = next(c for c in list_checkpoints(run) if c.name == f"step_{stop:08d}")
        snaps.append(Snapshot(minutes=clock / 60, step=stop, path=str(path)))
        print(f"ours {version}.0: step {stop}/{total} at {clock / 60:.2f} min", flush=True)
    recipe = (
        f"preset image-tiny v{version}: batch {cfg.data.batch_size} x {cfg.masking.num_masks} mask(s), "
        f"lr {cfg.optim.lr}, {total} steps ({per_step:.3f} s/step calibrated)"
    )
    return {"snapshots": snaps, "steps": total, "recipe": recipe, "config": str(run / "config.json")}


def ours_features(path: str, data: LabelledSet) -> np.ndarray:
    pre = load_pretrained(path)
    model = build_model(pre)
    feats = extract_items(model, labelled_items(pre.config, data), batch_size=128)
    return feats[max(feats)]


# ---------------------------------------------------------------------- MAE (images)


def mae_config(cfg: RunConfig) -> Any:
    from transformers import ViTMAEConfig

    e, im = cfg.model.encoder, cfg.model.image
    dec_dim = max(32, round(e.dim * 2 / 3 / 32) * 32)  # ViT-B's 768 -> 512, heads of 32 as MAE's decoder
    return ViTMAEConfig(
        hidden_size=e.dim,
        num_hidden_layers=e.depth,
        num_attention_heads=e.num_heads,
        intermediate_size=int(e.dim * e.mlp_ratio),
        image_size=im.image_size[0],
        patch_size=im.patch_size,
        num_channels=im.channels,
        qkv_bias=True,
        mask_ratio=0.75,
        norm_pix_loss=True,
        decoder_hidden_size=dec_dim,
        decoder_num_hidden_layers=max(1, round(e.depth * 2 / 3)),  # ViT-B's 12 -> 8
        decoder_num_attention_heads=dec_dim // 32,
        decoder_intermediate_size=4 * dec_dim,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def views(source: TarShardSource, transform: PretrainTransform, batch: int, seed: int) -> Iterator[Tensor]:
    """Endless batches of augmented views, the same augmentation ours uses (per-sample seeds)."""
    epoch = 0
    while True:
        order = np.random.default_rng(sample_seed(seed, epoch, 0x7FFFFFFF)).permutation(len(source))
        for j in range(len(order) // batch):
            idx = order[j * batch : (j + 1) * batch]
            yield torch.stack(
                [transform(source.load(int(i)), np.random.default_rng(sample_seed(seed, epoch, int(i)))) for i in idx]
            )
        epoch += 1


def run_mae(shards: str, budget_s: float, points: int, work: Path, batch: int, seed: int) -> dict[str, Any]:
    from transformers import ViTMAEForPreTraining

    cfg = ours_config(2, shards, [])
    peak = 1.5e-4 * batch / 256

    def build() -> tuple[Any, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = ViTMAEForPreTraining(mae_config(cfg)).train()
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # fixed sin-cos positions are not
        groups = [
            {"params": [p for _, p in params if p.ndim > 1], "weight_decay": 0.05},
            {"params": [p for _, p in params if p.ndim <= 1], "weight_decay": 0.0},  # biases and norms
        ]
        return model, torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95))

    d = cfg.data
    transform = PretrainTransform(
        size=cfg.model.image.image_size, channels=3, crop_scale=(0.2, 1.0), hflip=True, mean=d.mean, std=d.std
    )
    source = TarShardSource(sorted(str(s) for s in Path(shards).parent.glob(Path(shards).name)))
    data = views(source, transform, batch, seed)

    def step(model: Any, opt: torch.optim.Optimizer, k: int, total: int) -> float:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(k, total, peak, max(1, total // 20))
        with autocast():
            loss = model(pixel_values=next(data)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    model, opt = build()
    for k in range(12):  # calibration, outside the budget as ours' calibration run is
        if k == 2:
            t_calib = time.perf_counter()
        step(model, opt, k, 10_000)
    per_step = (time.perf_counter() - t_calib) / 10
    total = max(points, int(budget_s / per_step))
    model, opt = build()  # start over from the same initialisation, with the calibrated schedule
    t0 = time.perf_counter()
    snaps, marks, loss = [], points_of(total, points), float("nan")
    for k in range(total):
        loss = step(model, opt, k, total)
        if k + 1 in marks:
            path = work / f"mae-step{k + 1}.pt"
            torch.save(model.vit.state_dict(), path)
            minutes = (time.perf_counter() - t0) / 60
            snaps.append(Snapshot(minutes=minutes, step=k + 1, path=str(path)))
            print(f"MAE: step {k + 1}/{total} at {minutes:.2f} min, loss {loss:.4f}", flush=True)
    recipe = (
        f"batch {batch}, lr {peak:.2e} (1.5e-4 x {batch}/256), {total} steps ({per_step:.3f} s/step calibrated); "
        f"decoder {mae_config(cfg).decoder_hidden_size}-d x {mae_config(cfg).decoder_num_hidden_layers}"
    )
    return {"snapshots": snaps, "steps": total, "recipe": recipe, "final_loss": loss}


def mae_features(path: str, data: LabelledSet, cfg: RunConfig) -> np.ndarray:
    from transformers import ViTMAEModel

    mcfg = mae_config(cfg)
    mcfg.mask_ratio = 0.0  # every patch visible (the embedding still shuffles them; the mean ignores order)
    model = ViTMAEModel(mcfg).eval()
    model.load_state_dict(torch.load(path, weights_only=True))
    im, d = cfg.model.image, cfg.data
    out = []
    with torch.inference_mode():
        for a in range(0, len(data), 128):
            x = torch.stack(
                [
                    eval_transform(data.load(i), im.image_size, 3, d.mean, d.std)
                    for i in range(a, min(len(data), a + 128))
                ]
            )
            h = model(pixel_values=x).last_hidden_state[:, 1:]  # patch tokens, after the final norm
            out.append(h.mean(1).float().numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------------- evaluation


def probe_sets(labels: int, test_limit: int, curve_test: int) -> tuple[LabelledSet, LabelledSet, LabelledSet]:
    """(the first `labels` training images, the test set or `test_limit` of it, a fixed subset of
    `curve_test` test images for the curve's inner points)."""
    shards = sorted(str(s) for s in (common.DATA / "cifar10").glob("train-*.tar"))
    train_set = labelled(TarShardSource(shards), np.arange(labels), f"cifar10 train (first {labels} labelled)")
    test_src = ImageFolderSource(common.DATA / "cifar10" / "test")
    rng = np.random.default_rng(0)
    full = labelled(test_src, np.sort(rng.permutation(len(test_src))[:test_limit]), "cifar10 test")
    sub = np.sort(np.random.default_rng(0).permutation(len(test_src))[:curve_test])
    return train_set, full, labelled(test_src, sub, f"cifar10 test ({curve_test})")


def evaluate(arm: str, result: dict[str, Any], labels: int, test_limit: int, curve_test: int) -> None:
    train_set, full, sub = probe_sets(labels, test_limit, curve_test)
    cfg = ours_config(2, "", [])
    feats: Callable[[str, LabelledSet], np.ndarray]
    feats = ours_features if arm.startswith("ours") else (lambda p, d: mae_features(p, d, cfg))
    y_train = np.asarray(train_set.targets)
    for i, snap in enumerate(result["snapshots"]):
        last = i == len(result["snapshots"]) - 1
        test = full if last else sub
        t0 = time.perf_counter()
        acc = linear_probe(feats(snap["path"], train_set), y_train, feats(snap["path"], test), np.asarray(test.targets))
        snap["probe"], snap["probe_test_images"] = acc, len(test)
        print(f"{arm} at {snap['minutes']:.2f} min: probe {acc:.4f} on {len(test)} ({time.perf_counter() - t0:.0f} s)")


# ---------------------------------------------------------------------- merge


def time_to(snaps: list[dict[str, Any]], target: float) -> float | None:
    """Minutes at which an arm's curve first reaches `target` (linear between points), or None."""
    prev_t, prev_a = 0.0, 0.0
    for s in snaps:
        if s["probe"] >= target:
            if s["probe"] == prev_a:
                return float(s["minutes"])
            return float(prev_t + (target - prev_a) / (s["probe"] - prev_a) * (s["minutes"] - prev_t))
        prev_t, prev_a = s["minutes"], s["probe"]
    return None


def merge(out: Path, modality: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = {p.stem.removeprefix("arm-"): json.loads(p.read_text()) for p in sorted(out.glob("arm-*.json"))}
    peer = PEER[modality]
    lines = [
        f"### {modality}: data2vec vs {ARM_NAMES[peer]} at equal wall-clock",
        "",
        "| arm | pretraining minutes | steps | final linear probe (full test) | recipe |",
        "|---|---|---|---|---|",
    ]
    for name, r in arms.items():
        last = r["snapshots"][-1]
        lines.append(
            f"| {ARM_NAMES[name]} | {last['minutes']:.1f} | {r['steps']} | {last['probe']:.4f} "
            f"({last['probe_test_images']} images) | {r['recipe']} |"
        )
    lines += ["", "| question | answer |", "|---|---|"]
    if peer in arms and "ours2" in arms:
        target = arms[peer]["snapshots"][-1]["probe"]
        t_ours, t_peer = time_to(arms["ours2"]["snapshots"], target), arms[peer]["snapshots"][-1]["minutes"]
        ratio = f"{t_ours / t_peer:.2f}x the peer's time" if t_ours is not None else "not reached in the budget"
        lines.append(f"| ours 2.0: time to the peer's final probe accuracy ({target:.4f}) | {ratio} |")
    if "ours1" in arms and "ours2" in arms:
        target = arms["ours1"]["snapshots"][-1]["probe"]
        t2, t1 = time_to(arms["ours2"]["snapshots"], target), arms["ours1"]["snapshots"][-1]["minutes"]
        ratio = f"{t2 / t1:.2f}x 1.0's time" if t2 is not None else "not reached in the budget"
        lines.append(f"| ours 2.0: time to 1.0's final probe accuracy ({target:.4f}) | {ratio} |")
    info = next(iter(arms.values()))["info"] if arms else {}
    lines += ["", *(f"- {k}: {v}" for k, v in info.items())]
    md = "\n".join(lines) + "\n"
    print(md)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(arms, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, r in arms.items():
        ax.plot(
            [0] + [s["minutes"] for s in r["snapshots"]],
            [float("nan")] + [s["probe"] for s in r["snapshots"]],
            marker="o",
            label=ARM_NAMES[name],
        )
    ax.set_xlabel("pretraining minutes (one core)")
    ax.set_ylabel("linear probe accuracy")
    ax.set_title(f"{modality}: probe accuracy against pretraining time", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", choices=["image"], default="image")
    p.add_argument("--arms", default="ours2,ours1,mae", help="comma-separated: ours2, ours1, mae")
    p.add_argument("--budget-minutes", type=float, default=15.0, help="pretraining wall-clock per arm")
    p.add_argument("--points", type=int, default=6, help="snapshots per arm (the curve's points)")
    p.add_argument("--curve-test", type=int, default=2000, help="test images at the curve's inner points")
    p.add_argument("--labels", type=int, default=5000, help="labelled training images for the probe (10%%)")
    p.add_argument("--test-limit", type=int, default=10000, help="test images at the last point (all: 10000)")
    p.add_argument("--mae-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="our arms' config KEY=VALUE")
    p.add_argument("--merge", action="store_true", help="only build the tables and plot from arm-*.json")
    p.add_argument("--out", default="benchmarks/results/vs_ssl/image")
    p.add_argument("--work", default="/tmp/data2vec-bench/vs_ssl")
    args = p.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge(out, args.modality)
        return
    torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    shards = str(common.DATA / "cifar10" / "train-*.tar")
    budget = args.budget_minutes * 60
    for arm in args.arms.split(","):
        t0 = time.perf_counter()
        if arm == "mae":
            result = run_mae(shards, budget, args.points, work, args.mae_batch, args.seed)
        else:
            result = run_ours(
                int(arm[-1]), shards, budget, args.points, work, [f"train.seed={args.seed}", *args.overrides]
            )
        evaluate(arm, result, args.labels, args.test_limit, args.curve_test)
        result["info"] = {
            "command": f"taskset -c CORE python benchmarks/vs_ssl.py --modality {args.modality} --arms {arm} "
            f"--budget-minutes {args.budget_minutes} --points {args.points}",
            "probe": f"{args.labels} labelled training images; {args.test_limit} test images at the last point, "
            f"{args.curve_test} at the others",
            "precision": precision(),
            "machine": common.machine(),
            "date": time.strftime("%Y-%m-%d"),
        }
        result["wall_minutes_with_evaluation"] = (time.perf_counter() - t0) / 60
        (out / f"arm-{arm}.json").write_text(json.dumps(result, indent=2) + "\n")
    merge(out, args.modality)


if __name__ == "__main__":
    main()
