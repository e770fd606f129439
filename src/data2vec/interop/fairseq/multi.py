"""data2vec 2.0 checkpoints (fairseq `data2vec_multi`) of one modality: the shared AltBlocks,
prenet, ALiBi scales and conv decoder, and per modality (the `FRONTENDS` table) the image, speech
or text local encoder; their `cfg` as our RunConfig around the official 2.0 preset.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from data2vec.config import AudioConfig, ImageConfig, RunConfig, TextConfig
from data2vec.interop.fairseq.common import (
    Converted,
    FairseqImportError,
    Source,
    build_config,
    check_rest,
    get,
    num,
    num_heads,
)
from data2vec.interop.fairseq.parts import (
    alt_block,
    audio_config,
    audio_local,
    objective_v1_v2,
    pos_convs,
    text_embeddings,
)
from data2vec.interop.fairseq.parts import (
    decoder as conv_decoder,
)
from data2vec.nn.pos import sincos_2d
from data2vec.presets import preset

_MULTI_PRESETS = {"IMAGE": "image", "AUDIO": "audio", "TEXT": "text"}
"""fairseq's modality names -> ours."""


@dataclass
class _Local:
    """What converting one modality's local encoder reads and writes."""

    src: Source
    m: str
    """The modality's key prefix, `modality_encoders.<NAME>.`."""
    mmeta: Any
    """The modality's config (`cfg.model.modalities.<name>`)."""
    dim: int
    alibi: bool
    base: RunConfig
    out: dict[str, Tensor]
    where: str


def _image(c: _Local) -> tuple[ImageConfig, list[str]]:
    """Patch embedding and the fixed 2-D sin-cos positions (checked, not stored)."""
    src, m, out, where = c.src, c.m, c.out, c.where
    if src.has(m + "local_encoder.0.proj.weight"):
        raise FairseqImportError(f"{where}: a patch embedding narrower than the model (with a Linear) is not supported")
    w = src.take(m + "local_encoder.proj.weight")
    out["frontend.local.proj.weight"] = w
    out["frontend.local.proj.bias"] = src.take(m + "local_encoder.proj.bias")
    patch, channels = int(w.shape[-1]), int(w.shape[1])
    fixed = src.has(m + "fixed_positional_encoder.positions")
    size = get(c.mmeta, "input_size")
    if fixed:
        pos = src.take(m + "fixed_positional_encoder.positions")
        side = math.isqrt(int(pos.shape[1]))
        if not isinstance(size, int):
            size = side * patch
        expected = sincos_2d(c.dim, (side, side))
        if pos.reshape(-1, c.dim).shape != expected.shape or not torch.allclose(
            pos.reshape(-1, c.dim).float(), expected, atol=1e-5
        ):
            raise FairseqImportError(f"{where}: the fixed positions are not the 2-D sin-cos table this library uses")
    if not isinstance(size, int):
        size = 224
    image = ImageConfig(
        image_size=(size, size),
        patch_size=patch,
        channels=channels,
        positions="sincos" if fixed else "none",
        cls_token="frontend.context.prefix" in out,
    )
    return image, []


def _audio(c: _Local) -> tuple[AudioConfig, list[str]]:
    """The CNN, its projection and the positional convs."""
    src, m, out, where = c.src, c.m, c.out, c.where
    spec = get(c.mmeta, "feature_encoder_spec")
    conv, conv_bias = audio_local(
        src, m + "local_encoder.", spec, f"{m}project_features.1", f"{m}project_features.2", out, where
    )
    if src.has(m + "relative_positional_encoder.0.weight"):
        raise FairseqImportError(f"{where}: conv_pos_pre_ln=True is not supported")
    pos = pos_convs(src, m + "relative_positional_encoder.", 1, out, c.dim)
    return audio_config(conv, conv_bias, pos, c.alibi), []


