"""data2vec 1.0 image checkpoints (`data2vec_vision`, the BEiT code base: `{"model": ..., "args": ...}`):
their tensors in our key names and their `args` as our RunConfig around the official 1.0 preset.
"""

from __future__ import annotations

import ast
import math
from dataclasses import replace
from typing import Any, Literal

from torch import Tensor

from data2vec.config import ImageConfig, RunConfig
from data2vec.interop.fairseq.common import Converted, Source, build_config, check_rest, get, num
from data2vec.presets import preset

BLOCK = tuple((n, n) for n in ("attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2"))
"""(ours, BEiT's) module names in a block besides attention's qkv, biases and tables."""


def convert_vision_v1(src: Source, meta: Any, task: Any, where: str) -> Converted:
    """A data2vec_vision (BEiT) model (`task` is not read)."""
    out: dict[str, Tensor] = {}
    w = src.take("patch_embed.proj.weight")
    dim, channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    out["frontend.local.proj.weight"] = w
    out["frontend.local.proj.bias"] = src.take("patch_embed.proj.bias")
    cls = src.take("cls_token")
    learned_pos = src.has("pos_embed")
    if learned_pos:  # (1, 1 + N, D): the CLS slot folds into the CLS token, the rest is the patch table
        pos = src.take("pos_embed")
        cls = cls + pos[:, :1]
        out["frontend.context.positional.table"] = pos[:, 1:]
    out["frontend.context.prefix"] = cls
    if src.has("mask_token"):
        out["frontend.context.mask_emb"] = src.take("mask_token").reshape(-1)
    shared = src.has("rel_pos_bias.relative_position_bias_table")
    per_layer = src.has("blocks.0.attn.relative_position_bias_table")
    table: Tensor | None = None
    if shared:
        table = src.take("rel_pos_bias.relative_position_bias_table")
        out["encoder.position_bias.table"] = table
    depth = src.count("blocks.{}.")
    qkv_bias: Literal["qv", "none"] = "qv" if src.has("blocks.0.attn.q_bias") else "none"
    layer_scale = src.has("blocks.0.gamma_1")
    for i in range(depth):
        s, d = f"blocks.{i}.", f"encoder.blocks.{i}."
        out[d + "attn.qkv.weight"] = src.take(s + "attn.qkv.weight")
        if qkv_bias == "qv":
            out[d + "attn.q_bias"] = src.take(s + "attn.q_bias")
            out[d + "attn.v_bias"] = src.take(s + "attn.v_bias")
        if per_layer:
            t = src.take(s + "attn.relative_position_bias_table")
            out[d + "position_bias.table"] = t
            table = t if table is None else table
        if layer_scale:
            out[d + "gamma1"] = src.take(s + "gamma_1")
            out[d + "gamma2"] = src.take(s + "gamma_2")
        src.take_into(out, BLOCK, s, d)
    final_norm = src.has("norm.weight")
    if final_norm:
        src.take_into(out, [("encoder.final_norm", "norm")])
    if src.has("lm_head.weight"):
        src.take_into(out, [("head", "lm_head")])
    ignored = check_rest(src, [r"relative_position_index$", r"^fc_norm\.", r"^head\.", r"^lm_head\."])

    heads = int(table.shape[1]) if table is not None else None
    position_bias: Literal["none", "shared", "per_layer", "both"] = "none"
    if shared or per_layer:
        position_bias = "both" if shared and per_layer else ("shared" if shared else "per_layer")
    size = get(meta, "input_size")
    if not isinstance(size, int) and learned_pos:
        size = math.isqrt(int(out["frontend.context.positional.table"].shape[1])) * patch
    if not isinstance(size, int):
        size = 224
        if table is not None:  # (2h-1)^2 + 3 rows for a square grid
            side = (math.isqrt(int(table.shape[0]) - 3) + 1) // 2
            size = side * patch
    model_name = str(get(meta, "model", default=""))
    if heads is None:
        heads = 16 if ("large" in model_name or "huge" in model_name) else max(1, dim // 64)
    ffn = int(out["encoder.blocks.0.mlp.fc1.weight"].shape[0]) if depth else 4 * dim
    base = preset("image-large" if dim >= 1024 else "image-base", 1)

    def make() -> RunConfig:
        e = base.model.encoder
        ls = num(get(meta, "layer_scale_init_value"), 0.0)
        enc = replace(
            e,
            dim=dim,
            depth=depth,
            num_heads=heads,
            mlp_ratio=ffn / dim,
            norm_eps=1e-6,
            qkv_bias=qkv_bias,
            layer_scale_init=(ls if ls > 0 else 0.1) if layer_scale else 0.0,
            position_bias=position_bias,
            final_norm=final_norm,
            drop_path=num(get(meta, "drop_path"), e.drop_path),
            attn_dropout=num(get(meta, "attn_drop_rate"), e.attn_dropout),
        )
        image = ImageConfig(
            image_size=(size, size),
            patch_size=patch,
            channels=channels,
            positions="learned" if learned_pos else "none",
            cls_token=True,
        )
        model = replace(base.model, encoder=enc, image=image, head_layers=1)
        targets = base.targets
        layers_spec = get(meta, "target_layers")
        if isinstance(layers_spec, str):
            try:
                tl = ast.literal_eval(layers_spec)
            except (ValueError, SyntaxError):
                tl = []
            if isinstance(tl, list) and tl:
                targets = replace(targets, top_k=len(tl))
        if get(meta, "post_target_layer_norm") is False:
            targets = replace(targets, final_norm="none")
        targets = replace(targets, top_k=max(1, min(targets.top_k, depth)))
        loss = base.loss
        beta = get(meta, "l1_beta")
        if isinstance(beta, (int, float)) and get(meta, "l2_loss") is not True:
            loss = replace(loss, beta=float(beta))
        teacher = base.teacher
        decay = get(meta, "ema_decay")
        if isinstance(decay, float):
            teacher = replace(teacher, decay=decay, end_decay=decay, anneal_steps=0)
        masking = base.masking
        n_mask = get(meta, "num_mask_patches")
        grid = (size // patch) ** 2
        if isinstance(n_mask, int) and 0 < n_mask < grid:
            masking = replace(masking, mask_prob=n_mask / grid)
        data = base.data
        if channels == 1:
            data = replace(data, mean=(0.5,), std=(0.5,))
        return replace(base, model=model, targets=targets, loss=loss, teacher=teacher, masking=masking, data=data)

    cfg = build_config(where, make)
    return Converted(cfg, out, "data2vec_vision", ignored)
