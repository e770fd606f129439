"""Pieces the fairseq converters share: mapping the tensors of one layer kind to our names (a 1.0
post-LN Transformer layer, a 2.0 AltBlock, the wav2vec 2.0 CNN and positional convs, the text
embeddings, a 2.0 conv decoder) and translating fairseq's data2vec objective fields (targets,
loss, EMA teacher) into our config. `parse_layer_spec` reads a conv spec without evaluating it.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from data2vec.config import AudioConfig, DecoderConfig, NormKind, RunConfig
from data2vec.interop.fairseq.common import WB, FairseqImportError, Source, get, num


def parse_layer_spec(spec: str) -> list[tuple[int, int, int]]:
    """A fairseq conv spec such as "[(512, 10, 5)] + [(512, 3, 2)] * 4": list/tuple literals of
    integers combined with + and *; parsed as a syntax tree, never evaluated."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"unsupported element {ast.dump(node)[:60]}")

    try:
        value = ev(ast.parse(spec, mode="eval").body)
        layers = [tuple(int(v) for v in t) for t in value]
    except (SyntaxError, ValueError, TypeError) as e:
        raise FairseqImportError(f"conv layer spec {spec!r}: not a list of (dim, kernel, stride) ({e})") from None
    if not layers or any(len(t) != 3 for t in layers):
        raise FairseqImportError(f"conv layer spec {spec!r}: not a list of (dim, kernel, stride)")
    return [(t[0], t[1], t[2]) for t in layers]


WAV2VEC_CNN = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
"""The wav2vec 2.0 feature extractor (channels, kernel, stride) per layer."""


V1_LAYER = (
    ("attn.proj", "self_attn.out_proj"),
    ("norm1", "self_attn_layer_norm"),
    ("mlp.fc1", "fc1"),
    ("mlp.fc2", "fc2"),
    ("norm2", "final_layer_norm"),
)
"""(ours, fairseq's) module names in a 1.0 Transformer layer besides the q/k/v projections."""


def v1_layer(src: Source, s: str, d: str, out: dict[str, Tensor]) -> None:
    """A fairseq post-LN Transformer layer (separate q/k/v projections) -> our Block."""
    a = f"{s}self_attn."
    out[f"{d}attn.qkv.weight"] = torch.cat([src.take(f"{a}{p}_proj.weight") for p in "qkv"])
    out[f"{d}attn.qkv.bias"] = torch.cat([src.take(f"{a}{p}_proj.bias") for p in "qkv"])
    src.take_into(out, V1_LAYER, s, d)


def alt_block(src: Source, s: str, d: str, out: dict[str, Tensor]) -> None:
    """A data2vec 2.0 AltBlock: the same module names as ours."""
    for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
        for p in WB:
            if src.has(f"{s}{name}.{p}"):
                out[f"{d}{name}.{p}"] = src.take(f"{s}{name}.{p}")


def cnn(src: Source, s: str, out: dict[str, Tensor], where: str) -> tuple[list[tuple[int, int]], bool]:
    """wav2vec 2.0 CNN in layer-norm mode -> ours; returns (channels, kernel) per layer and conv_bias."""
    n = src.count(s + "conv_layers.{}.")
    if n == 0:
        raise FairseqImportError(f"{where}: no feature-extractor conv layers under {s}conv_layers")
    if not src.has(f"{s}conv_layers.0.2.1.weight"):
        raise FairseqImportError(
            f"{where}: the feature extractor is not in layer-norm mode (extractor_mode='default', a single "
            "GroupNorm); this library implements the layer-norm CNN that data2vec uses"
        )
    shapes = []
    bias = src.has(f"{s}conv_layers.0.0.bias")
    for i in range(n):
        w = src.take(f"{s}conv_layers.{i}.0.weight")
        out[f"frontend.local.cnn.layers.{i}.0.weight"] = w
        if bias:
            out[f"frontend.local.cnn.layers.{i}.0.bias"] = src.take(f"{s}conv_layers.{i}.0.bias")
        src.take_into(out, [("1.norm", "2.1")], f"{s}conv_layers.{i}.", f"frontend.local.cnn.layers.{i}.")
        shapes.append((int(w.shape[0]), int(w.shape[-1])))
    return shapes, bias


