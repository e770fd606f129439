"""data2vec against the single-purpose self-supervised method of a modality, at equal wall-clock.

Arms, all with the same encoder size (the tiny preset's width, depth, heads and front-end), the
same data and the same precision (bf16 autocast where the CPU multiplies bf16 in hardware, else
fp32, for every arm), each pretrained for the same wall-clock budget on one core:

- ours 2.0 and ours 1.0: this library's public API (`data2vec.training.train`), the tiny
  preset, its step count calibrated so the schedule ends on the budget;
- the peer, from transformers as published, its recipe scaled to this size: images, MAE
  (`ViTMAEForPreTraining`, vs_ssl_image.py); speech, wav2vec 2.0 (`Wav2Vec2ForPreTraining`,
  vs_ssl_audio.py); text, RoBERTa masked-language modelling (`RobertaForMaskedLM`,
  vs_ssl_text.py). Each module's docstring gives the recipe.

Each arm is snapshotted at `--points` evenly spaced moments of its budget (ours: a checkpoint,
the run stopped there and resumed, each call's wall time counted whole, start-up and data
indexing included; the peer: its weights). Step counts are calibrated on ten timed steps before
the clock starts, for every arm. Every snapshot is then evaluated identically: mean-pooled
last-layer features of the frozen encoder, logistic regression on the modality's labelled
training set scored on its test set (all of it at the last point; `--curve-test` examples at the
others).

    taskset -c 1 python benchmarks/vs_ssl.py --modality image --arms ours2,mae,ours1 \\
        --budget-minutes 15 --out benchmarks/results/vs_ssl/image
    python benchmarks/vs_ssl.py --modality image --merge --out benchmarks/results/vs_ssl/image

Arms may run in separate processes (one per core); each writes `arm-<name>.json` under --out,
and `--merge` builds results.md, results.json and curves.png from them, with a fine-tuned table
when vs_ssl_finetune.py has written `finetune-<name>.json` there.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib
import json
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import common
import numpy as np
import torch
from ssl_arms import init_model, model_features, ours_config, ours_features, precision, run_ours

from data2vec.probe import linear_probe

OURS = {"ours2": "ours data2vec 2.0", "ours1": "ours data2vec 1.0"}
SCRATCH = {"scratch": "ours 2.0's architecture, random init (no pretraining)"}
"""vs_ssl_finetune.py's baseline arm: fine-tuning from ours 2.0's architecture at random init."""


def modality_module(modality: str) -> ModuleType:
    return importlib.import_module(f"vs_ssl_{modality}")


def arm_names(mod: ModuleType) -> dict[str, str]:
    return {**OURS, mod.PEER: mod.PEER_NAME}


# ---------------------------------------------------------------------- evaluation


def evaluate(mod: ModuleType, arm: str, result: dict[str, Any], args: argparse.Namespace) -> None:
    train_set, full, sub = mod.probe_sets(args)
    feats = ours_features if arm in OURS else mod.peer_features
    y_train = np.asarray(train_set.targets)
    y_sub = np.asarray(sub.targets)
    for i, snap in enumerate(result["snapshots"]):
        t0 = time.perf_counter()
        x_train = feats(snap["path"], train_set)
        # the curve: the same `--curve-test` subset at every point; the last point also on the full test set
        snap["probe"] = linear_probe(x_train, y_train, feats(snap["path"], sub), y_sub)
        snap["probe_test_examples"] = len(sub)
        if i == len(result["snapshots"]) - 1:
            snap["probe_full"] = linear_probe(x_train, y_train, feats(snap["path"], full), np.asarray(full.targets))
            snap["probe_full_examples"] = len(full)
        extra = f", full test {snap['probe_full']:.4f}" if "probe_full" in snap else ""
        print(
            f"{arm} at {snap['minutes']:.2f} min: probe {snap['probe']:.4f} on {len(sub)}{extra} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    result["probe_sets"] = {"train": f"{train_set.name} ({len(train_set)})", "test": f"{full.name} ({len(full)})"}


def run_tag(args: argparse.Namespace) -> str:
    """The suffix of our arms' run folders under --work: runs with another seed or other --set
    overrides get their own folder, so they never overwrite the snapshots another run's
    fine-tuning still reads."""
    tag = f"-seed{args.seed}" if args.seed else ""
    if args.overrides:
        tag += "-" + hashlib.sha1("\n".join(args.overrides).encode()).hexdigest()[:8]
    return tag


# ---------------------------------------------------------------------- merge


def init_probe(mod: ModuleType, out: Path, work: Path, args: argparse.Namespace) -> None:
    """The random-initialisation level of the probe for our architectures (2.0 and 1.0 presets),
    on the full test set, written into their arm-*.json as `init_probe`."""
    train_set, full, _ = mod.probe_sets(args)
    for arm in OURS:
        path = out / f"arm-{arm}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        overrides = [*mod.ours_overrides(work), f"train.seed={args.seed}", *args.overrides]
        cfg = ours_config(mod.PRESET, int(arm[-1]), overrides)
        model = init_model(cfg)  # one model for both sets
        x_train, x_test = model_features(model, cfg, train_set), model_features(model, cfg, full)
        result["init_probe"] = linear_probe(x_train, np.asarray(train_set.targets), x_test, np.asarray(full.targets))
        print(f"{arm} at random init: probe {result['init_probe']:.4f} on {len(full)}", flush=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


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


def tested(snap: dict[str, Any]) -> int:
    """How many test examples a snapshot's probe was scored on (older results said images)."""
    return int(snap.get("probe_test_examples", snap.get("probe_test_images", 0)))


