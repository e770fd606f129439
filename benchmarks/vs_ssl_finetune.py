"""Fine-tuning for `vs_ssl.py`: each arm's last pretraining snapshot, fine-tuned by this library's
`finetune()` with one recipe for every arm.

The peer's snapshot is first converted into this library's model (the modality module's
`peer_to_ours`: images, MAE's ViT encoder -> our encoder with pre-LN blocks, checked token for
token against transformers in tests/test_vs_ssl_convert.py), so that the fine-tuning code, head,
data, augmentation and schedule are the same for every arm. The recipe is the modality module's
`finetune_config(epochs)`; for images, benchmarks/cifar10.py's (`cifar10.finetune_recipe`: the
image_cls preset, layer decay 0.65, drop-path 0.1, mixup 0.8 / cutmix 1.0, label smoothing 0.1,
lr 1e-3, batch 64, bf16) on the first 5,000 labelled training images, scored on the 10,000 test
images after every epoch, the best epoch reported, as cifar10.py does.

    taskset -c 1 python benchmarks/vs_ssl_finetune.py --modality image --arms ours2,mae --epochs 10 \\
        --seeds 3 --out benchmarks/results/vs_ssl/image

It reads `arm-<name>.json` in --out (written by vs_ssl.py; the snapshot files it names must still
exist, under vs_ssl.py's --work), writes `finetune-<name>.json` there and rebuilds results.md with
a fine-tuned table (vs_ssl.py --merge does too). Runs go to --work/MODALITY/finetune/<name of --out>.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from ssl_arms import init_model
from vs_ssl import SCRATCH, arm_names, merge, modality_module

from data2vec.finetune import finetune
from data2vec.interop import save_pretrained
from data2vec.pretrained import load_pretrained


def last_snapshot(out: Path, arm: str) -> dict[str, Any]:
    """The last pretraining snapshot vs_ssl.py recorded for `arm` in `out` (for `scratch`, ours
    2.0's: its architecture is the one initialised at random)."""
    name = "ours2" if arm in SCRATCH else arm
    snap: dict[str, Any] = json.loads((out / f"arm-{name}.json").read_text())["snapshots"][-1]
    return snap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", choices=["image", "audio", "text"], default="image")
    p.add_argument(
        "--arms",
        default=None,
        help="comma-separated (default: ours2 and the peer); `scratch`: ours 2.0's architecture at random init",
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=1, help="fine-tune each arm with seeds 0..N-1 (each listed, mean)")
    p.add_argument("--labels", type=int, default=0, help="labelled training examples (0: the modality's)")
    p.add_argument("--test-limit", type=int, default=0, help="test examples (0: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--out", default=None, help="vs_ssl.py's results folder (default benchmarks/results/vs_ssl/MODALITY)"
    )
    p.add_argument("--work", default="/tmp/data2vec-bench/vs_ssl")
    args = p.parse_args()
    mod = modality_module(args.modality)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "vs_ssl" / args.modality
    work = Path(args.work) / args.modality / "finetune" / out.name  # one folder per results folder
    torch.set_num_threads(args.threads)
    arms = (args.arms or f"ours2,{mod.PEER}").split(",")
    for arm in arms:
        if arm not in arm_names(mod) and arm not in SCRATCH:
            raise SystemExit(
                f"vs_ssl_finetune: unknown arm {arm!r} for {args.modality} (ours2, ours1, {mod.PEER}, scratch)"
            )
        snap = last_snapshot(out, arm)
        if not Path(snap["path"]).exists():
            raise SystemExit(
                f"vs_ssl_finetune: {arm}'s last snapshot {snap['path']} is gone: pretrain it again "
                f"(vs_ssl.py --modality {args.modality} --arms {arm} --out {out} --work WORK)"
            )
    train_set, test_set = mod.finetune_sets(args)
    ft = mod.finetune_config(args.epochs)
    for arm in arms:
        t0 = time.perf_counter()
        snap = last_snapshot(out, arm)
        source = snap["path"]
        result: dict[str, Any] = {"snapshot": {k: snap[k] for k in ("minutes", "step", "path")}}
        if arm in SCRATCH:  # ours 2.0's snapshot's architecture (and vocabulary), its seeded random init
            cfg = load_pretrained(source).config
            source = str(save_pretrained(init_model(cfg), work / "scratch-init", config=cfg))
            result["snapshot"] = {"minutes": 0.0, "step": 0, "path": source}
        elif arm == mod.PEER:
            source = str(mod.peer_to_ours(source, work / f"{arm}-step{snap['step']}-as-ours"))
            result["converted"] = source
        runs = []
        for seed in range(args.seeds):
            r = finetune(source, replace(ft, seed=seed), train_set, test_set, work / f"ft-{arm}-seed{seed}", quiet=True)
            runs.append(
                {
                    "seed": seed,
                    "best": float(r.best_metric),
                    "best_epoch": r.best_epoch,
                    "last": r.history[-1][f"eval_{r.metric}"],
                    "seconds": r.seconds,
                    "history": r.history,
                }
            )
            print(
                f"{arm} seed {seed}: best {r.metric} {r.best_metric:.4f} at epoch {r.best_epoch} "
                f"({r.seconds / 60:.1f} min)",
                flush=True,
            )
        bests = [r["best"] for r in runs]
        result |= {
            "metric": r.metric,
            "seeds": runs,
            "mean": float(np.mean(bests)),
            "std": float(np.std(bests)),
            "recipe": {k: v for k, v in ft.to_dict().items() if k != "seed"},
            "sets": {"train": f"{train_set.name} ({len(train_set)})", "test": f"{test_set.name} ({len(test_set)})"},
            "info": {
                "command": f"taskset -c CORE python benchmarks/vs_ssl_finetune.py --modality {args.modality} "
                f"--arms {arm} --epochs {args.epochs} --seeds {args.seeds}"
                + (f" --test-limit {args.test_limit}" if args.test_limit else "")
                + (f" --labels {args.labels}" if args.labels else ""),
                "machine": common.machine(),
                "date": time.strftime("%Y-%m-%d"),
            },
            "wall_minutes": (time.perf_counter() - t0) / 60,
        }
        (out / f"finetune-{arm}.json").write_text(json.dumps(result, indent=2) + "\n")
    merge(out, args.modality)


if __name__ == "__main__":
    main()
