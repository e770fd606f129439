"""fairseq / data2vec_vision checkpoint import.

Each test builds one of our tiny models with random weights, lays its state dict out the way
the official code names it (the inverse of the importer's mapping, written out here), adds a
`cfg`/`args` entry made of plain dicts or an argparse.Namespace, saves it with `torch.save`,
imports it with `load_fairseq` and checks that the imported model computes exactly what the
source model computes. Then the safety side: pickled code never runs, unknown globals are
refused by name, and configuration classes that are not importable here are read inertly.
"""

from __future__ import annotations

import argparse
import enum
import os
import re
import sys
import types
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import make_tiny_config
from tests.helpers import TINY_AUDIO_SHAPE
from torch import Tensor

from data2vec.config import RunConfig, apply_overrides
from data2vec.interop.fairseq import FairseqImportError, is_fairseq_checkpoint, load_fairseq, parse_layer_spec
from data2vec.model import Batch, Data2Vec
from data2vec.nn.pos import sincos_2d
from data2vec.presets import preset

# ----------------------------------------------------------------------------- helpers


def randomised(cfg: RunConfig, seed: int = 0) -> Data2Vec:
    """A model whose every parameter is random (zero-initialised tokens and tables included)."""
    torch.manual_seed(seed)
    model = Data2Vec.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("teacher."):
                p.normal_(0.0, 0.3)
        for name, part in model.student_parts().items():  # the teacher starts as the student
            model.teacher[name].load_state_dict(part.state_dict())
    return model


def student(model: Data2Vec) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.student_state_dict().items()}


def rename(sd: dict[str, Tensor], rules: list[tuple[str, str]]) -> dict[str, Tensor]:
    """Apply the first matching regex rule to each key (every key must match one)."""
    out: dict[str, Tensor] = OrderedDict()
    for k, v in sd.items():
        for pattern, repl in rules:
            if re.fullmatch(pattern, k):
                out[re.sub(pattern, repl, k)] = v
                break
        else:
            raise AssertionError(f"no rule for {k}")
    return out


def split_qkv(sd: dict[str, Tensor], block_re: str, attn_prefix: str) -> dict[str, Tensor]:
    """Our fused `attn.qkv` -> fairseq's q_proj / k_proj / v_proj (pre-rename keys)."""
    out: dict[str, Tensor] = OrderedDict()
    for k, v in sd.items():
        m = re.fullmatch(block_re + r"attn\.qkv\.(weight|bias)", k)
        if m is None:
            out[k] = v
            continue
        i, p = m.group(1), m.group(2)
        for name, part in zip("qkv", v.chunk(3, dim=0), strict=True):
            out[f"{attn_prefix.format(i)}{name}_proj.{p}"] = part.clone()
    return out


def save(path: Path, obj: Any) -> Path:
    torch.save(obj, path)
    return path


def assert_same_features(src: Data2Vec, dst: Data2Vec, inputs: Tensor, padding_mask: Tensor | None = None) -> None:
    with torch.no_grad():
        a = src.encode(inputs, padding_mask)
        b = dst.encode(inputs, padding_mask)
    assert torch.equal(a.x, b.x)
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.x, lb.x) and torch.equal(la.ffn_out, lb.ffn_out)


def assert_same_head(src: Data2Vec, dst: Data2Vec) -> None:
    D = src.cfg.encoder.dim
    h = torch.randn(2, src.num_tokens if src.frontend.decoder_2d else 12, D)
    with torch.no_grad():
        if src.cfg.version == 1:
            assert torch.equal(src.head(h[0]), dst.head(h[0]))
        else:
            assert torch.equal(src.head(h), dst.head(h))


def load_into_model(path: Path) -> tuple[RunConfig, Data2Vec, list[str]]:
    cfg, sd = load_fairseq(path)
    model = Data2Vec.from_config(cfg).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert unexpected == []
    return cfg, model, list(missing)