def _text(c: _Local) -> tuple[TextConfig, list[str]]:
    """Token and position embeddings with their LayerNorm (RoBERTa's token ids)."""
    src, out, where = c.src, c.out, c.where
    text_embeddings(src, c.m + "local_encoder.", out, where, "learned_pos=False is not supported")
    if get(c.mmeta, "no_scale_embedding") is False:
        raise FairseqImportError(f"{where}: scaled token embeddings (no_scale_embedding=False) are not supported")
    vocab = int(out["frontend.local.embed_tokens.weight"].shape[0])
    rows = int(out["frontend.local.embed_positions.weight"].shape[0])
    text = TextConfig(
        vocab_size=vocab,
        max_positions=rows - 2,
        pad_id=1,
        bos_id=0,
        eos_id=2,
        unk_id=3,
        mask_id=vocab - 1,
        embed_dropout=num(get(c.mmeta, "dropout"), c.base.model.text.embed_dropout),
    )
    return text, [r"_float_tensor$"]


FRONTENDS: dict[str, Callable[[_Local], tuple[ImageConfig | AudioConfig | TextConfig, list[str]]]] = {
    "image": _image,
    "audio": _audio,
    "text": _text,
}
"""Per modality: its local encoder's tensors into `out`; its front-end config and the extra
patterns of tensors it may leave unused."""


