"""Named configurations: the official data2vec numbers and CPU-sized ones (docs/design.md,
'Presets and their numbers').

`preset(name, version)` returns a `RunConfig`. Per-process batch sizes are the official
per-GPU ones; step counts are the official update counts. Only numbers live here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from data2vec.config import (
    ConfigError,
    DataConfig,
    DecoderConfig,
    EncoderConfig,
    ImageConfig,
    LossConfig,
    MaskingConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TargetConfig,
    TeacherConfig,
    TrainConfig,
)

# ---------------------------------------------------------------- data2vec 1.0 images (BEiT code base)


def _image_v1(dim: int, depth: int, heads: int, layer_scale: float, drop_path: float, attn_drop: float) -> ModelConfig:
    return ModelConfig(
        modality="image",
        version=1,
        encoder=EncoderConfig(
            dim=dim,
            depth=depth,
            num_heads=heads,
            norm_order="pre",
            norm_eps=1e-6,
            qkv_bias="qv",
            layer_scale_init=layer_scale,
            position_bias="shared",
            final_norm=True,
            drop_path=drop_path,
            attn_dropout=attn_drop,
        ),
        image=ImageConfig(image_size=(224, 224), patch_size=16, channels=3, positions="none", cls_token=True),
        head_layers=1,
    )


def _image_v1_objective(cfg: RunConfig) -> RunConfig:
    return replace(
        cfg,
        # 120 of 196 patches.
        masking=MaskingConfig(kind="beit_block", mask_prob=120 / 196, min_block_patches=16),
        teacher=TeacherConfig(ema_scope="local", decay=0.9998, end_decay=0.9998, anneal_steps=0),
        targets=TargetConfig(top_k=6, layer_source="block", layer_norm="layer", final_norm="layer"),
        loss=LossConfig(beta=2.0, scale="inv_dim"),
    )


def image_base_v1() -> RunConfig:
    # ViT-B/16, batch 128 x 16 GPUs, 800 epochs of ImageNet-1K (625 steps/epoch), warm-up 10 epochs (README).
    cfg = RunConfig(
        model=_image_v1(768, 12, 12, layer_scale=1e-4, drop_path=0.25, attn_drop=0.05),
        optim=OptimConfig(
            lr=2e-3, min_lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, warmup_steps=6_250, clip_grad=3.0
        ),
        data=DataConfig(batch_size=128, crop_scale=(0.08, 1.0), hflip=True, color_jitter=0.4),
        train=TrainConfig(steps=500_000, collapse_after=5_000),
    )
    return _image_v1_objective(cfg)


def image_large_v1() -> RunConfig:
    # ViT-L/16, batch 64 x 64 GPUs (README), 800 epochs (312 steps/epoch), warm-up 80 epochs.
    cfg = RunConfig(
        model=_image_v1(1024, 24, 16, layer_scale=1e-5, drop_path=0.2, attn_drop=0.15),
        optim=OptimConfig(
            lr=1e-3, min_lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, warmup_steps=25_000, clip_grad=3.0
        ),
        data=DataConfig(batch_size=64, crop_scale=(0.08, 1.0), hflip=True, color_jitter=0.4),
        train=TrainConfig(steps=250_000, collapse_after=5_000),
    )
    return _image_v1_objective(cfg)


# ---------------------------------------------------------------- data2vec 2.0 images (data2vec_multi)


def _image_v2(dim: int, prenet: int, depth: int, heads: int, decoder: DecoderConfig) -> ModelConfig:
    return ModelConfig(
        modality="image",
        version=2,
        encoder=EncoderConfig(
            dim=dim,
            depth=depth,
            prenet_depth=prenet,
            num_heads=heads,
            norm_order="post",
            norm_eps=1e-6,
            qkv_bias="all",
            input_norm=True,
        ),
        image=ImageConfig(image_size=(224, 224), patch_size=16, channels=3, positions="sincos", cls_token=True),
        decoder=decoder,
    )


def image_base_v2() -> RunConfig:
    # CLS weight: 0.01 x (16 images x 16 masks per GPU), the constant the official per-GPU scaling implies.
    return RunConfig(
        model=_image_v2(768, 2, 10, 12, DecoderConfig(dim=768, kernel_size=3, groups=16, layers=6)),
        masking=MaskingConfig(kind="inverse_block", mask_prob=0.8, mask_length=3, mask_prob_adjust=0.07, num_masks=16),
        teacher=TeacherConfig(ema_scope="local", decay=0.9998, end_decay=0.99999, anneal_steps=100_000),
        targets=TargetConfig(top_k=10, layer_source="ffn", layer_norm="instance", final_norm="layer"),
        loss=LossConfig(beta=0.0, scale="rsqrt_dim", cls_weight=2.56),
        optim=OptimConfig(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=50_040, clip_grad=4.0),
        data=DataConfig(batch_size=16, crop_scale=(0.2, 1.0), hflip=True),
        train=TrainConfig(steps=375_300),
    )


def image_large_v2() -> RunConfig:
    return RunConfig(
        model=_image_v2(1024, 0, 24, 16, DecoderConfig(dim=1024, kernel_size=5, groups=16, layers=3)),
        masking=MaskingConfig(kind="inverse_block", mask_prob=0.75, mask_length=3, mask_prob_adjust=0.10, num_masks=16),
        teacher=TeacherConfig(ema_scope="local", decay=0.9998, end_decay=0.99999, anneal_steps=150_000),
        targets=TargetConfig(top_k=18, layer_source="ffn", layer_norm="instance", final_norm="layer"),
        loss=LossConfig(beta=0.0, scale="rsqrt_dim", cls_weight=1.28),
        optim=OptimConfig(lr=4e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=50_040, clip_grad=4.0),
        data=DataConfig(batch_size=8, crop_scale=(0.2, 1.0), hflip=True),
        train=TrainConfig(steps=375_300),
    )


# ---------------------------------------------------------------- CPU-sized images (32x32, patch 4)

_TINY_ENCODER = EncoderConfig(dim=192, depth=6, num_heads=6)


def image_tiny_v1() -> RunConfig:
    cfg = image_base_v1()
    model = replace(
        cfg.model,
        encoder=replace(
            cfg.model.encoder,
            dim=_TINY_ENCODER.dim,
            depth=_TINY_ENCODER.depth,
            num_heads=_TINY_ENCODER.num_heads,
            layer_scale_init=0.1,
            drop_path=0.0,
            attn_dropout=0.0,
        ),
        image=replace(cfg.model.image, image_size=(32, 32), patch_size=4),
    )
    return replace(
        cfg,
        model=model,
        masking=replace(cfg.masking, mask_prob=0.6, min_block_patches=4),
        teacher=replace(cfg.teacher, decay=0.998, end_decay=0.9995, anneal_steps=None),
        targets=replace(cfg.targets, top_k=3),
        optim=replace(cfg.optim, lr=1e-3, warmup_steps=100),
        data=replace(cfg.data, batch_size=64, crop_scale=(0.3, 1.0), color_jitter=0.4),
        train=TrainConfig(steps=2_000, ckpt_every=500, collapse_after=500),
    )


def image_tiny_v2() -> RunConfig:
    cfg = image_base_v2()
    model = replace(
        cfg.model,
        encoder=replace(
            cfg.model.encoder,
            dim=_TINY_ENCODER.dim,
            depth=_TINY_ENCODER.depth,
            prenet_depth=0,
            num_heads=_TINY_ENCODER.num_heads,
        ),
        image=replace(cfg.model.image, image_size=(32, 32), patch_size=4),
        decoder=DecoderConfig(dim=192, kernel_size=3, groups=16, layers=3),
    )
    return replace(
        cfg,
        model=model,
        masking=replace(cfg.masking, mask_prob=0.75, mask_length=2, mask_prob_adjust=0.07, num_masks=4),
        teacher=replace(cfg.teacher, decay=0.998, end_decay=0.9995, anneal_steps=None),
        targets=replace(cfg.targets, top_k=4),
        loss=replace(cfg.loss, cls_weight=0.01 * 32 * 4),
        optim=replace(cfg.optim, lr=1e-3, warmup_steps=100),
        data=replace(cfg.data, batch_size=32),
        train=TrainConfig(steps=2_000, ckpt_every=500, collapse_after=500),
    )


def digits_tiny(version: int) -> RunConfig:
    """The demo: scikit-learn's 8x8 digits upsampled to 32x32 grey-scale."""
    cfg = image_tiny_v1() if version == 1 else image_tiny_v2()
    model = replace(cfg.model, image=replace(cfg.model.image, channels=1))
    data = replace(
        cfg.data, path="builtin:digits", mean=(0.5,), std=(0.5,), hflip=False, color_jitter=0.0, crop_scale=(0.5, 1.0)
    )
    return replace(cfg, model=model, data=data)


PRESETS: dict[str, dict[int, Callable[[], RunConfig]]] = {
    "image-base": {1: image_base_v1, 2: image_base_v2},
    "image-large": {1: image_large_v1, 2: image_large_v2},
    "image-tiny": {1: image_tiny_v1, 2: image_tiny_v2},
    "digits-tiny": {1: lambda: digits_tiny(1), 2: lambda: digits_tiny(2)},
}


def preset(name: str, version: int = 2) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r} (available: {', '.join(sorted(PRESETS))})")
    if version not in PRESETS[name]:
        raise ConfigError(f"version: preset {name!r} has no data2vec {version}.0 variant")
    return replace(PRESETS[name][version](), preset=f"{name}@v{version}")


from data2vec.presets_audio import AUDIO_PRESETS  # noqa: E402

PRESETS.update(AUDIO_PRESETS)

from data2vec.presets_text import TEXT_PRESETS  # noqa: E402

PRESETS.update(TEXT_PRESETS)