def conv_layers(spec: Any, shapes: list[tuple[int, int]], where: str) -> tuple[tuple[int, int, int], ...]:
    """(channels, kernel, stride) per CNN layer: strides from the checkpoint's spec when it has one,
    else the standard wav2vec 2.0 strides (their kernels must then match)."""
    if isinstance(spec, str):
        layers = parse_layer_spec(spec)
        if [(c, k) for c, k, _ in layers] != shapes:
            raise FairseqImportError(f"{where}: conv spec {spec!r} does not match the weights {shapes}")
        return tuple(layers)
    if [k for _, k in shapes] == [k for _, k, _ in WAV2VEC_CNN]:
        return tuple((c, k, s) for (c, k), (_, _, s) in zip(shapes, WAV2VEC_CNN, strict=True))
    raise FairseqImportError(
        f"{where}: the checkpoint has no conv_feature_layers / feature_encoder_spec and its kernels "
        f"{[k for _, k in shapes]} are not wav2vec 2.0's; the strides cannot be known"
    )


def pos_convs(src: Source, s: str, index_offset: int, out: dict[str, Tensor], dim: int) -> tuple[int, int, int]:
    """Convolutional positions: (depth, kernel, groups)."""
    depth = 0
    while src.has(f"{s}{depth + index_offset}.0.weight"):
        j = depth + index_offset
        w = src.take(f"{s}{j}.0.weight")
        out[f"frontend.context.positional.convs.{depth}.weight"] = w
        out[f"frontend.context.positional.convs.{depth}.bias"] = src.take(f"{s}{j}.0.bias")
        depth += 1
    if depth == 0:
        return 0, 19, 16
    w = out["frontend.context.positional.convs.0.weight"]
    return depth, int(w.shape[-1]), dim // int(w.shape[1])


def audio_local(
    src: Source, cnn_prefix: str, spec: Any, norm: str, proj: str, out: dict[str, Tensor], where: str
) -> tuple[tuple[tuple[int, int, int], ...], bool]:
    """The speech local encoder: the CNN (strides from `spec`) and the feature LayerNorm `norm` and
    projection `proj` (full checkpoint names); returns (conv layers, conv_bias)."""
    shapes, conv_bias = cnn(src, cnn_prefix, out, where)
    conv = conv_layers(spec, shapes, where)
    src.take_into(out, (("frontend.local.norm", norm), ("frontend.local.proj", proj)))
    return conv, conv_bias


def audio_config(
    conv: tuple[tuple[int, int, int], ...], conv_bias: bool, pos: tuple[int, int, int], alibi: bool
) -> AudioConfig:
    """Our speech front-end config from the CNN layers and the (depth, kernel, groups) of `pos_convs`."""
    depth, kernel, groups = pos
    return AudioConfig(
        conv_layers=conv,
        conv_bias=conv_bias,
        pos_conv_depth=depth,
        pos_conv_kernel=kernel,
        pos_conv_groups=groups,
        alibi=alibi,
    )


def text_embeddings(src: Source, s: str, out: dict[str, Tensor], where: str, no_positions: str) -> None:
    """Token and learned position embeddings and their LayerNorm under `s`; `no_positions` says what a
    checkpoint without learned positions uses that is not supported."""
    out["frontend.local.embed_tokens.weight"] = src.take(s + "embed_tokens.weight")
    if not src.has(s + "embed_positions.weight"):
        raise FairseqImportError(f"{where}: no learned position embedding ({no_positions})")
    out["frontend.local.embed_positions.weight"] = src.take(s + "embed_positions.weight")
    if not src.has(s + "layernorm_embedding.weight"):
        raise FairseqImportError(f"{where}: no embedding LayerNorm (layernorm_embedding=False is not supported)")
    src.take_into(out, [("frontend.local.layer_norm", "layernorm_embedding")], s)


