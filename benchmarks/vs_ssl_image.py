"""Images for `vs_ssl.py`: CIFAR-10 shards, MAE with transformers' `ViTMAEForPreTraining` as the peer.

MAE as published (He et al., 2022), scaled to the tiny encoder: mask 0.75, normalised-pixel loss,
a decoder 2/3 the encoder's width and depth as MAE's ViT-B one (heads of 32), AdamW betas (0.9,
0.95), weight decay 0.05 off biases and norms, lr = 1.5e-4 x batch / 256, 5% warm-up then cosine,
on the same augmented views (RandomResizedCrop 0.2-1, flip) as ours. The probe: the first 5,000
labelled training images (10%), the test images.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from cifar10 import labelled
from ssl_arms import autocast, calibrated_run, cosine_lr, decay_groups, ours_config
from torch import Tensor

from data2vec.config import RunConfig
from data2vec.data.images import ImageFolderSource, PretrainTransform, TarShardSource, eval_transform
from data2vec.data.sampling import sample_seed
from data2vec.finetune import LabelledSet

PRESET = "image-tiny"
PEER = "mae"
PEER_NAME = "MAE (transformers)"
UNIT = "images"
SHARDS = str(common.DATA / "cifar10" / "train-*.tar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mae-batch", type=int, default=64)


def ours_overrides(work: Path) -> list[str]:
    return [f"data.path={SHARDS}"]


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


def run_peer(budget_s: float, points: int, work: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import ViTMAEForPreTraining

    cfg = ours_config(PRESET, 2, [])
    batch = args.mae_batch
    peak = 1.5e-4 * batch / 256

    def build() -> tuple[Any, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = ViTMAEForPreTraining(mae_config(cfg)).train()
        return model, torch.optim.AdamW(decay_groups(model, 0.05), lr=peak, betas=(0.9, 0.95))

    d = cfg.data
    transform = PretrainTransform(
        size=cfg.model.image.image_size, channels=3, crop_scale=(0.2, 1.0), hflip=True, mean=d.mean, std=d.std
    )
    source = TarShardSource(sorted(str(s) for s in Path(SHARDS).parent.glob(Path(SHARDS).name)))
    data = views(source, transform, batch, seed)

    def step(state: tuple[Any, torch.optim.Optimizer], k: int, total: int) -> float:
        model, opt = state
        for g in opt.param_groups:
            g["lr"] = cosine_lr(k, total, peak, max(1, total // 20))
        with autocast():
            loss = model(pixel_values=next(data)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.item())

    def save(state: tuple[Any, torch.optim.Optimizer], path: Path) -> None:
        torch.save(state[0].vit.state_dict(), path)

    result = calibrated_run(PEER, build, step, save, budget_s, points, work)
    mc = mae_config(cfg)
    result["recipe"] = (
        f"batch {batch}, lr {peak:.2e} (1.5e-4 x {batch}/256), {result['steps']} steps "
        f"({result['per_step']:.3f} s/step calibrated); decoder {mc.decoder_hidden_size}-d x "
        f"{mc.decoder_num_hidden_layers}"
    )
    return result


def peer_features(path: str, data: LabelledSet) -> np.ndarray:
    from transformers import ViTMAEModel

    cfg = ours_config(PRESET, 2, [])
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


def probe_sets(args: argparse.Namespace) -> tuple[LabelledSet, LabelledSet, LabelledSet]:
    """(the first `--labels` training images, the test set or `--test-limit` of it, a fixed subset
    of `--curve-test` test images for the curve's inner points)."""
    labels = args.labels or 5000
    shards = sorted(str(s) for s in (common.DATA / "cifar10").glob("train-*.tar"))
    train_set = labelled(TarShardSource(shards), np.arange(labels), f"cifar10 train (first {labels} labelled)")
    test_src = ImageFolderSource(common.DATA / "cifar10" / "test")
    limit = args.test_limit or len(test_src)
    full = labelled(test_src, np.sort(np.random.default_rng(0).permutation(len(test_src))[:limit]), "cifar10 test")
    sub = np.sort(np.random.default_rng(0).permutation(len(test_src))[: args.curve_test])
    return train_set, full, labelled(test_src, sub, f"cifar10 test ({args.curve_test})")
