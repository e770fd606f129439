"""Speech presets: the official data2vec numbers and CPU-sized ones (docs/design.md, 'Presets and
their numbers').

- `audio-base` 1.0: fairseq `config/audio/pretraining/base_librispeech.yaml`.
- `audio-base` / `audio-large` 2.0: `config/v2/base_audio_only_task.yaml`,
  `large_audio_only_task.yaml` (data2vec_multi).
- No official data2vec 1.0 Large speech config exists (fairseq has only Base), so
  `audio-large` has only the 2.0 variant.

Batches are in seconds of 16 kHz audio per process: fairseq's per-GPU `max_tokens`
divided by 16,000. Differences from the official recipes: the learning-rate schedule is
this library's linear warm-up + cosine (1.0 used tri-stage 3/90/7%; its 3% warm-up is kept),
and training is bf16 autocast rather than fairseq's fp16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from data2vec.config import (
    AudioConfig,
    AudioDataConfig,
    DataConfig,
    DecoderConfig,
    EncoderConfig,
    LossConfig,
    MaskingConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TargetConfig,
    TeacherConfig,
    TrainConfig,
)

SAMPLE_RATE = 16_000


def _encoder(dim: int, depth: int, heads: int, *, prenet: int = 0, layerdrop: float, alibi: bool) -> EncoderConfig:
    # Post-LN blocks (fairseq layer_norm_first=False), LayerNorm eps 1e-5, dropout/attention
    # dropout 0.1, activation dropout 0 (the library defaults of both versions).
    return EncoderConfig(
        dim=dim,
        depth=depth,
        prenet_depth=prenet,
        num_heads=heads,
        mlp_ratio=4.0,
        norm_order="post",
        norm_eps=1e-5,
        qkv_bias="all",
        position_bias="shared" if alibi else "none",
        input_norm=True,
        dropout=0.1,
        attn_dropout=0.1,
        activation_dropout=0.0,
        layerdrop=layerdrop,
    )


def _data(batch_samples: int) -> DataConfig:
    return DataConfig(
        num_workers=2,
        audio=AudioDataConfig(
            sample_rate=SAMPLE_RATE,
            max_sample_size=320_000,  # 20 s crop
            min_sample_size=32_000,  # 2 s
            batch_seconds=batch_samples / SAMPLE_RATE,
            normalize=True,
        ),
    )


# ---------------------------------------------------------------- data2vec 1.0 (data2vec_audio)


def audio_base_v1() -> RunConfig:
    # 3.8M samples (237.5 s) per GPU x 16 GPUs; 400k updates; tri-stage warm-up 3% = 12k.
    return RunConfig(
        model=ModelConfig(
            modality="audio",
            version=1,
            encoder=_encoder(768, 12, 12, layerdrop=0.05, alibi=False),
            audio=AudioConfig(alibi=False),
            head_layers=1,
        ),
        masking=MaskingConfig(kind="span", mask_prob=0.65, mask_length=10, num_masks=1),
        # ema_transformer_only + ema_layers_only: CNN, projection and pos-conv shared.
        teacher=TeacherConfig(ema_scope="encoder", decay=0.999, end_decay=0.9999, anneal_steps=30_000),
        targets=TargetConfig(top_k=8, layer_source="ffn", layer_norm="instance", final_norm="none"),
        loss=LossConfig(beta=0.0, scale="rsqrt_dim"),
        optim=OptimConfig(lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, warmup_steps=12_000),
        data=_data(3_800_000),
        train=TrainConfig(steps=400_000),
    )


# ---------------------------------------------------------------- data2vec 2.0 (data2vec_multi)


def audio_base_v2() -> RunConfig:
    # 1.0M samples (62.5 s) per GPU x 8 GPUs, M = 8; 400k updates, warm-up 8k, no clipping.
    return RunConfig(
        model=ModelConfig(
            modality="audio",
            version=2,
            encoder=_encoder(768, 12, 12, layerdrop=0.05, alibi=True),
            audio=AudioConfig(alibi=True),
            decoder=DecoderConfig(dim=384, kernel_size=7, groups=16, layers=4, input_dropout=0.1),
        ),
        masking=MaskingConfig(kind="block_1d", mask_prob=0.5, mask_length=5, mask_prob_adjust=0.05, num_masks=8),
        # CNN and projection shared; pos-conv, context LayerNorm, ALiBi scale and blocks EMA'd.
        teacher=TeacherConfig(ema_scope="context", decay=0.999, end_decay=0.99999, anneal_steps=75_000),
        targets=TargetConfig(top_k=8, layer_source="ffn", layer_norm="instance", final_norm="none"),
        loss=LossConfig(beta=0.0, scale="rsqrt_dim"),
        optim=OptimConfig(lr=7.5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, warmup_steps=8_000),
        data=_data(1_000_000),
        train=TrainConfig(steps=400_000),
    )


def audio_large_v2() -> RunConfig:
    # 320k samples (20 s) per GPU x 48 GPUs, M = 12; 600k updates, warm-up 10k, clip 1.
    return RunConfig(
        model=ModelConfig(
            modality="audio",
            version=2,
            encoder=_encoder(1024, 16, 16, prenet=8, layerdrop=0.0, alibi=True),
            audio=AudioConfig(alibi=True),
            decoder=DecoderConfig(dim=768, kernel_size=7, groups=16, layers=4, input_dropout=0.1),
        ),
        masking=MaskingConfig(kind="block_1d", mask_prob=0.55, mask_length=5, mask_prob_adjust=0.1, num_masks=12),
        teacher=TeacherConfig(ema_scope="context", decay=0.9997, end_decay=1.0, anneal_steps=300_000),
        targets=TargetConfig(top_k=16, layer_source="ffn", layer_norm="instance", final_norm="none"),
        loss=LossConfig(beta=0.0, scale="rsqrt_dim"),
        optim=OptimConfig(lr=4e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, warmup_steps=10_000, clip_grad=1.0),
        data=_data(320_000),
        train=TrainConfig(steps=600_000),
    )


# ---------------------------------------------------------------- CPU-sized

# Same CNN layout (16 kHz -> 50 Hz frames) with 128 channels instead of 512, a 4-block
# width-192 Transformer, 3 s crops, 24 s batches: a few steps per second on a laptop CPU.
_TINY_CONV = ((128, 10, 5),) + ((128, 3, 2),) * 4 + ((128, 2, 2),) * 2


def _tiny(cfg: RunConfig) -> RunConfig:
    model = replace(
        cfg.model,
        encoder=replace(
            cfg.model.encoder,
            dim=192,
            depth=4,
            prenet_depth=0,
            num_heads=4,
            dropout=0.0,
            attn_dropout=0.0,
            layerdrop=0.0,
        ),
        audio=replace(
            cfg.model.audio, conv_layers=_TINY_CONV, pos_conv_depth=2, pos_conv_kernel=19, pos_conv_groups=16
        ),
        decoder=replace(cfg.model.decoder, dim=192, kernel_size=7, groups=16, layers=2, input_dropout=0.0),
    )
    return replace(
        cfg,
        model=model,
        teacher=replace(cfg.teacher, decay=0.998, end_decay=0.9995, anneal_steps=None),
        targets=replace(cfg.targets, top_k=3),
        optim=replace(cfg.optim, lr=1e-3, warmup_steps=50, clip_grad=1.0),
        data=replace(
            cfg.data,
            num_workers=0,  # with 2-4 cores a loader process slows the model more than it helps
            audio=replace(
                cfg.data.audio, max_sample_size=48_000, min_sample_size=4_000, batch_seconds=24.0, max_batch_size=16
            ),
        ),
        train=TrainConfig(steps=500, ckpt_every=250, collapse_after=200),
    )


def audio_tiny_v1() -> RunConfig:
    return _tiny(audio_base_v1())


def audio_tiny_v2() -> RunConfig:
    cfg = _tiny(audio_base_v2())
    return replace(cfg, masking=replace(cfg.masking, num_masks=4))


AUDIO_PRESETS: dict[str, dict[int, Callable[[], RunConfig]]] = {
    "audio-base": {1: audio_base_v1, 2: audio_base_v2},
    "audio-large": {2: audio_large_v2},
    "audio-tiny": {1: audio_tiny_v1, 2: audio_tiny_v2},
}
