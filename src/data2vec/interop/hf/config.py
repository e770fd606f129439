"""Config translation between transformers' config.json and ours, both ways: `model_config` reads a
data2vec 1.0 config.json (missing keys take the transformers class defaults) into our ModelConfig,
`run_config` puts the official 1.0 preset's objective around it, `hf_config` writes one back, and
`exportable` says why a model has no exact transformers counterpart. The per-modality facts they
share (defaults, one-to-one encoder fields, fixed encoder settings) are in `tables`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from data2vec.config import AudioConfig, EncoderConfig, ImageConfig, Modality, ModelConfig, RunConfig, TextConfig
from data2vec.interop.common import InteropError
from data2vec.interop.hf.head import HFHead
from data2vec.interop.hf.tables import (
    ACT_IN,
    ACT_OUT,
    BARE,
    BASE_PRESET,
    DEFAULTS,
    DERIVED,
    ENCODER_FLOATS,
    FIXED_ENCODER,
    TYPE_OF,
    Activation,
    PositionBias,
)
from data2vec.model import Data2Vec

# ----------------------------------------------------------------------------- config: HF -> ours


def _get(hf: dict[str, Any], modality: str, key: str) -> Any:
    """`hf[key]`, or the transformers default where it is missing or null."""
    return hf[key] if key in hf and hf[key] is not None else DEFAULTS[modality][key]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Values:
    """A config.json's values by type (missing or null: the transformers default). A value of
    another type raises InteropError naming the key, what it should be and what it is: a string
    "192" or a float 6.5 is never turned into a number."""

    def __init__(self, hf: dict[str, Any], modality: str) -> None:
        self.hf, self.modality = hf, modality

    def _checked(self, key: str, ok: Callable[[Any], bool], expected: str) -> Any:
        value = _get(self.hf, self.modality, key)
        if not ok(value):
            raise InteropError(f"{key}: expected {expected}, got {value!r}")
        return value

    def integer(self, key: str) -> int:
        return int(self._checked(key, _is_int, "an integer"))

    def number(self, key: str) -> float:
        return float(self._checked(key, lambda v: _is_int(v) or isinstance(v, float), "a number"))

    def flag(self, key: str) -> bool:
        return bool(self._checked(key, lambda v: isinstance(v, bool), "true or false"))

    def text(self, key: str) -> str:
        return str(self._checked(key, lambda v: isinstance(v, str), "a string"))

    def integers(self, key: str) -> list[int]:
        value = self._checked(key, lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of integers")
        return [int(v) for v in value]

    def raw(self, key: str) -> Any:
        return _get(self.hf, self.modality, key)


def _activation(name: str, key: str) -> Activation:
    if name not in ACT_IN:
        raise InteropError(f"{key}={name!r} is not supported (supported: {', '.join(sorted(ACT_IN))})")
    return ACT_IN[name]


def _mlp_ratio(dim: int, hidden: int) -> float:
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        raise InteropError(f"intermediate_size {hidden} is not representable as a ratio of hidden_size {dim}")
    return ratio


def _pair(value: Any, key: str) -> tuple[int, int]:
    if _is_int(value):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_int, value)):
        return (int(value[0]), int(value[1]))
    raise InteropError(f"{key}: expected an integer or two, got {value!r}")


def model_config(hf: dict[str, Any], modality: Modality) -> ModelConfig:
    """Our data2vec 1.0 ModelConfig for a transformers config.json of `modality`. A value of the
    wrong type (a string, list or fractional number where an integer belongs, ...) raises
    InteropError naming the key."""
    v = _Values(hf, modality)
    dim = v.integer("hidden_size")
    common = EncoderConfig(
        dim=dim,
        depth=v.integer("num_hidden_layers"),
        num_heads=v.integer("num_attention_heads"),
        mlp_ratio=_mlp_ratio(dim, v.integer("intermediate_size")),
        norm_eps=v.number("layer_norm_eps"),
        activation=_activation(v.text("hidden_act"), "hidden_act"),
    )

    def encoder(**changes: Any) -> EncoderConfig:
        """`common` with the modality's fixed settings, its one-to-one float fields and `changes`."""
        floats: dict[str, Any] = {ours: v.number(key) for key, ours in ENCODER_FLOATS[modality].items()}
        return replace(common, **FIXED_ENCODER[modality], **floats, **changes)

    if modality == "image":
        h, w = _pair(v.raw("image_size"), "image_size")
        ph, pw = _pair(v.raw("patch_size"), "patch_size")
        if ph != pw:
            raise InteropError(f"patch_size {ph}x{pw}: only square patches are supported")
        shared, per_layer = v.flag("use_shared_relative_position_bias"), v.flag("use_relative_position_bias")
        bias: PositionBias = (
            "both" if shared and per_layer else "shared" if shared else "per_layer" if per_layer else "none"
        )
        enc = encoder(position_bias=bias, final_norm=not v.flag("use_mean_pooling"))
        image = ImageConfig(
            image_size=(h, w),
            patch_size=ph,
            channels=v.integer("num_channels"),
            positions="learned" if v.flag("use_absolute_position_embeddings") else "none",
            cls_token=True,
            rel_pos_hf_resample=bias != "none" and h // ph != w // ph,
        )
        return ModelConfig(modality="image", version=1, encoder=enc, image=image)
    if modality == "audio":
        if v.flag("add_adapter"):
            raise InteropError("add_adapter=true: the adapter after the encoder is not supported")
        extractor_act = v.text("feat_extract_activation")
        _activation(extractor_act, "feat_extract_activation")
        if extractor_act != "gelu":
            raise InteropError(f"feat_extract_activation={extractor_act!r}: only 'gelu' is supported")
        depth = v.integer("num_conv_pos_embeddings")
        if depth < 1:
            raise InteropError("num_conv_pos_embeddings=0 (no positional conv layers) is not supported")
        dims, kernels, strides = v.integers("conv_dim"), v.integers("conv_kernel"), v.integers("conv_stride")
        if not len(dims) == len(kernels) == len(strides):
            raise InteropError("conv_dim, conv_kernel and conv_stride differ in length")
        enc = encoder()
        audio = AudioConfig(
            conv_layers=tuple(zip(dims, kernels, strides, strict=True)),
            conv_bias=v.flag("conv_bias"),
            proj_norm_eps=v.number("layer_norm_eps"),
            pos_conv_depth=depth,
            pos_conv_kernel=v.integer("conv_pos_kernel_size"),
            pos_conv_groups=v.integer("num_conv_pos_embedding_groups"),
            pos_conv_zero_padding="input",
        )
        return ModelConfig(modality="audio", version=1, encoder=enc, audio=audio)
    if v.flag("is_decoder") or v.flag("add_cross_attention"):
        raise InteropError("is_decoder / add_cross_attention: only the bidirectional encoder is supported")
    vocab, pad = v.integer("vocab_size"), v.integer("pad_token_id")
    max_positions = v.integer("max_position_embeddings") - pad - 1
    if max_positions < 1:
        raise InteropError(
            f"max_position_embeddings {v.integer('max_position_embeddings')} leaves no positions after pad id"
        )
    mask_id: Any = hf.get("mask_token_id")
    unk_id: Any = hf.get("unk_token_id", 3)
    text = TextConfig(
        vocab_size=vocab,
        max_positions=max_positions,
        pad_id=pad,
        bos_id=v.integer("bos_token_id"),
        eos_id=v.integer("eos_token_id"),
        mask_id=int(mask_id) if _is_int(mask_id) and 0 <= mask_id < vocab else vocab - 1,
        unk_id=int(unk_id) if _is_int(unk_id) and 0 <= unk_id < vocab else pad,
        embed_dropout=v.number("hidden_dropout_prob"),
        layer_norm_eps=v.number("layer_norm_eps"),
        type_vocab_size=v.integer("type_vocab_size"),
    )
    return ModelConfig(modality="text", version=1, encoder=encoder(), text=text)


