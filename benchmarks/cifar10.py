"""CIFAR-10: data2vec 2.0 pretraining for a CPU budget, then fine-tuning on 10% of the
training labels and a linear probe, against the same architecture from a random init under
the same fine-tuning recipe and epochs; plus the raw-pixel logistic-regression baseline.

    python benchmarks/cifar10.py --budget-minutes 5 --finetune-epochs 3 --threads 1 \\
        --out benchmarks/results/cifar10 [--work /tmp/data2vec-bench/cifar10]

Pretraining sees the 50,000 training images without labels (image-tiny preset, 32x32,
patch 4); fine-tuning and the probe use the first 5,000 of them (the shards are shuffled)
with labels; everything is tested on the 10,000 test images (or --test-limit of them).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import common
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from data2vec.config import apply_overrides
from data2vec.data.eval_inputs import labelled_items
from data2vec.data.images import ImageFolderSource, TarShardSource
from data2vec.finetune import FinetuneConfig, LabelledSet, finetune_preset
from data2vec.presets import preset


def labelled(source: TarShardSource | ImageFolderSource, indices: np.ndarray, name: str) -> LabelledSet:
    labels = [int(source.label(int(i)) or 0) for i in indices]
    data = LabelledSet(source.load, [0] * len(source), [str(c) for c in range(10)], name)
    sub = data.subset(indices.tolist())
    sub.targets = labels
    return sub


def finetune_recipe(epochs: int) -> FinetuneConfig:
    """The fine-tuning recipe of this benchmark (the image_cls preset: layer decay 0.65, drop-path
    0.1, mixup 0.8 / cutmix 1.0, label smoothing 0.1, lr 1e-3), batch 64, bf16, crops of 50-100%
    of the image; vs_ssl_finetune.py fine-tunes every arm with it too."""
    ft = finetune_preset("image_cls", epochs=epochs, batch_size=64, log_every=10, precision="bf16")
    return replace(ft, crop_scale=(0.5, 1.0))


def main() -> None:
    p = common.bench_parser(__doc__, "cifar10", budget=5.0, epochs=3)
    p.add_argument("--labels", type=int, default=5000, help="labelled training images (10%% = 5000)")
    p.add_argument("--test-limit", type=int, default=10000)
    args = p.parse_args()
    out, work, t_all = common.start(args)
    shards = sorted(str(s) for s in (common.DATA / "cifar10").glob("train-*.tar"))
    cfg = apply_overrides(
        preset("image-tiny", args.version),
        [
            f"data.path={common.DATA / 'cifar10' / 'train-*.tar'}",
            "data.num_workers=0",
            "data.batch_size=64",
            "train.precision=bf16",
            "train.log_every=10",
            *args.overrides,
        ],
    )
    run_dir, pinfo = common.pretrain_or_reuse(cfg, args, work)
    algo = common.algorithm(run_dir)

    train_src = TarShardSource(shards)
    test_src = ImageFolderSource(common.DATA / "cifar10" / "test")
    rng = np.random.default_rng(0)
    test_idx = np.sort(rng.permutation(len(test_src))[: args.test_limit])
    train_set = labelled(train_src, np.arange(args.labels), "cifar10 train (labelled part)")
    test_set = labelled(test_src, test_idx, "cifar10 test")

    ft = finetune_recipe(args.finetune_epochs)
    rows = common.compare_finetune(
        run_dir, ft, train_set, test_set, work, args.seeds, args.ft_overrides, jobs=args.jobs
    )

    probe = common.probe_compare(run_dir, partial(labelled_items, cfg), train_set, test_set)

    def pixels(data: LabelledSet) -> np.ndarray:
        rgb = [np.asarray(data.load(i).convert("RGB"), np.float32).reshape(-1) / 255 for i in range(len(data))]
        return np.stack(rgb)

    scaler = StandardScaler().fit(pixels(train_set))
    clf = LogisticRegression(max_iter=1000, C=0.01).fit(scaler.transform(pixels(train_set)), train_set.targets)
    raw = float(clf.score(scaler.transform(pixels(test_set)), test_set.targets))
    print(f"raw-pixel logistic regression: {raw:.4f}")

    table = [
        (f"{algo} pretrained, fine-tuned", "top-1 accuracy", f"{rows['pretrained']['best']:.4f}"),
        ("same architecture from scratch, fine-tuned", "top-1 accuracy", f"{rows['scratch']['best']:.4f}"),
        (f"{algo} pretrained, linear probe", "top-1 accuracy", f"{probe['pretrained']:.4f}"),
        ("random init, linear probe", "top-1 accuracy", f"{probe['scratch']:.4f}"),
        ("raw-pixel logistic regression", "top-1 accuracy", f"{raw:.4f}"),
    ]
    ft_min = {k: f"{v['seconds'] / 60:.1f}" for k, v in rows.items()}
    info = {
        "pretraining": f"{pinfo['steps']} steps x batch {pinfo['batch_size']} in {pinfo['seconds'] / 60:.1f} min",
        "fine-tuning": f"{args.finetune_epochs} epochs on {len(train_set)} labelled images, "
        f"{ft_min['pretrained']} min (pretrained) / {ft_min['scratch']} min (scratch)",
        "test images": len(test_set),
        "margin (fine-tuned, pretrained - scratch)": f"{rows['pretrained']['best'] - rows['scratch']['best']:+.4f}",
        "margin (linear probe)": f"{probe['pretrained'] - probe['scratch']:+.4f}",
        **common.seeds_note(rows),
        **common.footer(args, t_all),
    }
    curves = {k: v["history"] for k, v in rows.items()}
    common.write_results(out, f"CIFAR-10 (image-tiny, {algo})", table, info, curves)


if __name__ == "__main__":
    main()