ARCH_FIELDS = (
    "dim",
    "depth",
    "prenet_depth",
    "num_heads",
    "mlp_ratio",
    "norm_order",
    "norm_eps",
    "qkv_bias",
    "position_bias",
    "input_norm",
    "final_norm",
    "layer_scale_init",
)


def assert_same_architecture(a: RunConfig, b: RunConfig) -> None:
    assert a.model.modality == b.model.modality and a.model.version == b.model.version
    for f in ARCH_FIELDS:
        if f == "layer_scale_init":
            assert (getattr(a.model.encoder, f) > 0) == (getattr(b.model.encoder, f) > 0), f
        else:
            assert getattr(a.model.encoder, f) == getattr(b.model.encoder, f), f
    mod = a.model.modality
    assert getattr(a.model, mod) == getattr(b.model, mod)


# ----------------------------------------------------------------------------- data2vec 1.0 audio

AUDIO_V1 = [
    "model.encoder.dim=32",
    "model.encoder.depth=2",
    "model.encoder.num_heads=2",
    "model.audio.conv_layers=[[16,10,5],[16,3,2],[16,3,2]]",
    "model.audio.pos_conv_depth=2",
    "model.audio.pos_conv_kernel=5",
    "model.audio.pos_conv_groups=4",
    "targets.top_k=2",
]