def convert_multi(src: Source, meta: Any, task: Any, where: str) -> Converted:
    """A fairseq `data2vec_multi` model of one modality (`task` is not read)."""
    present = sorted({k.split(".")[1] for k in src.sd if k.startswith("modality_encoders.")})
    mod = present[0] if len(present) == 1 else None
    if mod is None:
        wanted = get(meta, "supported_modality")
        names = {1: "AUDIO", 2: "IMAGE", 3: "TEXT"}
        wanted = names.get(wanted, wanted) if isinstance(wanted, int) else wanted
        if isinstance(wanted, str) and wanted.upper() in present:
            mod = wanted.upper()
        else:
            raise FairseqImportError(
                f"{where}: a multi-modal data2vec_multi model ({', '.join(present)}); "
                "this library loads one modality at a time and the checkpoint names none"
            )
    if mod not in _MULTI_PRESETS:
        raise FairseqImportError(f"{where}: unknown data2vec_multi modality {mod!r}")
    modality = _MULTI_PRESETS[mod]
    m = f"modality_encoders.{mod}."
    mmeta = get(meta, "modalities", modality, default={})
    # Other modalities' encoders are not used by this one.
    for k in list(src.sd):
        if k.startswith("modality_encoders.") and not k.startswith(m):
            src.used.add(k)
    if get(meta, "layer_norm_first") is True or src.has("norm.weight"):
        raise FairseqImportError(
            f"{where}: pre-LN data2vec_multi (layer_norm_first=True) is not supported: fairseq's pre-LN AltBlock "
            "drops the FFN residual, which this library does not reproduce"
        )
    out: dict[str, Tensor] = {}
    depth = src.count("blocks.{}.")
    if depth == 0:
        raise FairseqImportError(f"{where}: no transformer blocks")
    for i in range(depth):
        alt_block(src, f"blocks.{i}.", f"encoder.blocks.{i}.", out)
    dim = int(out["encoder.blocks.0.norm1.weight"].shape[0])
    ffn = int(out["encoder.blocks.0.mlp.fc1.weight"].shape[0])
    prenet = src.count(m + "context_encoder.blocks.{}.")
    for i in range(prenet):
        alt_block(src, f"{m}context_encoder.blocks.{i}.", f"encoder.prenet.{i}.", out)
    input_norm = src.has(m + "context_encoder.norm.weight")
    if input_norm:
        for p in ("weight", "bias"):
            out[f"encoder.input_norm.{p}"] = src.take(f"{m}context_encoder.norm.{p}")
    if src.has(m + "extra_tokens"):
        extra = src.take(m + "extra_tokens")
        if extra.shape[1] != 1:
            raise FairseqImportError(f"{where}: {extra.shape[1]} extra tokens; only one (CLS) is supported")
        out["frontend.context.prefix"] = extra
    heads = num_heads(meta, [("num_heads",)], dim)
    position_bias: Literal["none", "shared", "per_layer"] = "none"
    alibi = False
    if src.has(m + "alibi_scale"):
        if modality != "audio":
            raise FairseqImportError(f"{where}: ALiBi for {modality} is not supported (only for speech)")
        alibi = True
        scale = src.take(m + "alibi_scale")  # (1 or layers, 1, heads or 1, 1, 1)
        if scale.dim() == 4:
            scale = scale.unsqueeze(0)
        per_layer = scale.shape[0]
        position_bias = "shared" if per_layer == 1 else "per_layer"
        values = scale.reshape(per_layer, -1).float()
        values = values.expand(per_layer, heads) if values.shape[1] == 1 else values
        if per_layer == 1:
            out["encoder.position_bias.scale"] = values[0].clone()
        else:
            if per_layer != prenet + depth:
                raise FairseqImportError(f"{where}: {per_layer} ALiBi scales for {prenet + depth} blocks")
            for i in range(per_layer):
                name = f"encoder.prenet.{i}" if i < prenet else f"encoder.blocks.{i - prenet}"
                out[f"{name}.position_bias.scale"] = values[i].clone()
    if src.has(m + "alibi_bias"):
        raise FairseqImportError(f"{where}: learned ALiBi bias tables are not supported")

    base = preset(f"{modality}-{'large' if dim >= 1024 else 'base'}", 2)
    frontend, frontend_ignored = FRONTENDS[modality](_Local(src, m, mmeta, dim, alibi, base, out, where))
    ignored_patterns = [r"^_ema", r"^modality_encoders\.[A-Z]+\.decoder\.", r"^shared_decoder\.", r"^recon_proj\."]
    ignored_patterns += frontend_ignored
    if src.has(m + "decoder.input_proj.weight"):
        raise FairseqImportError(f"{where}: transformer decoders are not supported (only the conv decoder)")
    decoder = conv_decoder(src, m + "decoder.", dim, get(mmeta, "decoder"), base.model.decoder, out)
    if decoder is not None:
        decoder = replace(decoder, mask_noise_std=num(get(mmeta, "mask_noise_std"), decoder.mask_noise_std))
    ignored = check_rest(src, ignored_patterns)

    default_eps = 1e-6 if modality == "image" else 1e-5

    def make() -> RunConfig:
        e = base.model.encoder
        enc = replace(
            e,
            dim=dim,
            depth=depth,
            prenet_depth=prenet,
            num_heads=heads,
            mlp_ratio=ffn / dim,
            norm_order="post",
            norm_eps=num(get(meta, "norm_eps"), default_eps),
            qkv_bias="all",
            layer_scale_init=0.0,
            position_bias=position_bias,
            input_norm=input_norm,
            final_norm=False,
            dropout=num(get(meta, "encoder_dropout"), e.dropout),
            attn_dropout=num(get(meta, "attention_dropout"), e.attn_dropout),
            activation_dropout=num(get(meta, "activation_dropout"), e.activation_dropout),
            drop_path=num(get(meta, "end_drop_path_rate"), e.drop_path),
            layerdrop=num(get(meta, "layerdrop"), e.layerdrop),
        )
        model = replace(base.model, encoder=enc, decoder=decoder or base.model.decoder)
        frontend_cfg: dict[str, Any] = {modality: frontend}
        model = replace(model, **frontend_cfg)
        masking = base.masking
        mlen = get(mmeta, "mask_length")
        masking = replace(
            masking,
            mask_prob=num(get(mmeta, "mask_prob"), masking.mask_prob),
            mask_length=int(mlen) if isinstance(mlen, int) and modality != "text" else masking.mask_length,
            mask_prob_adjust=num(get(mmeta, "mask_prob_adjust"), masking.mask_prob_adjust),
            num_masks=int(get(meta, "clone_batch", default=masking.num_masks)),
        )
        objective = objective_v1_v2(base, meta, depth)
        teacher = objective["teacher"]
        if get(meta, "ema_encoder_only") is True:
            teacher = replace(teacher, ema_scope="encoder")
        elif get(meta, "ema_encoder_only") is False:
            local = get(mmeta, "ema_local_encoder")
            teacher = replace(teacher, ema_scope="local" if local is True else "context")
        objective["teacher"] = teacher
        data = base.data
        if isinstance(frontend, TextConfig):
            data = replace(data, text=replace(data.text, block_size=min(data.text.block_size, frontend.max_positions)))
        if isinstance(frontend, ImageConfig) and frontend.channels == 1:
            data = replace(data, mean=(0.5,), std=(0.5,))
        return replace(base, model=model, masking=masking, data=data, **objective)

    cfg = build_config(where, make)
    return Converted(cfg, out, f"data2vec_multi ({modality})", ignored)