def run_config(model: ModelConfig) -> RunConfig:
    """Our full config: the matching official 1.0 preset's objective and training settings around
    the imported model, adjusted so it validates (top-K <= depth, channels, text block size)."""
    from data2vec.presets import preset

    base = preset(BASE_PRESET[model.modality], 1)
    data = base.data
    if model.modality == "image" and model.image.channels != len(data.mean):
        data = replace(data, mean=(0.5,) * model.image.channels, std=(0.5,) * model.image.channels)
    if model.modality == "text":
        data = replace(data, text=replace(data.text, block_size=min(data.text.block_size, model.text.max_positions)))
    targets = replace(base.targets, top_k=min(base.targets.top_k, model.encoder.depth))
    return replace(base, model=model, data=data, targets=targets, preset=f"{base.preset} (transformers import)")


# ----------------------------------------------------------------------------- export


def exportable(model: Data2Vec) -> list[str]:
    """Why transformers cannot hold this model exactly (empty list = it can)."""
    m = model.cfg
    enc = m.encoder
    if m.version != 1:
        return [
            "it is a data2vec 2.0 model: transformers has no data2vec 2.0 classes (only 1.0 vision/audio/text). "
            "Keep it in this library's format (save_pretrained / `data2vec convert SRC DST`): config.json holds "
            "the full RunConfig and model.safetensors the weights, so it is self-describing"
        ]
    why = []
    if enc.prenet_depth:
        why.append("encoder.prenet_depth > 0")
    why += [f"encoder.{k} must be {v!r}" for k, v in FIXED_ENCODER[m.modality].items() if getattr(enc, k) != v]
    if m.modality == "image":
        icfg = m.image
        h, w = icfg.grid
        if not icfg.cls_token:
            why.append("image.cls_token must be true")
        if icfg.positions != "none" and h != w:
            why.append("absolute positions on a non-square grid (transformers resizes them on every forward)")
        if enc.position_bias != "none" and h != w and not icfg.rel_pos_hf_resample:
            why.append(
                "relative position bias on a non-square grid: transformers resamples the table (reading it "
                "transposed) on every forward, so only models imported from transformers "
                "(image.rel_pos_hf_resample) can go back"
            )
    elif m.modality == "audio":
        if m.audio.alibi:
            why.append("audio.alibi (transformers has no ALiBi for data2vec audio)")
        if m.audio.pos_conv_depth < 1:
            why.append("audio.pos_conv_depth must be >= 1")
        if not m.audio.pos_conv_norm:
            why.append(
                "audio.pos_conv_norm must be true (transformers' data2vec audio normalises every positional conv)"
            )
        if m.audio.proj_norm_eps != enc.norm_eps:
            why.append("audio.proj_norm_eps must equal encoder.norm_eps (transformers uses one layer_norm_eps)")
    elif m.text.layer_norm_eps != enc.norm_eps:
        why.append("text.layer_norm_eps must equal encoder.norm_eps (transformers uses one layer_norm_eps)")
    return why