AUDIO_V1_RULES = [
    (r"frontend\.local\.cnn\.layers\.(\d+)\.0\.weight", r"feature_extractor.conv_layers.\1.0.weight"),
    (r"frontend\.local\.cnn\.layers\.(\d+)\.1\.norm\.(\w+)", r"feature_extractor.conv_layers.\1.2.1.\2"),
    (r"frontend\.local\.norm\.(\w+)", r"layer_norm.\1"),
    (r"frontend\.local\.proj\.(\w+)", r"post_extract_proj.\1"),
    (r"frontend\.context\.mask_emb", r"mask_emb"),
    (r"frontend\.context\.positional\.convs\.(\d+)\.(\w+)", r"encoder.pos_conv.\1.0.\2"),
    (r"encoder\.input_norm\.(\w+)", r"encoder.layer_norm.\1"),
    (r"(encoder\.layers\.\d+\.self_attn\.[qkv]_proj\.\w+)", r"\1"),
    (r"encoder\.blocks\.(\d+)\.attn\.proj\.(\w+)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (r"encoder\.blocks\.(\d+)\.norm1\.(\w+)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (r"encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.(\w+)", r"encoder.layers.\1.\2.\3"),
    (r"encoder\.blocks\.(\d+)\.norm2\.(\w+)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"head\.(\w+)", r"final_proj.\1"),
]


def audio_v1_checkpoint(tmp_path: Path, with_head: bool = True) -> tuple[RunConfig, Data2Vec, Path]:
    cfg = apply_overrides(preset("audio-tiny", 1), AUDIO_V1)
    model = randomised(cfg)
    sd = split_qkv(student(model), r"encoder\.blocks\.(\d+)\.", "encoder.layers.{}.self_attn.")
    sd = rename(sd, AUDIO_V1_RULES)
    if not with_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("final_proj")}
    sd["_ema"] = OrderedDict((k, v.clone()) for k, v in sd.items() if k.startswith("encoder."))  # type: ignore[assignment]
    meta = {
        "_name": "data2vec_audio",
        "extractor_mode": "layer_norm",
        "conv_feature_layers": "[(16, 10, 5)] + [(16, 3, 2)] * 2",
        "encoder_layers": 2,
        "encoder_embed_dim": 32,
        "encoder_attention_heads": 2,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "mask_prob": 0.65,
        "mask_length": 10,
        "average_top_k_layers": 2,
        "instance_norm_target_layer": True,
        "layer_norm_targets": False,
        "instance_norm_targets": False,
        "ema_decay": 0.999,
        "ema_end_decay": 0.9999,
        "ema_anneal_end_step": 30000,
        "loss_beta": 0,
        "loss_scale": None,
    }
    path = save(tmp_path / "audio_v1.pt", {"args": None, "cfg": {"model": meta, "task": {}}, "model": sd})
    return cfg, model, path


def test_audio_v1_imports_exactly(tmp_path: Path) -> None:
    src_cfg, src, path = audio_v1_checkpoint(tmp_path)
    assert is_fairseq_checkpoint(path)
    cfg, model, missing = load_into_model(path)
    assert missing == []
    assert_same_architecture(src_cfg, cfg)
    assert cfg.targets.top_k == 2 and cfg.targets.layer_norm == "instance" and cfg.teacher.anneal_steps == 30000
    wav = torch.randn(2, 4000)
    assert_same_features(src, model, wav)
    assert_same_head(src, model)
    # the teacher starts as the student
    for k, v in model.teacher_state_dict().items():
        assert torch.equal(v, model.state_dict()[k.replace("teacher.parts.encoder.", "encoder.")])


def test_audio_v1_without_head_leaves_only_the_head_fresh(tmp_path: Path) -> None:
    _, src, path = audio_v1_checkpoint(tmp_path, with_head=False)
    _, model, missing = load_into_model(path)
    assert sorted(missing) == ["head.bias", "head.weight"]
    assert_same_features(src, model, torch.randn(1, 3000))


def test_fine_tuned_speech_backbone_imports(tmp_path: Path) -> None:
    src_cfg, src, path = audio_v1_checkpoint(tmp_path, with_head=False)
    ck = torch.load(path, weights_only=True)
    sd = {f"w2v_encoder.w2v_model.{k}": v for k, v in ck["model"].items() if k != "_ema"}
    sd["w2v_encoder.proj.weight"] = torch.randn(5, 32)
    sd["w2v_encoder.proj.bias"] = torch.randn(5)
    meta = {"_name": "wav2vec_ctc", "w2v_args": {"model": ck["cfg"]["model"]}}
    path2 = save(tmp_path / "ctc.pt", {"cfg": {"model": meta}, "model": sd})
    assert is_fairseq_checkpoint(path2)
    cfg, model, missing = load_into_model(path2)
    assert sorted(missing) == ["head.bias", "head.weight"]
    assert_same_architecture(src_cfg, cfg)
    assert_same_features(src, model, torch.randn(1, 3000))


# ----------------------------------------------------------------------------- data2vec 1.0 text

TEXT_SHRINK = [
    "model.encoder.dim=32",
    "model.encoder.depth=2",
    "model.encoder.num_heads=2",
    "model.text.max_positions=32",
    "model.text.vocab_size=100",
    "model.text.mask_id=99",
    "data.text.block_size=32",
    "targets.top_k=2",
]

TEXT_V1_RULES = [
    (r"frontend\.local\.(embed_tokens|embed_positions)\.weight", r"encoder.sentence_encoder.\1.weight"),
    (r"frontend\.local\.layer_norm\.(\w+)", r"encoder.sentence_encoder.layernorm_embedding.\1"),
    (r"(encoder\.sentence_encoder\.layers\.\d+\.self_attn\.[qkv]_proj\.\w+)", r"\1"),
    (r"encoder\.blocks\.(\d+)\.attn\.proj\.(\w+)", r"encoder.sentence_encoder.layers.\1.self_attn.out_proj.\2"),
    (r"encoder\.blocks\.(\d+)\.norm1\.(\w+)", r"encoder.sentence_encoder.layers.\1.self_attn_layer_norm.\2"),
    (r"encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.(\w+)", r"encoder.sentence_encoder.layers.\1.\2.\3"),
    (r"encoder\.blocks\.(\d+)\.norm2\.(\w+)", r"encoder.sentence_encoder.layers.\1.final_layer_norm.\2"),
    (r"head\.([02])\.(\w+)", r"encoder.regression_head.\1.\2"),
]


def text_v1_checkpoint(tmp_path: Path, old_names: bool = False) -> tuple[RunConfig, Data2Vec, Path]:
    cfg = apply_overrides(preset("text-tiny", 1), TEXT_SHRINK)
    model = randomised(cfg)
    sd = split_qkv(student(model), r"encoder\.blocks\.(\d+)\.", "encoder.sentence_encoder.layers.{}.self_attn.")
    sd = rename(sd, TEXT_V1_RULES)
    sd["encoder.sentence_encoder.version"] = torch.tensor([3.0])
    sd["encoder.lm_head.dense.weight"] = torch.randn(32, 32)  # RoBERTa MLM head: not ours, ignored
    if old_names:  # fairseq's older names: decoder.* and emb_layer_norm
        sd = {
            k.replace("encoder.", "decoder.", 1).replace("layernorm_embedding", "emb_layer_norm"): v
            for k, v in sd.items()
        }
    meta = {
        "_name": "data2vec_text",
        "head_layers": 2,
        "transformer": {
            "dropout": 0.1,
            "attention_dropout": 0.1,
            "activation_dropout": 0.0,
            "no_scale_embedding": True,
            "layernorm_embedding": True,
            "encoder": {"embed_dim": 32, "ffn_embed_dim": 128, "layers": 2, "attention_heads": 2, "layerdrop": 0.0},
        },
        "average_top_k_layers": 2,
        "layer_norm_target_layer": True,
        "instance_norm_target_layer": False,
        "loss_beta": 4.0,
        "loss_scale": 1.0,
    }
    task = {"mask_prob": 0.35, "mask_multiple_length": 4, "random_token_prob": 0.0, "leave_unmasked_prob": 0.0}
    path = save(tmp_path / "text_v1.pt", {"args": None, "cfg": {"model": meta, "task": task}, "model": sd})
    return cfg, model, path


@pytest.mark.parametrize("old_names", [False, True])
def test_text_v1_imports_exactly(tmp_path: Path, old_names: bool) -> None:
    src_cfg, src, path = text_v1_checkpoint(tmp_path, old_names)
    assert is_fairseq_checkpoint(path)
    cfg, model, missing = load_into_model(path)
    assert missing == []
    assert_same_architecture(src_cfg, cfg)
    assert cfg.model.head_layers == 2 and cfg.loss.beta == 4.0 and cfg.loss.scale == "one"
    assert cfg.masking.kind == "span" and cfg.masking.mask_length == 4
    ids = torch.tensor([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]])
    assert_same_features(src, model, ids)
    assert_same_head(src, model)


