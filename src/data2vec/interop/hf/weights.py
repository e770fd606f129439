"""Weight names between transformers' data2vec 1.0 models and ours, both ways: the one-to-one pairs
of backbone keys (per block from the `LAYER_NAMES` and `QKV_NAMES` tables), the q/k/v split and
merge, the CLS/position/mask-token folding, legacy LayerNorm names and the backbone/head split.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from data2vec.config import EncoderConfig, ModelConfig
from data2vec.interop.common import InteropError
from data2vec.interop.hf.tables import BACKBONE, IGNORED, PREFIX
from data2vec.model import Data2Vec
from data2vec.nn.pos import sincos_2d

_BERT_LAYER = (
    ("norm1", "attention.output.LayerNorm"),
    ("norm2", "output.LayerNorm"),
    ("attn.proj", "attention.output.dense"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
)
LAYER_NAMES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "image": (
        "encoder.layer.{}.",
        (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), *_BERT_LAYER[2:]),
    ),
    "audio": (
        "encoder.layers.{}.",
        (
            ("norm1", "layer_norm"),
            ("norm2", "final_layer_norm"),
            ("attn.proj", "attention.out_proj"),
            ("mlp.fc1", "feed_forward.intermediate_dense"),
            ("mlp.fc2", "feed_forward.output_dense"),
        ),
    ),
    "text": ("encoder.layer.{}.", _BERT_LAYER),
}
"""Per modality: transformers' prefix of block i, and (ours, theirs) module names with a weight and a bias."""

QKV_NAMES: dict[str, tuple[str, tuple[str, str, str], bool]] = {
    "image": ("encoder.layer.{}.attention.attention.", ("query", "key", "value"), False),
    "audio": ("encoder.layers.{}.attention.", ("q_proj", "k_proj", "v_proj"), True),
    "text": ("encoder.layer.{}.attention.self.", ("query", "key", "value"), True),
}
"""Per modality: transformers' prefix of block i's q/k/v projections, their names, and whether all
three have a bias (BEiT has q and v biases only, mapped separately)."""


def layer_pairs(modality: str, enc: EncoderConfig, i: int) -> Iterator[tuple[str, str]]:
    """(our key, transformers key) for block i, for the weights that map one to one."""
    o = f"encoder.blocks.{i}."
    prefix, names = LAYER_NAMES[modality]
    h = prefix.format(i)
    if modality == "image":
        yield o + "attn.q_bias", h + "attention.attention.query.bias"
        yield o + "attn.v_bias", h + "attention.attention.value.bias"
        if enc.layer_scale_init > 0:
            yield o + "gamma1", h + "lambda_1"
            yield o + "gamma2", h + "lambda_2"
        if enc.position_bias in ("per_layer", "both"):
            yield (
                o + "position_bias.table",
                h + "attention.attention.relative_position_bias.relative_position_bias_table",
            )
    for ours, theirs in names:
        for p in ("weight", "bias"):
            yield f"{o}{ours}.{p}", f"{h}{theirs}.{p}"


def qkv_names(modality: str, i: int) -> tuple[list[str], list[str] | None]:
    """transformers' q, k, v weight names (and bias names, None for BEiT's q/v-only bias) of block i."""
    prefix, names, biases = QKV_NAMES[modality]
    base = prefix.format(i)
    return [base + n + ".weight" for n in names], [base + n + ".bias" for n in names] if biases else None


def backbone_pairs(model: ModelConfig) -> list[tuple[str, str]]:
    """Every one-to-one (our key, transformers key) pair of the backbone."""
    enc = model.encoder
    pairs: list[tuple[str, str]] = []
    if model.modality == "image":
        pairs += [
            ("frontend.local.proj.weight", "embeddings.patch_embeddings.projection.weight"),
            ("frontend.local.proj.bias", "embeddings.patch_embeddings.projection.bias"),
        ]
        if enc.position_bias in ("shared", "both"):
            pairs.append(("encoder.position_bias.table", "encoder.relative_position_bias.relative_position_bias_table"))
        if enc.final_norm:
            pairs += [("encoder.final_norm.weight", "layernorm.weight"), ("encoder.final_norm.bias", "layernorm.bias")]
    elif model.modality == "audio":
        for j in range(len(model.audio.conv_layers)):
            o, h = f"frontend.local.cnn.layers.{j}.", f"feature_extractor.conv_layers.{j}."
            pairs.append((o + "0.weight", h + "conv.weight"))
            if model.audio.conv_bias:
                pairs.append((o + "0.bias", h + "conv.bias"))
            pairs += [(o + "1.norm.weight", h + "layer_norm.weight"), (o + "1.norm.bias", h + "layer_norm.bias")]
        for p in ("weight", "bias"):
            pairs += [
                (f"frontend.local.norm.{p}", f"feature_projection.layer_norm.{p}"),
                (f"frontend.local.proj.{p}", f"feature_projection.projection.{p}"),
                (f"encoder.input_norm.{p}", f"encoder.layer_norm.{p}"),
            ]
            pairs += [
                (f"frontend.context.positional.convs.{j}.{p}", f"encoder.pos_conv_embed.layers.{j}.conv.{p}")
                for j in range(model.audio.pos_conv_depth)
            ]
    else:
        pairs += [
            ("frontend.local.embed_tokens.weight", "embeddings.word_embeddings.weight"),
            ("frontend.local.embed_positions.weight", "embeddings.position_embeddings.weight"),
            ("frontend.local.layer_norm.weight", "embeddings.LayerNorm.weight"),
            ("frontend.local.layer_norm.bias", "embeddings.LayerNorm.bias"),
        ]
        if model.text.type_vocab_size > 0:
            pairs.append(("frontend.local.embed_types.weight", "embeddings.token_type_embeddings.weight"))
    for i in range(enc.depth):
        pairs += list(layer_pairs(model.modality, enc, i))
    return pairs


