"""Images for `vs_ssl.py`: CIFAR-10 shards, MAE with transformers' `ViTMAEForPreTraining` as the peer.

MAE as published (He et al., 2022), scaled to the tiny encoder: mask 0.75, normalised-pixel loss,
a decoder 2/3 the encoder's width and depth as MAE's ViT-B one (heads of 32), AdamW betas (0.9,
0.95), weight decay 0.05 off biases and norms, lr = 1.5e-4 x batch / 256, 5% warm-up then cosine,
on the same augmented views (RandomResizedCrop 0.2-1, flip) as ours. The probe: the first 5,000
labelled training images (10%), the test images.

Fine-tuning (vs_ssl_finetune.py): MAE's encoder is converted into this library's model
(`mae_to_ours`: the same ViT, pre-LN blocks and a final norm) and fine-tuned by our `finetune()`
with benchmarks/cifar10.py's recipe, exactly as our own snapshots are.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from cifar10 import finetune_recipe, labelled
from ssl_arms import autocast, calibrated_run, cosine_lr, decay_groups, ours_config, save_as_ours
from torch import Tensor

from data2vec.config import RunConfig
from data2vec.data.images import ImageFolderSource, PretrainTransform, TarShardSource, eval_transform
from data2vec.data.sampling import sample_seed
from data2vec.finetune import FinetuneConfig, LabelledSet
from data2vec.interop import InteropError
from data2vec.nn.pos import sincos_2d

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


def published_init(model: Any) -> Any:
    """A ViTMAEForPreTraining built from a config, initialised as transformers means to (MAE's
    published init): transformers 5.x initialises the patch projection before its embeddings
    module, whose initialisation then stops early, and its generic init zeroes the decoder's table,
    leaving both fixed sin-cos position tables, the CLS and the mask token at zero (no position
    information at all) and the projection N(0, 0.02) instead of Xavier. Run their own
    initialisers again, with the "already initialised" marks taken off those modules."""
    emb, dec = model.vit.embeddings, model.decoder
    for module in (emb, emb.patch_embeddings.projection, dec):
        module._is_hf_initialized = False
        for t in module.parameters(recurse=False):
            t._is_hf_initialized = False
    emb.initialize_weights()
    dec.initialize_weights(emb.patch_embeddings.num_patches)
    return model


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
        model = published_init(ViTMAEForPreTraining(mae_config(cfg))).train()
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
    test_src = ImageFolderSource(common.DATA / "cifar10" / "test")
    sub = np.sort(np.random.default_rng(0).permutation(len(test_src))[: args.curve_test])
    return (
        cifar_train(args.labels),
        cifar_test(args.test_limit),
        labelled(test_src, sub, f"cifar10 test ({args.curve_test})"),
    )


def cifar_train(labels: int) -> LabelledSet:
    """The first `labels` (default 5,000) labelled training images, as benchmarks/cifar10.py."""
    labels = labels or 5000
    shards = sorted(str(s) for s in (common.DATA / "cifar10").glob("train-*.tar"))
    return labelled(TarShardSource(shards), np.arange(labels), f"cifar10 train (first {labels} labelled)")


def cifar_test(limit: int) -> LabelledSet:
    """The test images, or the `limit` of them benchmarks/cifar10.py's --test-limit draws."""
    test_src = ImageFolderSource(common.DATA / "cifar10" / "test")
    limit = limit or len(test_src)
    return labelled(test_src, np.sort(np.random.default_rng(0).permutation(len(test_src))[:limit]), "cifar10 test")


# ---------------------------------------------------------------------- fine-tuning


def finetune_sets(args: argparse.Namespace) -> tuple[LabelledSet, LabelledSet]:
    """benchmarks/cifar10.py's fine-tuning sets: the first `--labels` (5,000) labelled training
    images, and the test images (all, or `--test-limit` of them)."""
    return cifar_train(args.labels), cifar_test(args.test_limit)


def finetune_config(epochs: int) -> FinetuneConfig:
    """benchmarks/cifar10.py's recipe, the same for every arm."""
    return finetune_recipe(epochs)


_MAE_LAYER = {  # (ours, transformers 5.x, transformers 4.x): per block i, a weight and a bias each
    "norm1": ("layers.{}.layernorm_before", "encoder.layer.{}.layernorm_before"),
    "norm2": ("layers.{}.layernorm_after", "encoder.layer.{}.layernorm_after"),
    "attn.proj": ("layers.{}.attention.o_proj", "encoder.layer.{}.attention.output.dense"),
    "mlp.fc1": ("layers.{}.mlp.fc1", "encoder.layer.{}.intermediate.dense"),
    "mlp.fc2": ("layers.{}.mlp.fc2", "encoder.layer.{}.output.dense"),
}
_MAE_QKV = (  # fused into our attn.qkv in this order
    ("layers.{}.attention.q_proj", "encoder.layer.{}.attention.attention.query"),
    ("layers.{}.attention.k_proj", "encoder.layer.{}.attention.attention.key"),
    ("layers.{}.attention.v_proj", "encoder.layer.{}.attention.attention.value"),
)