# ----------------------------------------------------------------------------- data2vec 2.0


def alt_block_rules(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(rf"{ours}\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(\w+)", rf"{theirs}.\1.\2.\3")]


def decoder_rules(m: str) -> list[tuple[str, str]]:
    return [
        (r"head\.blocks\.(\d+)\.conv\.(\w+)", rf"{m}decoder.blocks.\1.0.\2"),
        (r"head\.proj\.(\w+)", rf"{m}decoder.proj.\1"),
        (r"head\.proj\.([02])\.(\w+)", rf"{m}decoder.proj.\1.\2"),
    ]


def multi_meta(cfg: RunConfig, modality: str, extra: dict[str, Any]) -> dict[str, Any]:
    e, d = cfg.model.encoder, cfg.model.decoder
    return {
        "_name": "data2vec_multi",
        "depth": e.depth,
        "num_heads": e.num_heads,
        "embed_dim": e.dim,
        "mlp_ratio": e.mlp_ratio,
        "norm_eps": e.norm_eps,
        "layer_norm_first": False,
        "encoder_dropout": e.dropout,
        "attention_dropout": e.attn_dropout,
        "activation_dropout": e.activation_dropout,
        "post_mlp_drop": e.dropout,
        "layerdrop": e.layerdrop,
        "end_drop_path_rate": e.drop_path,
        "average_top_k_layers": cfg.targets.top_k,
        "instance_norm_target_layer": True,
        "layer_norm_targets": True,
        "clone_batch": cfg.masking.num_masks,
        "ema_encoder_only": modality == "text",
        "supported_modality": modality.upper(),
        "modalities": {
            modality: {
                "prenet_depth": e.prenet_depth,
                "decoder": {
                    "decoder_dim": d.dim,
                    "decoder_kernel": d.kernel_size,
                    "decoder_groups": d.groups,
                    "decoder_layers": d.layers,
                    "decoder_residual": d.residual,
                    "projection_layers": d.projection_layers,
                    "projection_ratio": d.projection_ratio,
                    "input_dropout": d.input_dropout,
                },
                "mask_noise_std": d.mask_noise_std,
                "ema_local_encoder": modality == "image",
                **extra,
            }
        },
    }