def _legacy_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Old BERT-style `LayerNorm.gamma/beta` names (transformers renames them on load too)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("LayerNorm.gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith("LayerNorm.beta"):
            k = k[: -len("beta")] + "bias"
        out[k] = v
    return out


def split_backbone(sd: dict[str, Tensor], modality: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(backbone weights without the `data2vec_*.` prefix, head weights without it)."""
    prefix = PREFIX[modality]
    backbone, head = {}, {}
    for k, v in _legacy_names(sd).items():
        if any(s in k for s in IGNORED):
            continue
        name = k[len(prefix) :] if k.startswith(prefix) else k
        if name.startswith(BACKBONE[modality]):
            if name.startswith("adapter."):
                raise InteropError("the checkpoint has adapter weights: the adapter is not supported")
            backbone[name] = v
        else:
            head[name] = v
    return backbone, head


def to_ours(theirs: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    src = dict(theirs)

    def take(key: str) -> Tensor:
        if key not in src:
            raise InteropError(f"the checkpoint lacks {key}, which its config implies")
        return src.pop(key)

    out = {ours: take(h) for ours, h in backbone_pairs(model)}
    mod = model.modality
    for i in range(model.encoder.depth):
        w_names, b_names = qkv_names(mod, i)
        out[f"encoder.blocks.{i}.attn.qkv.weight"] = torch.cat([take(n) for n in w_names])
        if b_names is not None:
            out[f"encoder.blocks.{i}.attn.qkv.bias"] = torch.cat([take(n) for n in b_names])
    if mod == "image":
        cls = take("embeddings.cls_token")
        if model.image.positions == "learned":
            pos = take("embeddings.position_embeddings")
            n = model.image.grid[0] * model.image.grid[1]
            if pos.shape[1] != n + 1:
                raise InteropError(f"position_embeddings has {pos.shape[1]} rows, expected {n + 1}")
            cls = cls + pos[:, :1]  # transformers adds position 0 to the CLS token: fold it in
            out["frontend.context.positional.table"] = pos[:, 1:]
        out["frontend.context.prefix"] = cls
        if "embeddings.mask_token" in src:
            out["frontend.context.mask_emb"] = take("embeddings.mask_token").reshape(-1)
    elif mod == "audio" and "masked_spec_embed" in src:
        out["frontend.context.mask_emb"] = take("masked_spec_embed")
    if src:
        extra = sorted(src)
        raise InteropError(f"backbone weights this config does not explain: {', '.join(extra[:8])}")
    return out


def to_theirs(model: Data2Vec, config: dict[str, Any]) -> dict[str, Tensor]:
    m = model.cfg
    sd = {k: v.detach() for k, v in model.student_state_dict().items() if not k.startswith("head.")}
    out = {h: sd[ours] for ours, h in backbone_pairs(m)}
    dim = m.encoder.dim
    for i in range(m.encoder.depth):
        w_names, b_names = qkv_names(m.modality, i)
        for n, part in zip(w_names, torch.split(sd[f"encoder.blocks.{i}.attn.qkv.weight"], dim), strict=True):
            out[n] = part
        if b_names is not None:
            for n, part in zip(b_names, torch.split(sd[f"encoder.blocks.{i}.attn.qkv.bias"], dim), strict=True):
                out[n] = part
    if m.modality == "image":
        out["embeddings.cls_token"] = sd["frontend.context.prefix"]
        if m.image.positions != "none":
            # learned table or fixed sin-cos: either way a (1, N, D) table added to the patches
            if m.image.positions == "learned":
                table = sd["frontend.context.positional.table"]
            else:  # the fixed sin-cos table, written as a learned one
                table = sincos_2d(dim, m.image.grid).unsqueeze(0)
            out["embeddings.position_embeddings"] = torch.cat([table.new_zeros(1, 1, dim), table], dim=1)
        if config["use_mask_token"]:
            out["embeddings.mask_token"] = sd["frontend.context.mask_emb"].reshape(1, 1, dim)
    elif m.modality == "audio":
        if config["mask_time_prob"] > 0 or config["mask_feature_prob"] > 0:
            out["masked_spec_embed"] = sd["frontend.context.mask_emb"]
    elif m.text.type_vocab_size == 0:
        out["embeddings.token_type_embeddings.weight"] = sd["frontend.local.embed_tokens.weight"].new_zeros(1, dim)
    return out