def hf_config(model: ModelConfig, head: HFHead | None = None) -> dict[str, Any]:
    """The config.json transformers needs for `model` (+ the head's architecture and carried keys)."""
    mod = model.modality
    enc = model.encoder
    derived: dict[str, Any] = {
        "hidden_size": enc.dim,
        "num_hidden_layers": enc.depth,
        "num_attention_heads": enc.num_heads,
        "intermediate_size": int(enc.dim * enc.mlp_ratio),
        "hidden_act": ACT_OUT[enc.activation],
        "layer_norm_eps": enc.norm_eps,
    }
    derived |= {key: getattr(enc, ours) for key, ours in ENCODER_FLOATS[mod].items()}
    if mod == "image":
        icfg = model.image
        h, w = icfg.image_size
        derived |= {
            "image_size": h if h == w else [h, w],
            "patch_size": icfg.patch_size,
            "num_channels": icfg.channels,
            "use_absolute_position_embeddings": icfg.positions != "none",
            "use_relative_position_bias": enc.position_bias in ("per_layer", "both"),
            "use_shared_relative_position_bias": enc.position_bias in ("shared", "both"),
            "use_mean_pooling": not enc.final_norm,
        }
        defaults = dict(DEFAULTS["image"], use_mask_token=True)
    elif mod == "audio":
        a = model.audio
        derived |= {
            "feat_extract_activation": "gelu",
            "conv_dim": [c for c, _, _ in a.conv_layers],
            "conv_kernel": [k for _, k, _ in a.conv_layers],
            "conv_stride": [s for _, _, s in a.conv_layers],
            "conv_bias": a.conv_bias,
            "num_feat_extract_layers": len(a.conv_layers),
            "num_conv_pos_embedding_groups": a.pos_conv_groups,
            "conv_pos_kernel_size": a.pos_conv_kernel,
            "num_conv_pos_embeddings": a.pos_conv_depth,
            "add_adapter": False,
            "output_hidden_size": enc.dim,
        }
        defaults = dict(DEFAULTS["audio"])
    else:
        t = model.text
        derived |= {
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_positions + t.pad_id + 1,
            "type_vocab_size": max(t.type_vocab_size, 1),
            "pad_token_id": t.pad_id,
            "bos_token_id": t.bos_id,
            "eos_token_id": t.eos_id,
            "mask_token_id": t.mask_id,
            "is_decoder": False,
            "add_cross_attention": False,
        }
        defaults = dict(DEFAULTS["text"])
    carried = {} if head is None else {k: v for k, v in head.config.items() if k not in DERIVED[mod]}
    arch = head.architecture if head is not None else BARE[mod]
    return {"architectures": [arch], "model_type": TYPE_OF[mod], **defaults, **carried, **derived, "dtype": "float32"}