def image_v2_checkpoint(tmp_path: Path) -> tuple[RunConfig, Data2Vec, Path]:
    cfg = make_tiny_config(2, model__encoder__prenet_depth=1)
    model = randomised(cfg)
    m = "modality_encoders.IMAGE."
    rules = [
        (r"frontend\.local\.proj\.(\w+)", rf"{m}local_encoder.proj.\1"),
        (r"frontend\.context\.prefix", rf"{m}extra_tokens"),
        (r"encoder\.input_norm\.(\w+)", rf"{m}context_encoder.norm.\1"),
        *alt_block_rules(r"encoder\.prenet", f"{m}context_encoder.blocks"),
        *alt_block_rules(r"encoder\.blocks", "blocks"),
        *decoder_rules(m),
    ]
    sd = rename(student(model), rules)
    grid = cfg.model.image.grid
    sd[f"{m}fixed_positional_encoder.positions"] = sincos_2d(cfg.model.encoder.dim, grid).unsqueeze(0)
    sd["_ema"] = OrderedDict(blocks=torch.zeros(1))  # type: ignore[assignment]
    meta = multi_meta(cfg, "image", {"input_size": 32, "patch_size": 8, "in_chans": 3, "num_extra_tokens": 1})
    path = save(tmp_path / "image_v2.pt", {"cfg": {"model": meta}, "model": sd})
    return cfg, model, path


