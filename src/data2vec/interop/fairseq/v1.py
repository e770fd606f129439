"""data2vec 1.0 speech and text checkpoints (fairseq `data2vec_audio`, also as the backbone of a
fine-tuned `wav2vec_ctc`, and `data2vec_text`, RoBERTa layout): their tensors in our key names
and their `cfg`/`args` fields as our RunConfig around the official 1.0 preset.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from data2vec.config import RunConfig, TextConfig
from data2vec.interop.fairseq.common import (
    WB,
    Converted,
    FairseqImportError,
    Source,
    build_config,
    check_rest,
    first,
    get,
    num,
    num_heads,
)
from data2vec.interop.fairseq.parts import (
    audio_config,
    audio_local,
    objective_v1_v2,
    pos_convs,
    text_embeddings,
    v1_layer,
)
from data2vec.presets import preset


def convert_audio_v1(src: Source, meta: Any, task: Any, where: str) -> Converted:
    """A fairseq `data2vec_audio` model (`task` is not read)."""
    out: dict[str, Tensor] = {}
    conv, conv_bias = audio_local(
        src, "feature_extractor.", get(meta, "conv_feature_layers"), "layer_norm", "post_extract_proj", out, where
    )
    dim = int(out["frontend.local.proj.weight"].shape[0])
    if src.has("mask_emb"):
        out["frontend.context.mask_emb"] = src.take("mask_emb").reshape(-1)
    if src.has("encoder.pos_conv.0.weight_g") or src.has("encoder.pos_conv.0.weight_v"):
        raise FairseqImportError(
            f"{where}: a single weight-normed positional conv (wav2vec 2.0 style, pos_conv_depth=1) is not "
            "supported; data2vec uses a stack of plain convs"
        )
    pos = pos_convs(src, "encoder.pos_conv.", 0, out, dim)
    if get(meta, "layer_norm_first") is True:
        raise FairseqImportError(f"{where}: pre-LN (layer_norm_first=True) speech encoders are not supported")
    src.take_into(out, [("encoder.input_norm", "encoder.layer_norm")])
    depth = src.count("encoder.layers.{}.")
    for i in range(depth):
        v1_layer(src, f"encoder.layers.{i}.", f"encoder.blocks.{i}.", out)
    head_key = "final_proj." if src.has("final_proj.weight") else "final_proj.0."
    has_head = src.has(head_key + "weight")
    if has_head:
        for p in WB:
            out[f"head.{p}"] = src.take(head_key + p)
    ignored = check_rest(src, [r"^_ema", r"^w2v_encoder\.proj\.", r"^encoder\.version$"])

    heads = num_heads(meta, [("encoder_attention_heads",)], dim)
    ffn = int(out["encoder.blocks.0.mlp.fc1.weight"].shape[0]) if depth else 4 * dim
    base = preset("audio-base", 1)

    def make() -> RunConfig:
        enc = replace(
            base.model.encoder,
            dim=dim,
            depth=depth,
            num_heads=heads,
            mlp_ratio=ffn / dim,
            norm_eps=1e-5,
            dropout=num(get(meta, "dropout"), base.model.encoder.dropout),
            attn_dropout=num(get(meta, "attention_dropout"), base.model.encoder.attn_dropout),
            activation_dropout=num(get(meta, "activation_dropout"), base.model.encoder.activation_dropout),
            layerdrop=num(get(meta, "encoder_layerdrop"), base.model.encoder.layerdrop),
        )
        audio = audio_config(conv, conv_bias, pos, alibi=False)
        model = replace(base.model, encoder=enc, audio=audio, head_layers=1)
        masking = replace(
            base.masking,
            mask_prob=num(get(meta, "mask_prob"), base.masking.mask_prob),
            mask_length=int(get(meta, "mask_length", default=base.masking.mask_length)),
        )
        return replace(base, model=model, masking=masking, **objective_v1_v2(base, meta, depth))

    cfg = build_config(where, make)
    return Converted(cfg, out, "data2vec_audio", ignored)


def convert_text_v1(src: Source, meta: Any, task: Any, where: str) -> Converted:
    """A fairseq `data2vec_text` model; `task` holds the masking settings."""
    # Older checkpoints: decoder.* for encoder.*, emb_layer_norm for layernorm_embedding.
    renamed = {}
    for k, v in src.sd.items():
        nk = "encoder." + k[len("decoder.") :] if k.startswith("decoder.") else k
        renamed[nk.replace(".emb_layer_norm.", ".layernorm_embedding.")] = v
    src.sd = renamed
    s = "encoder.sentence_encoder."
    out: dict[str, Tensor] = {}
    text_embeddings(src, s, out, where, "sinusoidal positions are not supported")
    if src.has(s + "layer_norm.weight"):
        raise FairseqImportError(f"{where}: pre-LN text encoders (normalize_before=True) are not supported")
    no_scale = first(meta, [("transformer", "no_scale_embedding"), ("no_scale_embedding",)], default=True)
    if no_scale is False:
        raise FairseqImportError(f"{where}: scaled token embeddings (no_scale_embedding=False) are not supported")
    depth = src.count(s + "layers.{}.")
    for i in range(depth):
        v1_layer(src, f"{s}layers.{i}.", f"encoder.blocks.{i}.", out)
    head_prefix = "encoder.regression_head."
    if not src.has(head_prefix + "0.weight") and src.has("encoder.lm_head.0.weight"):
        head_prefix = "encoder.lm_head."  # older name of the regression head
    # Linear (head_layers=1) or Linear-GELU-Linear (2): weights at Sequential indices [0] or [0, 2].
    head_idx = [i for i in range(7) if src.has(f"{head_prefix}{i}.weight")]
    head_layers = 2 if head_idx == [0, 2] else 1
    if head_idx and head_idx not in ([0], [0, 2]):
        raise FairseqImportError(f"{where}: a regression head with layers {head_idx} is not supported")
    if head_idx == [0]:
        src.take_into(out, [("head", "0")], head_prefix)
    elif head_idx == [0, 2]:
        src.take_into(out, [("0", "0"), ("2", "2")], head_prefix, "head.")
    if not head_idx:
        head_layers = int(get(meta, "head_layers", default=2))
    ignored = check_rest(
        src,
        [
            r"^encoder\._ema",
            r"\.version$",
            r"_float_tensor$",
            r"^encoder\.lm_head\.",
            r"^encoder\.emb_head\.",
            r"^classification_heads\.",
            r"^encoder\.target_model\.",
        ],
    )
    vocab, dim = out["frontend.local.embed_tokens.weight"].shape
    pos_rows = int(out["frontend.local.embed_positions.weight"].shape[0])
    heads = num_heads(meta, [("transformer", "encoder", "attention_heads"), ("encoder_attention_heads",)], dim)
    ffn = int(out["encoder.blocks.0.mlp.fc1.weight"].shape[0]) if depth else 4 * dim
    base = preset("text-base", 1)
    pad = 1

    def make() -> RunConfig:
        e = base.model.encoder
        enc = replace(
            e,
            dim=int(dim),
            depth=depth,
            num_heads=heads,
            mlp_ratio=ffn / dim,
            norm_eps=1e-5,
            dropout=num(first(meta, [("transformer", "dropout"), ("dropout",)]), e.dropout),
            attn_dropout=num(
                first(meta, [("transformer", "attention_dropout"), ("attention_dropout",)]), e.attn_dropout
            ),
            activation_dropout=num(
                first(meta, [("transformer", "activation_dropout"), ("activation_dropout",)]), e.activation_dropout
            ),
            layerdrop=num(first(meta, [("transformer", "encoder", "layerdrop"), ("encoder_layerdrop",)]), e.layerdrop),
        )
        text = TextConfig(
            vocab_size=int(vocab),
            max_positions=pos_rows - pad - 1,
            pad_id=pad,
            bos_id=0,
            eos_id=2,
            unk_id=3,
            mask_id=int(vocab) - 1,
            embed_dropout=enc.dropout,
        )
        model = replace(base.model, encoder=enc, text=text, head_layers=head_layers)
        masking = base.masking
        mult = get(task, "mask_multiple_length")
        if isinstance(mult, int):
            masking = replace(
                masking,
                kind="span" if mult > 1 else "bert",
                mask_length=max(1, mult),
                mask_prob=num(get(task, "mask_prob"), masking.mask_prob),
                random_token_prob=num(get(task, "random_token_prob"), masking.random_token_prob),
                leave_unmasked_prob=num(get(task, "leave_unmasked_prob"), masking.leave_unmasked_prob),
            )
        data = replace(
            base.data, text=replace(base.data.text, block_size=min(base.data.text.block_size, text.max_positions))
        )
        return replace(base, model=model, masking=masking, data=data, **objective_v1_v2(base, meta, depth))

    cfg = build_config(where, make)
    return Converted(cfg, out, "data2vec_text", ignored)
