"""Typed, frozen configuration for a data2vec run.

One dataclass per concern (model, masking, teacher, targets, loss, optimiser, data,
training). Every field is checked when the object is built, so a bad value fails at
once with the dotted key in the message. `RunConfig.to_dict()` is what lands in
`config.json` next to every checkpoint, and `RunConfig.from_dict()` rebuilds it,
rejecting unknown keys and wrong types.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from data2vec.writes import write_text_atomic

Modality = Literal["image", "audio", "text"]
NormOrder = Literal["pre", "post"]
NormKind = Literal["instance", "layer", "none"]


MODALITIES: tuple[str, ...] = ("image", "audio", "text")
"""Modalities with a front-end; each front-end module adds its name when it is built in."""


LOGGERS: tuple[str, ...] = ("tensorboard",)
"""What `train.loggers` (and fine-tuning's `loggers`) may name, besides metrics.jsonl, which is always written."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the dotted key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_loggers(loggers: tuple[str, ...], key: str) -> None:
    """Every name in `loggers` is one of LOGGERS, each at most once."""
    for name in loggers:
        _check(name in LOGGERS, key, f"{name!r} is not a logger (known: {', '.join(LOGGERS)})")
    _check(len(set(loggers)) == len(loggers), key, "names a logger twice")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """The shared Transformer (prenet blocks + main blocks)."""

    dim: int = 768
    """Model width D."""
    depth: int = 12
    """Number of main blocks; targets come only from these."""
    prenet_depth: int = 0
    """Blocks run before the main blocks (data2vec 2.0 image base uses 2)."""
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_order: NormOrder = "post"
    """'pre' = pre-LN ViT (data2vec 1.0 vision); 'post' = post-LN (1.0 speech/text, all of 2.0)."""
    norm_eps: float = 1e-6
    qkv_bias: Literal["all", "qv", "none"] = "all"
    """'qv' = bias on query and value only (BEiT)."""
    layer_scale_init: float = 0.0
    """LayerScale init value for pre-LN blocks; 0 disables LayerScale."""
    position_bias: Literal["none", "shared", "per_layer", "both"] = "none"
    """Attention bias from the front-end (relative positions / ALiBi): one for all blocks, one per block,
    or both summed (transformers' Data2VecVision with both relative-bias flags on)."""
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu"
    """MLP activation: exact (erf) GELU as in every data2vec model; the others exist for imported models."""
    input_norm: bool = False
    """LayerNorm on the encoder input (post-LN models)."""
    final_norm: bool = False
    """LayerNorm after the last block (pre-LN models)."""
    dropout: float = 0.0
    attn_dropout: float = 0.0
    activation_dropout: float = 0.0
    drop_path: float = 0.0
    """Maximum stochastic-depth rate, increased linearly over the blocks."""
    layerdrop: float = 0.0
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them (less
    memory, about one more forward of compute); results are unchanged."""

    def validate(self, key: str) -> None:
        for name in ("dim", "depth", "num_heads"):
            _check(getattr(self, name) > 0, f"{key}.{name}", "must be positive")
        _check(self.prenet_depth >= 0, f"{key}.prenet_depth", "must be >= 0")
        _check(
            self.dim % self.num_heads == 0,
            f"{key}.num_heads",
            f"dim {self.dim} is not divisible by num_heads {self.num_heads}",
        )
        _check(self.mlp_ratio > 0, f"{key}.mlp_ratio", "must be positive")
        for name in ("dropout", "attn_dropout", "activation_dropout", "drop_path", "layerdrop"):
            _check(0.0 <= getattr(self, name) < 1.0, f"{key}.{name}", "must be in [0, 1)")
        _check(self.layer_scale_init >= 0, f"{key}.layer_scale_init", "must be >= 0")
        _check(
            self.layer_scale_init == 0 or self.norm_order == "pre",
            f"{key}.layer_scale_init",
            "LayerScale is only used by pre-LN blocks (norm_order='pre')",
        )


@dataclass(frozen=True, kw_only=True)
class ImageConfig:
    """Image front-end: a ViT patch embedding."""

    image_size: tuple[int, int] = (224, 224)
    """(height, width) in pixels."""
    patch_size: int = 16
    channels: int = 3
    positions: Literal["none", "sincos", "learned"] = "none"
    """Absolute positions added to patch tokens: fixed 2-D sin-cos (2.0), none (1.0 uses relative bias),
    or a learned table (BEiT's optional absolute embeddings; the CLS slot is folded into the CLS token)."""
    cls_token: bool = True
    rel_pos_hf_resample: bool = False
    """Reproduce transformers' Data2VecVision relative-position table on a non-square grid: it reads the
    table as (2W-1, 2H-1) and bilinearly resizes it to (2H-1, 2W-1) on every forward. Set only for models
    imported from transformers; no effect on square grids."""

    def validate(self, key: str) -> None:
        h, w = self.image_size
        _check(h > 0 and w > 0, f"{key}.image_size", "must be positive")
        _check(self.patch_size > 0, f"{key}.patch_size", "must be positive")
        _check(
            h % self.patch_size == 0 and w % self.patch_size == 0,
            f"{key}.patch_size",
            f"patch size {self.patch_size} does not divide the image size {h}x{w}",
        )
        _check(self.channels in (1, 3), f"{key}.channels", "must be 1 or 3")

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)


@dataclass(frozen=True, kw_only=True)
class AudioConfig:
    """Speech front-end: wav2vec 2.0 CNN (16 kHz -> 50 Hz), projection, conv positions."""

    conv_layers: tuple[tuple[int, int, int], ...] = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
    """(channels, kernel, stride) per CNN layer."""
    conv_bias: bool = False
    proj_norm_eps: float = 1e-5
    """Epsilon of the LayerNorm on the CNN features, before the projection."""
    pos_conv_depth: int = 5
    pos_conv_kernel: int = 19
    pos_conv_groups: int = 16
    pos_conv_zero_padding: Literal["each_layer", "input"] = "each_layer"
    """Zero padded frames before every positional conv layer (a padded batch then gives valid frames exactly
    what each utterance gets alone) or only at the stack's input (fairseq, transformers)."""
    pos_conv_norm: bool = True
    """A LayerNorm (no affine) after each positional conv layer, before its GELU (data2vec); false for
    wav2vec 2.0's single positional conv (conv -> GELU), e.g. a wav2vec 2.0 encoder converted to this model."""
    alibi: bool = False
    """ALiBi attention bias with a learned per-head scale (data2vec 2.0 speech); needs
    model.encoder.position_bias 'shared' (the official setting) or 'per_layer'."""

    def validate(self, key: str) -> None:
        _check(len(self.conv_layers) > 0, f"{key}.conv_layers", "needs at least one layer")
        for i, (c, k, st) in enumerate(self.conv_layers):
            _check(c > 0 and k > 0 and st > 0, f"{key}.conv_layers[{i}]", "channels, kernel, stride must be > 0")
        _check(self.pos_conv_depth >= 0, f"{key}.pos_conv_depth", "must be >= 0")
        _check(self.pos_conv_kernel > 0, f"{key}.pos_conv_kernel", "must be positive")
        _check(self.pos_conv_groups > 0, f"{key}.pos_conv_groups", "must be positive")
        _check(self.proj_norm_eps > 0, f"{key}.proj_norm_eps", "must be positive")


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """Text front-end: token + learned positions (RoBERTa offset), embedding LayerNorm."""

    vocab_size: int = 50265
    """Set from the tokenizer when a run starts."""
    max_positions: int = 512
    pad_id: int = 1
    bos_id: int = 0
    eos_id: int = 2
    mask_id: int = 50264
    unk_id: int = 3
    embed_dropout: float = 0.1
    """Dropout after the embedding LayerNorm (student only; the teacher pass is clean)."""
    layer_norm_eps: float = 1e-5
    """Epsilon of the embedding LayerNorm."""
    type_vocab_size: int = 0
    """Rows of a token-type embedding table (RoBERTa/BERT checkpoints); row 0 is added to every token.
    0 = no such table."""

    def validate(self, key: str) -> None:
        _check(self.vocab_size > 0, f"{key}.vocab_size", "must be positive")
        _check(self.max_positions > 0, f"{key}.max_positions", "must be positive")
        for name in ("pad_id", "bos_id", "eos_id", "mask_id", "unk_id"):
            _check(0 <= getattr(self, name) < self.vocab_size, f"{key}.{name}", "must be a valid token id")
        _check(0.0 <= self.embed_dropout < 1.0, f"{key}.embed_dropout", "must be in [0, 1)")
        _check(self.layer_norm_eps > 0, f"{key}.layer_norm_eps", "must be positive")
        _check(self.type_vocab_size >= 0, f"{key}.type_vocab_size", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """data2vec 2.0 convolutional decoder (1-D for audio/text, 2-D for images)."""

    dim: int = 768
    kernel_size: int = 3
    groups: int = 16
    layers: int = 6
    residual: bool = True
    projection_layers: int = 1
    projection_ratio: float = 2.0
    input_dropout: float = 0.0
    mask_noise_std: float = 0.01
    """Std of the Gaussian noise that stands in for masked tokens at the decoder input."""

    def validate(self, key: str) -> None:
        _check(self.dim > 0 and self.layers > 0, key, "dim and layers must be positive")
        _check(self.kernel_size > 0, f"{key}.kernel_size", "must be positive")
        _check(self.groups > 0 and self.dim % self.groups == 0, f"{key}.groups", "must divide decoder dim")
        _check(self.projection_layers in (1, 2), f"{key}.projection_layers", "must be 1 or 2")
        _check(0.0 <= self.input_dropout < 1.0, f"{key}.input_dropout", "must be in [0, 1)")
        _check(self.mask_noise_std >= 0, f"{key}.mask_noise_std", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    modality: Modality = "image"
    version: Literal[1, 2] = 2
    """1 = masked tokens replaced by a learned vector + linear head; 2 = visible-only encoder + conv decoder."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    head_layers: int = 1
    """data2vec 1.0 regression head: 1 = Linear, 2 = Linear-GELU-Linear."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def validate(self, key: str) -> None:
        _check(self.modality in MODALITIES, f"{key}.modality", f"modality {self.modality!r} is not available")
        _check(self.version in (1, 2), f"{key}.version", "must be 1 or 2")
        _check(self.head_layers in (1, 2), f"{key}.head_layers", "must be 1 or 2")
        self.encoder.validate(f"{key}.encoder")
        # Only the active modality's front-end section is checked.
        getattr(self, self.modality).validate(f"{key}.{self.modality}")
        if self.modality == "audio":
            _check(
                self.audio.alibi == (self.encoder.position_bias != "none"),
                f"{key}.encoder.position_bias",
                f"{self.encoder.position_bias!r} with audio.alibi={self.audio.alibi}: ALiBi needs 'shared' "
                "or 'per_layer', and audio has no other position bias (use 'none' without ALiBi)",
            )
        self.decoder.validate(f"{key}.decoder")


# ----------------------------------------------------------------------- objective


@dataclass(frozen=True, kw_only=True)
class MaskingConfig:
    kind: Literal["beit_block", "inverse_block", "span", "block_1d", "bert", "random"] = "inverse_block"
    """beit_block: BEiT blocks (1.0 images); inverse_block: visible blocks, rest masked (2.0 images);
    span: wav2vec-style spans, mask_prob = share of span starts (1.0 speech, text span variant);
    block_1d: spans with an exact count (2.0 speech); bert: 80/10/10 token masking (1.0 text);
    random: MAE random masking with an exact count (2.0 text)."""
    mask_prob: float = 0.8
    """Fraction of tokens masked (the student predicts these)."""
    mask_length: int = 3
    """Block side (inverse_block) or span length (span, block_1d)."""
    min_block_patches: int = 16
    """Smallest BEiT block area in patches (beit_block)."""
    mask_prob_adjust: float = 0.07
    """Extra block density before the exact-count fix-up (inverse_block)."""
    num_masks: int = 1
    """M: masks per sample sharing one teacher pass (2.0 only)."""
    random_token_prob: float = 0.1
    """bert: share of selected tokens replaced by a random token (no loss there)."""
    leave_unmasked_prob: float = 0.1
    """bert: share of selected tokens left unchanged (no loss there)."""

    def validate(self, key: str) -> None:
        _check(0.0 < self.mask_prob < 1.0, f"{key}.mask_prob", f"{self.mask_prob} is not in (0, 1)")
        _check(self.mask_length >= 1, f"{key}.mask_length", "must be >= 1")
        _check(
            self.random_token_prob >= 0
            and self.leave_unmasked_prob >= 0
            and self.random_token_prob + self.leave_unmasked_prob < 1,
            f"{key}.random_token_prob",
            "random_token_prob + leave_unmasked_prob must be in [0, 1)",
        )
        _check(self.min_block_patches >= 1, f"{key}.min_block_patches", "must be >= 1")
        _check(self.mask_prob_adjust >= 0, f"{key}.mask_prob_adjust", "must be >= 0")
        _check(self.num_masks >= 1, f"{key}.num_masks", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    ema_scope: Literal["local", "context", "encoder"] = "local"
    """What the EMA teacher tracks: everything from this stage on; the stages before it are shared
    with the student. local = whole front-end + encoder (images); context = positions/prefix tokens +
    encoder, the feature extractor shared (2.0 audio); encoder = encoder only (text, 1.0 audio)."""
    decay: float = 0.999
    end_decay: float = 0.9999
    anneal_steps: int | None = None
    """Linear anneal from decay to end_decay over this many optimizer steps, then hold;
    None = over the whole run (train.steps)."""

    def validate(self, key: str) -> None:
        _check(0.0 <= self.decay <= 1.0, f"{key}.decay", "must be in [0, 1]")
        _check(0.0 <= self.end_decay <= 1.0, f"{key}.end_decay", "must be in [0, 1]")
        _check(self.anneal_steps is None or self.anneal_steps >= 0, f"{key}.anneal_steps", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    top_k: int = 8
    """Average the outputs of the top K main blocks."""
    layer_source: Literal["ffn", "block"] = "ffn"
    """ffn = FFN output before the residual (1.0 speech/text, all 2.0); block = block output (1.0 vision)."""
    layer_norm: NormKind = "instance"
    """Normalisation applied to each layer before averaging."""
    final_norm: NormKind = "none"
    """Normalisation applied after averaging."""

    def validate(self, key: str) -> None:
        _check(self.top_k >= 1, f"{key}.top_k", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    beta: float = 0.0
    """0 = squared error; > 0 = Smooth-L1 with this beta."""
    scale: Literal["rsqrt_dim", "inv_dim", "one"] = "rsqrt_dim"
    """Per-token loss = sum over dims x scale (1/sqrt(D), 1/D = mean over elements, or 1)."""
    cls_weight: float = 0.0
    """2.0 images: weight of the CLS regression onto the mean target, relative to the per-token loss."""

    def validate(self, key: str) -> None:
        _check(self.beta >= 0, f"{key}.beta", "must be >= 0")
        _check(self.cls_weight >= 0, f"{key}.cls_weight", "must be >= 0")


# -------------------------------------------------------------------- optimisation


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    """Decoupled weight decay; never applied to 1-D parameters (norms, biases, tokens)."""
    warmup_steps: int = 0
    clip_grad: float = 0.0
    """Max gradient norm; 0 disables clipping."""
    local_lr_scale: float = 1.0
    """Learning-rate factor for the local encoder (CNN / patch embedding / token embedding);
    0 keeps it at its initial weights. Under Adam this, not a gradient multiplier (fairseq's
    `feature_grad_mult`, which Adam's per-parameter normalisation cancels), sets how far it moves."""

    def validate(self, key: str) -> None:
        _check(self.lr > 0, f"{key}.lr", "must be positive")
        _check(0 <= self.local_lr_scale <= 1, f"{key}.local_lr_scale", "must be in [0, 1]")
        _check(0 <= self.min_lr <= self.lr, f"{key}.min_lr", "must be in [0, lr]")
        _check(all(0 <= b < 1 for b in self.betas), f"{key}.betas", "must be in [0, 1)")
        _check(self.eps > 0, f"{key}.eps", "must be positive")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        _check(self.clip_grad >= 0, f"{key}.clip_grad", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class AudioDataConfig:
    sample_rate: int = 16_000
    """Every file is resampled to this rate."""
    max_sample_size: int = 320_000
    """Random crop to at most this many samples (20 s)."""
    min_sample_size: int = 32_000
    """Clips shorter than this are dropped and counted (2 s)."""
    batch_seconds: float = 200.0
    """Audio per batch, in seconds (batches are formed by duration, not by count)."""
    normalize: bool = True
    """Zero mean, unit variance per utterance."""
    crop_to_shortest: bool = True
    """Crop every batch to its shortest utterance, so batches hold no padding (fairseq);
    False pads to the longest instead, with a padding mask that masks and targets respect."""
    max_batch_size: int = 0
    """Most utterances in one batch; 0 = no limit besides batch_seconds."""

    def validate(self, key: str) -> None:
        _check(self.sample_rate > 0, f"{key}.sample_rate", "must be positive")
        _check(self.max_batch_size >= 0, f"{key}.max_batch_size", "must be >= 0")
        _check(0 < self.min_sample_size <= self.max_sample_size, f"{key}.min_sample_size", "must be in (0, max]")
        _check(self.batch_seconds > 0, f"{key}.batch_seconds", "must be positive")


@dataclass(frozen=True, kw_only=True)
class TextDataConfig:
    tokenizer: str = ""
    """tokenizer.json, or a folder with vocab.json + merges.txt; empty = train byte-level BPE on the data."""
    vocab_size: int = 8_000
    """Vocabulary size when a tokenizer is trained."""
    block_size: int = 512
    """Tokens per training block (documents are packed, separated by the end token)."""
    document: Literal["line", "file"] = "line"
    """In plain-text files: one document per line or per file."""
    jsonl_field: str = "text"
    """In .jsonl files: the field holding each record's text."""
    tsv_column: str = "text"
    """In .tsv files (first line = header): the column holding the text (e.g. 'sentence' for GLUE)."""
    tokenizer_train_bytes: int = 200_000_000
    """A trained tokenizer sees at most this much text (the first documents read)."""
    token_cache: str = ""
    """The tokenised corpus (a flat file of token ids in the run directory); set when a run starts."""

    def validate(self, key: str) -> None:
        _check(self.vocab_size >= 261, f"{key}.vocab_size", "must be >= 261 (256 bytes + 5 special tokens)")
        _check(self.block_size >= 4, f"{key}.block_size", "must be >= 4")
        _check(self.tokenizer_train_bytes > 0, f"{key}.tokenizer_train_bytes", "must be positive")
        for name in ("jsonl_field", "tsv_column"):
            _check(bool(getattr(self, name)), f"{key}.{name}", "must not be empty")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str = ""
    """Image folder, tar shard(s) (a file, a folder of .tar, or a glob), or 'builtin:digits'; an
    audio folder or manifest; text files; or parquet/arrow files of any modality (a file, folder or glob)."""
    column: str = ""
    """Parquet/arrow data: the column holding the images, audio or text ("" = the one column of a
    fitting type)."""
    shuffle_buffer: int = 4096
    """Parquet/arrow data: rows are shuffled within windows of consecutive row groups holding at
    least this many rows (each loader worker keeps up to two windows' row groups decoded)."""
    batch_size: int = 32
    """Samples per micro-batch (per process)."""
    num_workers: int = 1
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range."""
    hflip: bool = True
    color_jitter: float = 0.0
    """Brightness/contrast/saturation jitter strength (0.4 in 1.0 vision)."""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    on_bad_input: Literal["skip", "fail"] = "fail"
    max_image_pixels: int = 50_000_000
    """Images with more pixels are refused from their header, before decoding (a bad input);
    JPEGs are decoded at the smallest 1/2-1/8 scale that still covers what training needs."""
    audio: AudioDataConfig = field(default_factory=AudioDataConfig)
    text: TextDataConfig = field(default_factory=TextDataConfig)

    def validate(self, key: str) -> None:
        self.audio.validate(f"{key}.audio")
        self.text.validate(f"{key}.text")
        _check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
        _check(self.num_workers >= 0, f"{key}.num_workers", "must be >= 0")
        lo, hi = self.crop_scale
        _check(0 < lo <= hi <= 1, f"{key}.crop_scale", "must satisfy 0 < min <= max <= 1")
        _check(0 <= self.color_jitter < 1, f"{key}.color_jitter", "must be in [0, 1)")
        _check(len(self.mean) == len(self.std), f"{key}.std", "mean and std must have the same length")
        _check(all(s > 0 for s in self.std), f"{key}.std", "must be positive")
        _check(self.max_image_pixels >= 1, f"{key}.max_image_pixels", "must be >= 1")
        _check(self.shuffle_buffer >= 1, f"{key}.shuffle_buffer", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the EMA updates once per optimizer step)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast (targets, losses and the EMA stay fp32) or fp32. auto: bf16 where the device
    has bf16 matrix units (CUDA with bf16; a CPU with AMX or AVX512-BF16), fp32 elsewhere: on a
    CPU without them bf16 products are emulated, many times slower than fp32."""
    device: str = "auto"
    seed: int = 0
    log_every: int = 1
    """Write a metrics.jsonl line every this many steps (the collapse monitor checks every step)."""
    ckpt_every: int = 500
    keep_last: int = 2
    collapse_after: int = 5000
    """The collapse monitor fires only after this many steps (warm-up)."""
    min_target_std: float = 0.1
    """Collapse monitor: the teacher's target std (per channel over masked tokens, averaged)
    below this after `collapse_after` steps is a collapse. 0 = not checked (train.log says so)."""
    min_pred_std: float = 0.01
    """Collapse monitor: the same for the student's predictions. 0 = not checked."""
    min_local_std: float = 0.0
    """Collapse monitor on the local encoder's output (`local_std`: 0.5-1 at init, near 0
    when the CNN / embedding emits one vector everywhere). A speech CNN shared with the teacher
    can learn that shortcut on small data while the instance-normed targets keep `target_std`
    healthy (docs/audio.md). 0 = not checked; below 0.05 a warning is logged either way."""
    on_nan: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient: stop (last checkpoint intact) or skip that step and count it."""
    on_collapse: Literal["stop", "rewind"] = "stop"
    """Collapse monitor: stop, or rewind to the last checkpoint and continue with a lower lr."""
    rewind_lr_factor: float = 0.5
    """Each rewind multiplies the learning rate by this."""
    max_rewinds: int = 3
    max_loss_ratio: float = 1e6
    """A finite loss more than this many times the running median of the last losses is an
    explosion, handled as a non-finite loss (train.on_nan). 0 = not checked."""
    max_nan_share: float = 0.2
    """train.on_nan=skip: stop once more than this share of the steps so far were skipped (and at
    least 5 were). 1 = never stop."""
    max_weight_abs: float = 100.0
    """A checkpoint is written only if every weight is finite and at most this large in absolute
    value (or 4x the largest weight the run started from, if that is larger); otherwise the run
    stops naming the last checkpoint that passed. 0 = only finiteness is checked."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state over the processes
    (FSDP2, one unit per Transformer block) instead of replicating them (DDP)."""
    compile: bool = False
    """torch.compile every Transformer block of the student and the teacher (fuses the norms,
    activations and residual adds around the matmuls; meant for CUDA). The first steps compile
    for tens of seconds. On the 2-core CPU it measured within 8% of eager, mostly slower (BENCHMARKS.md)."""
    loggers: tuple[str, ...] = ()
    """Where the metrics go besides metrics.jsonl: "tensorboard" writes event files to RUN_DIR/tensorboard/
    (the optional extra: pip install 'data2vec[tensorboard]'). On the command line: train.loggers=[tensorboard]."""

    def validate(self, key: str) -> None:
        check_loggers(self.loggers, f"{key}.loggers")
        _check(self.steps >= 1, f"{key}.steps", "must be >= 1")
        _check(0 <= self.min_local_std < 1, f"{key}.min_local_std", "must be in [0, 1)")
        for name in ("min_target_std", "min_pred_std"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"{key}.{name}", f"{value} is not a number >= 0 (0 = off)")
        _check(self.collapse_after >= 0, f"{key}.collapse_after", "must be >= 0")
        _check(
            self.max_loss_ratio == 0 or (math.isfinite(self.max_loss_ratio) and self.max_loss_ratio > 1),
            f"{key}.max_loss_ratio",
            f"{self.max_loss_ratio} is not 0 (off) or a number > 1",
        )
        _check(0 <= self.max_nan_share <= 1, f"{key}.max_nan_share", f"{self.max_nan_share} is not in [0, 1]")
        _check(
            math.isfinite(self.max_weight_abs) and self.max_weight_abs >= 0,
            f"{key}.max_weight_abs",
            f"{self.max_weight_abs} is not a number >= 0 (0 = off)",
        )
        _check(self.grad_accum >= 1, f"{key}.grad_accum", "must be >= 1")
        _check(self.log_every >= 1, f"{key}.log_every", "must be >= 1")
        _check(self.ckpt_every >= 1, f"{key}.ckpt_every", "must be >= 1")
        _check(self.keep_last >= 1, f"{key}.keep_last", "must be >= 1")
        _check(0 < self.rewind_lr_factor <= 1, f"{key}.rewind_lr_factor", "must be in (0, 1]")
        _check(self.max_rewinds >= 0, f"{key}.max_rewinds", "must be >= 0")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"{key}.device",
            f"{self.device!r} is not 'auto', 'cpu' or 'cuda[:N]'",
        )


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """Online probe during pretraining: every `every` steps, a linear probe and a kNN classifier
    on frozen, mean-pooled student features of a labelled set, logged to metrics.jsonl."""

    every: int = 0
    """Probe every this many optimizer steps; 0 = off. Must be a multiple of train.log_every."""
    train_data: str = ""
    """Labelled data the probes are fitted on (image class folders or tars with .cls, an audio
    folder of class subfolders or a manifest with a label column, text TSV/JSONL with a label,
    parquet/arrow files of any modality with a label column)."""
    eval_data: str = ""
    """Labelled data the probes are scored on (same formats)."""
    label_column: str = "label"
    """The label column of manifests, TSV/JSONL and parquet/arrow files."""
    column: str = ""
    """Parquet/arrow files: the column holding the inputs ("" = the one column of a fitting type)."""
    layers: tuple[int, ...] = ()
    """Layers to probe (0 = encoder input, 1..L blocks, negative from the end); empty = the last."""
    average_layers: bool = False
    """Also probe the average of the chosen layers' features."""
    knn_k: int = 20
    max_samples: int = 2000
    """At most this many examples from each set (the first ones)."""

    def validate(self, key: str) -> None:
        _check(self.every >= 0, f"{key}.every", "must be >= 0 (0 = off)")
        _check(self.knn_k >= 1, f"{key}.knn_k", "must be >= 1")
        _check(self.max_samples >= 2, f"{key}.max_samples", "must be >= 2")
        _check(bool(self.label_column), f"{key}.label_column", "must not be empty")
        if self.every > 0:
            for name in ("train_data", "eval_data"):
                _check(bool(getattr(self, name)), f"{key}.{name}", "a labelled set is needed when probe.every > 0")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that defines a pretraining run; saved as config.json in the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    preset: str = ""
    """Name of the preset this config was derived from (informational)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate(f.name)
        _check(
            self.probe.every % self.train.log_every == 0,
            "probe.every",
            f"{self.probe.every} is not a multiple of train.log_every {self.train.log_every}",
        )
        enc = self.model.encoder
        _check(
            self.targets.top_k <= enc.depth,
            "targets.top_k",
            f"{self.targets.top_k} is larger than model.encoder.depth {enc.depth}",
        )
        if self.model.version == 1:
            _check(self.masking.num_masks == 1, "masking.num_masks", "multi-mask needs model.version=2")
        else:
            _check(
                self.masking.kind != "beit_block",
                "masking.kind",
                "beit_block masks have unequal counts per row; "
                "data2vec 2.0 needs inverse_block, block_1d, span or random",
            )
        if self.model.modality == "image":
            _check(
                len(self.data.mean) == self.model.image.channels,
                "data.mean",
                f"has {len(self.data.mean)} values for {self.model.image.channels} image channel(s)",
            )
        if self.model.modality == "text":
            _check(
                self.data.text.block_size <= self.model.text.max_positions,
                "data.text.block_size",
                f"{self.data.text.block_size} is larger than model.text.max_positions {self.model.text.max_positions}",
            )
            text_kinds = ("bert", "span") if self.model.version == 1 else ("random",)
            _check(
                self.masking.kind in text_kinds,
                "masking.kind",
                f"{self.masking.kind!r} does not apply to data2vec {self.model.version}.0 text "
                f"(use {' or '.join(text_kinds)})",
            )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = to_dict(self)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return from_dict(cls, data)

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file + rename), so a crash never leaves half a config."""
        write_config_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_config_json(path))


def write_config_json(data: dict[str, Any], path: str | Path) -> None:
    """A config as indented JSON, written atomically (temporary file + rename)."""
    path = Path(path)
    write_text_atomic(path, json.dumps(data, indent=2) + "\n", "a config")


def read_config_json(path: str | Path) -> dict[str, Any]:
    """A config file's JSON, with a one-line ConfigError naming the file when it is missing or invalid."""
    try:
        data: dict[str, Any] = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return data


# ---------------------------------------------------------------- (de)serialising

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting JSON lists to tuples."""
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, key)
    if origin is Literal:
        allowed = get_args(tp)
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (valid keys: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    return _from_dict(cls, data, "")


def _bare_list(raw: str) -> Any:
    """'[a, b]' that is not JSON: a list of its comma-separated items, each JSON if it parses, else a
    plain string (so `train.loggers=[tensorboard]` needs no quotes); any other text as it is."""
    inner = raw.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        return raw
    return [_json_or_text(item.strip()) for item in inner[1:-1].split(",")]


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse 'a.b.c=value'; the value is JSON if it parses, else a list if it is '[a, b]' (items
    as JSON or plain strings), else a plain string."""
    if "=" not in text:
        raise ConfigError(f"{text!r}: an override must look like key=value (e.g. optim.lr=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{text!r}: empty key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = _bare_list(raw)
    return key.split("."), value


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of `cfg` with dotted `key=value` overrides applied and validated."""
    data = to_dict(cfg)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"{'.'.join(path[: i + 1])}: unknown key")
            node = node[part]
        if path[-1] not in node:
            raise ConfigError(f"{'.'.join(path)}: unknown key (valid keys: {', '.join(sorted(node))})")
        node[path[-1]] = value
    return from_dict(type(cfg), data)