def test_image_v2_imports_exactly(tmp_path: Path) -> None:
    src_cfg, src, path = image_v2_checkpoint(tmp_path)
    cfg, model, missing = load_into_model(path)
    assert missing == []
    assert_same_architecture(src_cfg, cfg)
    assert cfg.model.decoder == src_cfg.model.decoder
    assert cfg.teacher.ema_scope == "local" and cfg.targets.final_norm == "layer"
    images = torch.randn(2, 3, 32, 32)
    assert_same_features(src, model, images)
    assert_same_head(src, model)
    # the regression term of the pretraining objective too (teacher = student), same masks and noise
    mask = src.draw_masks(2, torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    a = src(Batch(images, mask)).metrics
    torch.manual_seed(1)
    b = model(Batch(images, mask)).metrics
    assert torch.equal(a["loss_reg"], b["loss_reg"]) and torch.equal(a["target_std"], b["target_std"])


AUDIO_V2 = [*TINY_AUDIO_SHAPE, "model.decoder.layers=2", "model.decoder.kernel_size=3", "targets.top_k=2"]


@pytest.mark.parametrize("per_layer_alibi", [False, True])
def test_audio_v2_imports_exactly(tmp_path: Path, per_layer_alibi: bool) -> None:
    extra = ["model.encoder.position_bias=per_layer", "model.encoder.prenet_depth=1"] if per_layer_alibi else []
    cfg = apply_overrides(preset("audio-tiny", 2), AUDIO_V2 + extra)
    src = randomised(cfg)
    m = "modality_encoders.AUDIO."
    rules = [
        (r"frontend\.local\.cnn\.layers\.(\d+)\.0\.weight", rf"{m}local_encoder.conv_layers.\1.0.weight"),
        (r"frontend\.local\.cnn\.layers\.(\d+)\.1\.norm\.(\w+)", rf"{m}local_encoder.conv_layers.\1.2.1.\2"),
        (r"frontend\.local\.norm\.(\w+)", rf"{m}project_features.1.\1"),
        (r"frontend\.local\.proj\.(\w+)", rf"{m}project_features.2.\1"),
        (r"encoder\.input_norm\.(\w+)", rf"{m}context_encoder.norm.\1"),
        *alt_block_rules(r"encoder\.prenet", f"{m}context_encoder.blocks"),
        *alt_block_rules(r"encoder\.blocks", "blocks"),
        *decoder_rules(m),
    ]
    sd = student(src)
    convs = {k: v for k, v in sd.items() if k.startswith("frontend.context.positional.convs.")}
    scales = {k: v for k, v in sd.items() if k.endswith("position_bias.scale")}
    sd = rename({k: v for k, v in sd.items() if k not in convs and k not in scales}, rules)
    for k, v in convs.items():  # Sequential(TransposeLast, block_1, ..., block_n, TransposeLast)
        j, p = k.split(".")[-2:]
        sd[f"{m}relative_positional_encoder.{int(j) + 1}.0.{p}"] = v
    if per_layer_alibi:
        order = [f"encoder.prenet.{i}.position_bias.scale" for i in range(1)]
        order += [f"encoder.blocks.{i}.position_bias.scale" for i in range(2)]
        sd[f"{m}alibi_scale"] = torch.stack([scales[k] for k in order]).reshape(3, 1, 4, 1, 1)
    else:
        sd[f"{m}alibi_scale"] = scales["encoder.position_bias.scale"].reshape(1, 1, 4, 1, 1)
    meta = multi_meta(
        cfg,
        "audio",
        {"feature_encoder_spec": "[(16, 10, 5)] + [(16, 3, 2)] * 2", "use_alibi_encoder": True, "mask_length": 5},
    )
    path = save(tmp_path / "audio_v2.pt", {"cfg": {"model": meta}, "model": sd})
    cfg2, model, missing = load_into_model(path)
    assert missing == []
    assert_same_architecture(cfg, cfg2)
    assert cfg2.model.decoder == cfg.model.decoder and cfg2.teacher.ema_scope == "context"
    wav = torch.randn(2, 4000)
    assert_same_features(src, model, wav)
    pad = torch.zeros(2, 4000, dtype=torch.bool)
    pad[1, 2500:] = True
    assert_same_features(src, model, wav, pad)
    assert_same_head(src, model)


def test_text_v2_imports_exactly(tmp_path: Path) -> None:
    cfg = apply_overrides(
        preset("text-tiny", 2),
        [*TEXT_SHRINK, "model.decoder.dim=32", "model.decoder.layers=2", "model.decoder.projection_layers=2"],
    )
    src = randomised(cfg)
    m = "modality_encoders.TEXT."
    rules = [
        (r"frontend\.local\.(embed_tokens|embed_positions)\.weight", rf"{m}local_encoder.\1.weight"),
        (r"frontend\.local\.layer_norm\.(\w+)", rf"{m}local_encoder.layernorm_embedding.\1"),
        *alt_block_rules(r"encoder\.blocks", "blocks"),
        *decoder_rules(m),
    ]
    sd = rename(student(src), rules)
    meta = multi_meta(cfg, "text", {"dropout": 0.1, "no_scale_embedding": True, "max_source_positions": 32})
    path = save(tmp_path / "text_v2.pt", {"cfg": {"model": meta}, "model": sd})
    cfg2, model, missing = load_into_model(path)
    assert missing == []
    assert_same_architecture(cfg, cfg2)
    assert cfg2.model.decoder == cfg.model.decoder and cfg2.teacher.ema_scope == "encoder"
    ids = torch.tensor([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]])
    assert_same_features(src, model, ids)
    assert_same_head(src, model)


# ----------------------------------------------------------------------------- data2vec_vision (BEiT)