def mae_run_config(cfg: RunConfig, positions: str = "sincos") -> RunConfig:
    """Our config for MAE's encoder built from `cfg` (mae_config(cfg) builds MAE from it): the same
    width, depth, heads, MLP, patches and CLS token; transformers' ViT blocks are pre-LN (LayerNorm
    eps 1e-12) with a final LayerNorm, where our 2.0 blocks are post-LN after an input LayerNorm.
    `positions`: "sincos" (MAE's fixed table) or "none" (a MAE whose table is all zeros)."""
    mc = mae_config(cfg)
    enc = replace(
        cfg.model.encoder,
        dim=mc.hidden_size,
        depth=mc.num_hidden_layers,
        prenet_depth=0,
        num_heads=mc.num_attention_heads,
        mlp_ratio=mc.intermediate_size / mc.hidden_size,
        norm_order="pre",
        norm_eps=mc.layer_norm_eps,
        qkv_bias="all",
        layer_scale_init=0.0,
        position_bias="none",
        activation={"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}[mc.hidden_act],
        input_norm=False,
        final_norm=True,
    )
    image = replace(cfg.model.image, positions=positions, cls_token=True)
    return replace(cfg, model=replace(cfg.model, version=2, encoder=enc, image=image))


def mae_positions(mae: dict[str, Tensor], cfg: RunConfig) -> str:
    """What MAE's position table is, as our `image.positions`: "sincos" when it is our fixed table
    (same layout: columns in the first half), "none" when it is all zeros (what transformers 5.x
    leaves in a ViTMAE built from a config, see `published_init`); any other table raises
    InteropError (ours are fixed, not loaded)."""
    pos = {k.removeprefix("vit."): v for k, v in mae.items()}["embeddings.position_embeddings"][0].float()
    ours = sincos_2d(pos.shape[-1], cfg.model.image.grid)
    if pos.shape[0] != 1 + len(ours):
        raise InteropError(f"MAE's position table has {pos.shape[0] - 1} patch rows, our grid {len(ours)}")
    if not bool(pos.any()):
        return "none"
    diff = float((pos[1:] - ours).abs().max())
    if diff > 1e-6:
        raise InteropError(
            f"MAE's position table is neither zero nor our fixed sin-cos table (max difference {diff:.2e})"
        )
    return "sincos"


def mae_state_to_ours(mae: dict[str, Tensor], cfg: RunConfig) -> dict[str, Tensor]:
    """A ViTMAE encoder's state dict (`ViTMAEModel`, or `ViTMAEForPreTraining` with its `vit.`
    prefix and decoder; transformers 5.x or 4.x names) as our front-end and encoder weights for
    `mae_run_config(cfg, mae_positions(mae, cfg))`."""
    sd = {k.removeprefix("vit."): v for k, v in mae.items() if not k.startswith("decoder.")}
    col = 0 if "layers.0.attention.q_proj.weight" in sd else 1
    depth = mae_config(cfg).num_hidden_layers
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in sd:
            raise InteropError(f"MAE state dict: no {name}")
        used.add(name)
        return sd[name]

    mae_positions(mae, cfg)  # a table ours cannot compute raises here
    pos = take("embeddings.position_embeddings")
    out = {
        "frontend.local.proj.weight": take("embeddings.patch_embeddings.projection.weight"),
        "frontend.local.proj.bias": take("embeddings.patch_embeddings.projection.bias"),
        # MAE adds the table's CLS row (zeros) to its CLS token: folded in, exact either way
        "frontend.context.prefix": take("embeddings.cls_token") + pos[:, :1],
        "encoder.final_norm.weight": take("layernorm.weight"),
        "encoder.final_norm.bias": take("layernorm.bias"),
    }
    for i in range(depth):
        for ours, names in _MAE_LAYER.items():
            for p in ("weight", "bias"):
                out[f"encoder.blocks.{i}.{ours}.{p}"] = take(f"{names[col].format(i)}.{p}")
        for p in ("weight", "bias"):
            out[f"encoder.blocks.{i}.attn.qkv.{p}"] = torch.cat([take(f"{n[col].format(i)}.{p}") for n in _MAE_QKV])
    left = sorted(set(sd) - used)
    if left:
        raise InteropError(f"MAE state dict: no place in our model for {', '.join(left[:5])}")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def mae_to_ours(mae: dict[str, Tensor] | str | Path, cfg: RunConfig, out_dir: str | Path) -> Path:
    """Convert a MAE encoder (a state dict, or a file holding one: a vs_ssl snapshot `.pt`, read
    with weights_only, or `.safetensors`) into our pretrained-model folder `out_dir`
    (config.json + model.safetensors, what `load_pretrained` and `finetune` read). The encoder
    computes what `ViTMAEModel` computes with every patch visible (tests/test_vs_ssl_convert.py);
    the folder's 2.0 decoder is freshly initialised and unused by fine-tuning."""
    if not isinstance(mae, dict):
        path = Path(mae)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            mae = load_file(str(path))
        else:
            mae = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(mae, dict)
    rcfg = mae_run_config(cfg, mae_positions(mae, cfg))
    return save_as_ours(rcfg, mae_state_to_ours(mae, cfg), Path(out_dir), "a MAE encoder")


def peer_to_ours(path: str, out_dir: Path) -> Path:
    """The peer snapshot at `path` (run_peer's) as our pretrained-model folder (vs_ssl_finetune.py)."""
    return mae_to_ours(path, ours_config(PRESET, 2, []), out_dir)