def decoder(
    src: Source, s: str, dim: int, dec_meta: Any, fallback: DecoderConfig, out: dict[str, Tensor]
) -> DecoderConfig | None:
    """A 2.0 Decoder1d/Decoder2d -> `head.*` in `out`; None when the checkpoint has no decoder."""
    layers = src.count(s + "blocks.{}.")
    if layers == 0:
        return None
    w0 = src.sd[f"{s}blocks.0.0.weight"]
    dec_dim, kernel, groups = int(w0.shape[0]), int(w0.shape[-1]), dim // int(w0.shape[1])
    src.take_into(out, [(f"blocks.{i}.conv", f"blocks.{i}.0") for i in range(layers)], s, "head.")
    if src.has(f"{s}proj.weight"):
        projection_layers, ratio = 1, fallback.projection_ratio
        src.take_into(out, [("proj", "proj")], s, "head.")
    elif src.has(f"{s}proj.0.weight") and src.has(f"{s}proj.2.weight") and not src.has(f"{s}proj.4.weight"):
        projection_layers = 2
        ratio = src.sd[f"{s}proj.0.weight"].shape[0] / dec_dim
        src.take_into(out, [("proj.0", "proj.0"), ("proj.2", "proj.2")], s, "head.")
    else:
        raise FairseqImportError(f"{src.where}: decoder projection {s}proj has an unsupported layout")
    return DecoderConfig(
        dim=dec_dim,
        kernel_size=kernel,
        groups=groups,
        layers=layers,
        residual=bool(get(dec_meta, "decoder_residual", default=True)),
        projection_layers=projection_layers,
        projection_ratio=float(ratio),
        input_dropout=float(get(dec_meta, "input_dropout", default=fallback.input_dropout)),
        mask_noise_std=fallback.mask_noise_std,
    )


def _norm_kind(meta: Any, default: NormKind, *flags: tuple[str, NormKind]) -> NormKind:
    """The kind of the first of fairseq's boolean `flags` that is true; "none" if all are false;
    else (flags missing) `default`."""
    for key, kind in flags:
        if get(meta, key) is True:
            return kind
    if all(get(meta, key) is False for key, _ in flags):
        return "none"
    return default


def objective_v1_v2(base: RunConfig, meta: Any, depth: int) -> dict[str, Any]:
    """targets / loss / teacher from fairseq's data2vec fields (shared by 1.0 audio/text and 2.0)."""
    t = base.targets
    layer_norm = _norm_kind(
        meta, t.layer_norm, ("instance_norm_target_layer", "instance"), ("layer_norm_target_layer", "layer")
    )
    final_norm = _norm_kind(meta, t.final_norm, ("layer_norm_targets", "layer"), ("instance_norm_targets", "instance"))
    top_k = int(get(meta, "average_top_k_layers", default=t.top_k))
    targets = replace(
        t,
        top_k=max(1, min(top_k, depth)),
        layer_norm=layer_norm,
        final_norm=final_norm,
        layer_source="block" if get(meta, "end_of_block_targets") is True else "ffn",
    )
    loss = base.loss
    beta = get(meta, "loss_beta")
    if isinstance(beta, (int, float)):
        loss = replace(loss, beta=float(beta))
    scale = get(meta, "loss_scale")
    if "loss_scale" in (meta or {}):
        if scale is None:
            loss = replace(loss, scale="rsqrt_dim")
        elif num(scale, 0.0) == 1.0:
            loss = replace(loss, scale="one")
    teacher = base.teacher
    decay, end = get(meta, "ema_decay"), get(meta, "ema_end_decay")
    anneal = get(meta, "ema_anneal_end_step")
    teacher = replace(
        teacher,
        decay=num(decay, teacher.decay),
        end_decay=num(end, teacher.end_decay),
        anneal_steps=int(anneal) if isinstance(anneal, int) and anneal >= 0 else teacher.anneal_steps,
    )
    return {"targets": targets, "loss": loss, "teacher": teacher}


def teacher_copies(student: Mapping[str, Tensor], ema_scope: str) -> dict[str, Tensor]:
    """teacher.parts.* entries equal to the student's (the teacher starts as the student)."""
    parts = {"encoder.": "encoder."}
    if ema_scope in ("local", "context"):
        parts["frontend.context."] = "context."
    if ema_scope == "local":
        parts["frontend.local."] = "local."
    out = {}
    for k, v in student.items():
        for prefix, part in parts.items():
            if k.startswith(prefix):
                out[f"teacher.parts.{part}{k[len(prefix) :]}"] = v.detach().clone()
    return out