def merge(out: Path, modality: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mod = modality_module(modality)
    names = arm_names(mod)
    arms = {p.stem.removeprefix("arm-"): json.loads(p.read_text()) for p in sorted(out.glob("arm-*.json"))}
    peer = mod.PEER
    lines = [
        f"### {modality}: data2vec vs {names[peer]} at equal wall-clock",
        "",
        "| arm | pretraining minutes | steps | final linear probe, full test | the curve's last point "
        "| same architecture at random init | recipe |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in arms.items():
        last = r["snapshots"][-1]
        full, n_full = last.get("probe_full", last["probe"]), last.get("probe_full_examples", tested(last))
        init = f"{r['init_probe']:.4f}" if "init_probe" in r else "not measured"
        lines.append(
            f"| {names[name]} | {last['minutes']:.1f} | {r['steps']} | {full:.4f} ({n_full} {mod.UNIT}) "
            f"| {last['probe']:.4f} ({tested(last)}) | {init} | {r['recipe']} |"
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
    info = dict(next(iter(arms.values()))["info"]) if arms else {}
    info["command"] = "; ".join(r["info"]["command"] for r in arms.values())
    lines += ["", *(f"- {k}: {v}" for k, v in info.items())]
    tuned = {p.stem.removeprefix("finetune-"): json.loads(p.read_text()) for p in sorted(out.glob("finetune-*.json"))}
    lines += finetune_table(tuned, {**names, **SCRATCH})
    for name, ft in tuned.items():
        if name in arms:
            arms[name]["finetune"] = ft
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
            label=names[name],
        )
    ax.set_xlabel("pretraining minutes (one core)")
    ax.set_ylabel("linear probe accuracy")
    ax.set_title(f"{modality}: probe accuracy against pretraining time", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def recipe_line(rc: dict[str, Any]) -> str:
    """A fine-tuning recipe in words: what every task has, then the image-only augmentations
    for an image task, the head's norm and whether the CNN trains for a speech one."""
    words = [f"{rc['task']}, {rc['epochs']} epochs, batch {rc['batch_size']}, lr {rc['lr']}"]
    words.append(
        f"layer decay {rc['layer_decay']}, drop-path {rc['drop_path']}, label smoothing {rc['label_smoothing']}"
    )
    if rc["task"].startswith("image"):
        words.append(
            f"mixup {rc['mixup']} / cutmix {rc['cutmix']} (p {rc['mix_prob']}), crop scale {tuple(rc['crop_scale'])}"
        )
    if rc["task"].startswith("audio"):
        words.append(f"{rc['head_norm']}-norm head, CNN {'frozen' if rc.get('freeze_cnn', True) else 'trained'}")
    return ", ".join([*words, rc["precision"]])


def finetune_table(tuned: dict[str, dict[str, Any]], names: dict[str, str]) -> list[str]:
    """results.md lines for the `finetune-<arm>.json` files (vs_ssl_finetune.py): every seed's
    best-epoch score, their mean and spread, per arm; nothing when there are none."""
    if not tuned:
        return []
    first = next(iter(tuned.values()))
    rc, metric = first["recipe"], first["metric"]
    lines = [
        "",
        "#### fine-tuned: each arm's last snapshot, one recipe (benchmarks/vs_ssl_finetune.py)",
        "",
        f"| arm | snapshot | {metric} per seed (best epoch) | mean | std | minutes per run |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in tuned.items():
        per_seed = ", ".join(f"{s['best']:.4f} (ep {s['best_epoch']})" for s in r["seeds"])
        snap = r["snapshot"]
        minutes = np.mean([s["seconds"] for s in r["seeds"]]) / 60
        shown = "none" if name in SCRATCH else f"step {snap['step']}, {snap['minutes']:.1f} min"
        lines.append(
            f"| {names.get(name, name)} | {shown} | {per_seed} | {r['mean']:.4f} | {r['std']:.4f} | {minutes:.1f} |"
        )
    lines += [
        "",
        f"- recipe: {recipe_line(rc)}; the best epoch on the test set (as benchmarks/cifar10.py does)",
        f"- sets: train {first['sets']['train']}; test {first['sets']['test']}",
        "- the peer's encoder is converted into this library's model and fine-tuned by the same code",
        f"- command: {'; '.join(r['info']['command'] for r in tuned.values())}",
    ]
    return lines


# ---------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", choices=["image", "audio", "text"], default="image")
    p.add_argument("--arms", default=None, help="comma-separated: ours2, ours1 and the peer (default: all three)")
    p.add_argument("--budget-minutes", type=float, default=15.0, help="pretraining wall-clock per arm")
    p.add_argument("--points", type=int, default=6, help="snapshots per arm (the curve's points)")
    p.add_argument("--curve-test", type=int, default=2000, help="test examples at the curve's inner points")
    p.add_argument("--labels", type=int, default=0, help="labelled training examples for the probe (0: the modality's)")
    p.add_argument("--test-limit", type=int, default=0, help="test examples at the last point (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="our arms' config KEY=VALUE")
    p.add_argument("--merge", action="store_true", help="only build the tables and plot from arm-*.json")
    p.add_argument(
        "--init-probe", action="store_true", help="only probe our architectures at random init (into arm-*.json)"
    )
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/vs_ssl/MODALITY)")
    p.add_argument("--work", default="/tmp/data2vec-bench/vs_ssl")
    known, _ = p.parse_known_args()
    mod = modality_module(known.modality)
    mod.add_arguments(p)
    args = p.parse_args()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "vs_ssl" / args.modality
    work = Path(args.work) / args.modality
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge(out, args.modality)
        return
    torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    if hasattr(mod, "prepare"):  # once per work folder; parallel arm processes wait for the first
        with open(work / ".prepare.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            mod.prepare(work, args)
    if args.init_probe:
        init_probe(mod, out, work, args)
        merge(out, args.modality)
        return
    budget = args.budget_minutes * 60
    for arm in (args.arms or f"ours2,{mod.PEER},ours1").split(","):
        if arm not in arm_names(mod):
            raise SystemExit(f"vs_ssl: unknown arm {arm!r} for {args.modality} (ours2, ours1, {mod.PEER})")
        t0 = time.perf_counter()
        if arm == mod.PEER:
            result = mod.run_peer(budget, args.points, work, args.seed, args)
        else:
            overrides = [*mod.ours_overrides(work), f"train.seed={args.seed}", *args.overrides]
            result = run_ours(mod.PRESET, int(arm[-1]), budget, args.points, work, overrides, run_tag(args))
        evaluate(mod, arm, result, args)
        result["info"] = {
            "command": f"taskset -c CORE python benchmarks/vs_ssl.py --modality {args.modality} --arms {arm} "
            f"--budget-minutes {args.budget_minutes} --points {args.points}"
            + (f" --seed {args.seed}" if args.seed else "")
            + "".join(f" --set {kv}" for kv in args.overrides),
            "probe": f"train {result['probe_sets']['train']}; test {result['probe_sets']['test']} at the last "
            f"point, {result['snapshots'][-1]['probe_test_examples']} of them at the others",
            "precision": precision(),
            "machine": common.machine(),
            "date": time.strftime("%Y-%m-%d"),
        }
        result["wall_minutes_with_evaluation"] = (time.perf_counter() - t0) / 60
        (out / f"arm-{arm}.json").write_text(json.dumps(result, indent=2) + "\n")
    merge(out, args.modality)


if __name__ == "__main__":
    main()