def beit_checkpoint(tmp_path: Path, variant: str) -> tuple[RunConfig, Data2Vec, Path]:
    if variant == "shared":
        cfg = make_tiny_config(1)
    else:  # shared + per-layer relative bias, learned absolute positions
        cfg = make_tiny_config(1, model__encoder__position_bias="both", model__image__positions="learned")
    model = randomised(cfg)
    rules = [
        (r"frontend\.local\.proj\.(\w+)", r"patch_embed.proj.\1"),
        (r"frontend\.context\.prefix", "cls_token"),
        (r"frontend\.context\.mask_emb", "mask_token"),
        (r"frontend\.context\.positional\.table", "POS"),
        (r"encoder\.position_bias\.table", "rel_pos_bias.relative_position_bias_table"),
        (r"encoder\.blocks\.(\d+)\.gamma([12])", r"blocks.\1.gamma_\2"),
        (r"encoder\.blocks\.(\d+)\.position_bias\.table", r"blocks.\1.attn.relative_position_bias_table"),
        (r"encoder\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(\w+)", r"blocks.\1.\2.\3"),
        (r"encoder\.blocks\.(\d+)\.attn\.(q_bias|v_bias)", r"blocks.\1.attn.\2"),
        (r"encoder\.final_norm\.(\w+)", r"norm.\1"),
        (r"head\.(\w+)", r"lm_head.\1"),
    ]
    sd = rename(student(model), rules)
    sd["mask_token"] = sd["mask_token"].reshape(1, 1, -1)
    if "POS" in sd:  # BEiT's table has a CLS slot; ours folds it into the CLS token (zero here: exact)
        table = sd.pop("POS")
        sd["pos_embed"] = torch.cat([torch.zeros(1, 1, table.shape[-1]), table], dim=1)
    sd["rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    sd["fc_norm.weight"] = torch.ones(32)  # a fine-tuning head: not ours, ignored
    args = argparse.Namespace(
        model="beit_base_patch16_224",
        input_size=32,
        layer_scale_init_value=0.1,
        drop_path=0.0,
        attn_drop_rate=0.0,
        target_layers="[1, 2]",
        post_target_layer_norm=True,
        l1_beta=2.0,
        ema_decay=0.9998,
        num_mask_patches=8,
        window_size=(4, 4),
    )
    path = save(tmp_path / f"beit_{variant}.pth", {"model": sd, "args": args, "epoch": 799})
    return cfg, model, path


@pytest.mark.parametrize("variant", ["shared", "both_learned"])
def test_beit_vision_imports_exactly(tmp_path: Path, variant: str) -> None:
    src_cfg, src, path = beit_checkpoint(tmp_path, variant)
    assert is_fairseq_checkpoint(path)
    cfg, model, missing = load_into_model(path)
    assert missing == []
    assert_same_architecture(src_cfg, cfg)
    assert cfg.model.image == src_cfg.model.image
    assert cfg.targets.top_k == 2 and cfg.loss.beta == 2.0 and cfg.masking.mask_prob == 0.5
    images = torch.randn(2, 3, 32, 32)
    assert_same_features(src, model, images)
    assert_same_head(src, model)


# ----------------------------------------------------------------------------- detection and errors


def test_detection(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "notes.txt").write_text("hello")
    save(tmp_path / "plain.pt", {"model": {"encoder.blocks.0.norm1.weight": torch.zeros(2)}})
    for p in ("x.safetensors", "notes.txt", "plain.pt", "missing.pt"):
        assert not is_fairseq_checkpoint(tmp_path / p), p
    assert not is_fairseq_checkpoint(tmp_path)


def test_unsupported_tensors_are_refused(tmp_path: Path) -> None:
    _, _, path = audio_v1_checkpoint(tmp_path)
    ck = torch.load(path, weights_only=True)
    ck["model"]["encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    torch.save(ck, path)
    with pytest.raises(FairseqImportError, match="rotary"):
        load_fairseq(path)


def test_conv_spec_is_parsed_not_evaluated() -> None:
    assert parse_layer_spec("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)]") == [(512, 10, 5)] + [
        (512, 3, 2)
    ] * 4 + [(512, 2, 2)]
    with pytest.raises(FairseqImportError):
        parse_layer_spec("__import__('os').system('true')")


# ----------------------------------------------------------------------------- pickle safety


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class Custom:
    """A class the importer knows nothing about."""

    def __init__(self) -> None:
        self.x = 1


def test_malicious_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _, _, good = audio_v1_checkpoint(tmp_path)
    ck = torch.load(good, weights_only=True)
    ck["cfg"] = {"model": ck["cfg"]["model"], "payload": _Evil(marker)}
    path = save(tmp_path / "evil.pt", ck)
    assert is_fairseq_checkpoint(path)  # detection reads strings only
    with pytest.raises(FairseqImportError) as info:
        load_fairseq(path)
    assert "system" in str(info.value) and "refused" in str(info.value)
    assert not marker.exists()


def test_unknown_global_is_refused_by_name(tmp_path: Path) -> None:
    _, _, good = audio_v1_checkpoint(tmp_path)
    ck = torch.load(good, weights_only=True)
    ck["extra_state"] = {"thing": Custom()}
    path = save(tmp_path / "custom.pt", ck)
    with pytest.raises(FairseqImportError, match=r"Custom"):
        load_fairseq(path)


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str) -> types.ModuleType:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules:
            monkeypatch.setitem(sys.modules, sub, types.ModuleType(sub))
    return sys.modules[name]


def test_omegaconf_like_config_is_read_inertly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cfg pickled as omegaconf containers (not importable here) is read as plain data; no
    class from it is ever called."""
    calls: list[str] = []

    class DictConfig:
        def __init__(self, content: dict[str, Any]) -> None:
            self._content = {k: v if isinstance(v, (DictConfig, AnyNode)) else AnyNode(v) for k, v in content.items()}
            self._metadata = None
            self._parent = None

        def __getstate__(self) -> dict[str, Any]:
            return dict(self.__dict__)

        def __setstate__(self, state: dict[str, Any]) -> None:  # would run if the real class were used
            calls.append("DictConfig.__setstate__")
            self.__dict__.update(state)

    class AnyNode:
        def __init__(self, val: Any) -> None:
            self._val = val
            self._metadata = None
            self._parent = None

        def __setstate__(self, state: dict[str, Any]) -> None:
            calls.append("AnyNode.__setstate__")
            self.__dict__.update(state)

    class Modality(enum.Enum):
        AUDIO = 1
        IMAGE = 2
        TEXT = 3

    for cls, mod in ((DictConfig, "omegaconf.dictconfig"), (AnyNode, "omegaconf.nodes")):
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(_fake_module(monkeypatch, mod), cls.__name__, cls)
    Modality.__module__, Modality.__qualname__ = "examples.data2vec.data.modality", "Modality"
    _fake_module(monkeypatch, "examples.data2vec.data.modality").Modality = Modality  # type: ignore[attr-defined]

    src_cfg, src, good = image_v2_checkpoint(tmp_path)
    ck = torch.load(good, weights_only=True)
    meta = ck["cfg"]["model"]
    meta["supported_modality"] = Modality.IMAGE

    def wrap(d: dict[str, Any]) -> DictConfig:
        return DictConfig({k: wrap(v) if isinstance(v, dict) else v for k, v in d.items()})

    ck["cfg"] = wrap({"model": meta, "task": {"data": "/x"}})
    path = save(tmp_path / "omegaconf.pt", ck)
    for name in ("omegaconf", "omegaconf.dictconfig", "omegaconf.nodes", "examples", "examples.data2vec"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in ("examples.data2vec.data", "examples.data2vec.data.modality"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    cfg, model, missing = load_into_model(path)
    assert calls == [] and missing == []
    assert_same_architecture(src_cfg, cfg)
    assert cfg.targets.top_k == src_cfg.targets.top_k
    assert_same_features(src, model, torch.randn(1, 3, 32, 32))
