"""Text presets: the official data2vec numbers and CPU-sized ones (docs/design.md, 'Presets and
their numbers').

- `text-base` 1.0: fairseq `config/text/pretraining/base.yaml` (`data2vec_text`): RoBERTa-base,
  spans of 4 tokens on 35% (all <mask>), Smooth-L1 beta 4, K = 10, 2-layer head. The paper's
  main result used BERT masking instead (15%, 80/10/10): `--set masking.kind=bert
  --set masking.mask_prob=0.15 --set masking.random_token_prob=0.1 --set masking.leave_unmasked_prob=0.1`.
- `text-base` / `text-large` 2.0: `config/v2/base_text_only_task.yaml`,
  `large_text_only_task.yaml` (data2vec_multi): random masking 48% / 50%, M = 8, L2 loss
  with scale 1, a 5-layer kernel-9 conv decoder without residual.
- No official data2vec 1.0 Large text config exists (fairseq has only Base), so
  `text-large` has only the 2.0 variant.

Official runs use a 50K BPE vocabulary; here the vocabulary comes from the run's tokenizer
(trained on your corpus with `data.text.vocab_size` types, or loaded with
`data.text.tokenizer`). Batches are per process: the official per-GPU sequence counts.
Differences from the official recipes: 1.0 packs blocks across documents (fairseq's 'none'
break mode, as 2.0 does; 1.0 used 'complete_doc'), the schedule is linear warm-up + cosine
(the 1.0 config's own choice), and training is bf16 autocast rather than fp16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from data2vec.config import (
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
    TextConfig,
    TextDataConfig,
    TrainConfig,
)


def _encoder(dim: int, depth: int, heads: int) -> EncoderConfig:
    # RoBERTa / AltBlock: post-LN, LayerNorm eps 1e-5, dropout and attention dropout 0.1,
    # activation dropout 0, no layerdrop; the embedding LayerNorm lives in the front-end, so no
    # input norm (2.0 text: no context LayerNorm when prenet_depth is 0).
    return EncoderConfig(
        dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        norm_order="post",
        norm_eps=1e-5,
        qkv_bias="all",
        input_norm=False,
        dropout=0.1,
        attn_dropout=0.1,
        activation_dropout=0.0,
    )


def _model(version: Literal[1, 2], encoder: EncoderConfig, decoder: DecoderConfig | None = None) -> ModelConfig:
    return ModelConfig(
        modality="text",
        version=version,
        encoder=encoder,
        text=TextConfig(max_positions=512, embed_dropout=0.1),
        head_layers=2 if version == 1 else 1,
        decoder=decoder or DecoderConfig(),
    )


def _data(batch_size: int) -> DataConfig:
    return DataConfig(batch_size=batch_size, text=TextDataConfig(block_size=512, vocab_size=50_265))


def _decoder_v2() -> DecoderConfig:
    # 768 / kernel 9 / groups 1 / 5 layers, no residual, projection 768 -> 1536 -> D (GELU), input dropout 0.1.
    return DecoderConfig(
        dim=768,
        kernel_size=9,
        groups=1,
        layers=5,
        residual=False,
        projection_layers=2,
        projection_ratio=2.0,
        input_dropout=0.1,
    )


def text_base_v1() -> RunConfig:
    # 8,192 tokens per GPU x 16 GPUs = 256 sequences of 512; 1M updates; cosine, 10k warm-up.
    return RunConfig(
        model=_model(1, _encoder(768, 12, 12)),
        masking=MaskingConfig(
            kind="span", mask_prob=0.35, mask_length=4, random_token_prob=0.0, leave_unmasked_prob=0.0
        ),
        # Embeddings shared (copied), the transformer layers EMA-averaged; tau_n: the config's 300k (P1: 100k).
        teacher=TeacherConfig(ema_scope="encoder", decay=0.999, end_decay=0.9999, anneal_steps=300_000),
        targets=TargetConfig(top_k=10, layer_source="ffn", layer_norm="layer", final_norm="none"),
        loss=LossConfig(beta=4.0, scale="one"),
        optim=OptimConfig(lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, warmup_steps=10_000, clip_grad=5.0),
        data=_data(16),
        train=TrainConfig(steps=1_000_000),
    )


def text_base_v2() -> RunConfig:
    # 4 sequences of 512 per GPU x 16 GPUs, M = 8; 1M updates.
    return RunConfig(
        model=_model(2, _encoder(768, 12, 12), _decoder_v2()),
        masking=MaskingConfig(kind="random", mask_prob=0.48, mask_length=1, num_masks=8),
        teacher=TeacherConfig(ema_scope="encoder", decay=0.9999, end_decay=0.99999, anneal_steps=100_000),
        targets=TargetConfig(top_k=12, layer_source="ffn", layer_norm="instance", final_norm="none"),
        loss=LossConfig(beta=0.0, scale="one"),
        optim=OptimConfig(lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, warmup_steps=4_000, clip_grad=1.0),
        data=_data(4),
        train=TrainConfig(steps=1_000_000),
    )


def text_large_v2() -> RunConfig:
    # 2 sequences per GPU x 32 GPUs, M = 8; 600k updates; per-layer LayerNorm then instance norm.
    return RunConfig(
        model=_model(2, _encoder(1024, 24, 16), _decoder_v2()),
        masking=MaskingConfig(kind="random", mask_prob=0.5, mask_length=1, num_masks=8),
        teacher=TeacherConfig(ema_scope="encoder", decay=0.9999, end_decay=0.99999, anneal_steps=100_000),
        targets=TargetConfig(top_k=24, layer_source="ffn", layer_norm="layer", final_norm="instance"),
        loss=LossConfig(beta=0.0, scale="one"),
        optim=OptimConfig(lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, warmup_steps=4_000, clip_grad=1.0),
        data=_data(2),
        train=TrainConfig(steps=600_000),
    )


# ---------------------------------------------------------------- CPU-sized (minutes on a laptop)

_TINY_DIM, _TINY_DEPTH, _TINY_HEADS = 192, 4, 4
_TINY_BLOCK = 128
_TINY_VOCAB = 8_000


def _tiny(cfg: RunConfig) -> RunConfig:
    enc = replace(cfg.model.encoder, dim=_TINY_DIM, depth=_TINY_DEPTH, num_heads=_TINY_HEADS)
    model = replace(cfg.model, encoder=enc, text=replace(cfg.model.text, max_positions=_TINY_BLOCK))
    return replace(
        cfg,
        model=model,
        targets=replace(cfg.targets, top_k=min(cfg.targets.top_k, _TINY_DEPTH)),
        teacher=replace(cfg.teacher, decay=0.998, end_decay=0.9999, anneal_steps=None),
        data=replace(cfg.data, batch_size=32, text=TextDataConfig(block_size=_TINY_BLOCK, vocab_size=_TINY_VOCAB)),
        train=TrainConfig(steps=2_000, ckpt_every=500, collapse_after=500),
    )


def text_tiny_v1() -> RunConfig:
    cfg = _tiny(text_base_v1())
    return replace(
        cfg,
        targets=replace(cfg.targets, top_k=3),
        optim=replace(cfg.optim, lr=5e-4, warmup_steps=100),
    )


def text_tiny_v2() -> RunConfig:
    cfg = _tiny(text_base_v2())
    decoder = DecoderConfig(
        dim=_TINY_DIM,
        kernel_size=9,
        groups=1,
        layers=2,
        residual=False,
        projection_layers=2,
        projection_ratio=2.0,
        input_dropout=0.1,
    )
    return replace(
        cfg,
        model=replace(cfg.model, decoder=decoder),
        masking=replace(cfg.masking, num_masks=4),
        optim=replace(cfg.optim, lr=5e-4, warmup_steps=100),
        data=replace(cfg.data, batch_size=16),
    )


TEXT_PRESETS: dict[str, dict[int, Callable[[], RunConfig]]] = {
    "text-base": {1: text_base_v1, 2: text_base_v2},
    "text-large": {2: text_large_v2},
    "text-tiny": {1: text_tiny_v1, 2: text_tiny_v2},
}
