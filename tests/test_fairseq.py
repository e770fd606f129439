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
import collections
import enum
import os
import random
import re
import sys
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
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


SHARED_DATA_ENV = "DATA2VEC_SHARED_DATA"


def shared_data(name: str, start: Path = Path(__file__), fallback: Path = Path("/work/shared/data")) -> Path | None:
    """The shared test data folder `name` (read in place, never copied into the repository):
    `$DATA2VEC_SHARED_DATA/name` when that variable is set; else `shared/data/name` in the first
    folder above `start` that has one (a checkout beside or holding `shared/`), else
    `fallback/name` (where this machine keeps it, for a clone anywhere else). None where absent."""
    if os.environ.get(SHARED_DATA_ENV):
        found = Path(os.environ[SHARED_DATA_ENV]) / name
        return found if found.is_dir() else None
    for parent in Path(start).resolve().parents:
        if (parent / "shared" / "data" / name).is_dir():
            return parent / "shared" / "data" / name
    return fallback / name if (fallback / name).is_dir() else None


FAIRSEQ_TINY = shared_data("fairseq-tiny")
"""Checkpoints written by fairseq's own code, with fairseq's layer outputs (its README.md)."""
needs_fairseq_tiny = pytest.mark.skipif(
    FAIRSEQ_TINY is None, reason=f"shared data fairseq-tiny not found (set {SHARED_DATA_ENV} to the folder holding it)"
)


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


@pytest.mark.parametrize("omegaconf_2_0", [False, True], ids=["plain", "omegaconf-2.0-metadata"])
def test_omegaconf_like_config_is_read_inertly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, omegaconf_2_0: bool
) -> None:
    """A cfg pickled as omegaconf containers (not importable here) is read as plain data; no
    class from it is ever called. With omegaconf 2.0's metadata (what a checkpoint re-saved after
    fairseq's `load_checkpoint_to_cpu` holds): a `defaultdict(dict)` resolver cache and type
    references, which a protocol-2 pickle names `__builtin__.dict` and `__builtin__.long`."""
    calls: list[str] = []

    class ContainerMetadata:
        def __init__(self) -> None:
            self.ref_type = dict
            self.object_type = dict
            self.key_type = None
            self.element_type = int
            self.resolver_cache: collections.defaultdict[str, dict[str, Any]] = collections.defaultdict(dict)

        def __setstate__(self, state: dict[str, Any]) -> None:
            calls.append("ContainerMetadata.__setstate__")
            self.__dict__.update(state)

    class DictConfig:
        def __init__(self, content: dict[str, Any]) -> None:
            self._content = {k: v if isinstance(v, (DictConfig, AnyNode)) else AnyNode(v) for k, v in content.items()}
            self._metadata = ContainerMetadata() if omegaconf_2_0 else None
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

    for cls, mod in (
        (DictConfig, "omegaconf.dictconfig"),
        (AnyNode, "omegaconf.nodes"),
        (ContainerMetadata, "omegaconf.base"),
    ):
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
    if omegaconf_2_0:  # the file holds what the test is about
        with zipfile.ZipFile(path) as zf:
            pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
        assert all(g in pkl for g in (b"collections\ndefaultdict", b"__builtin__\nlong", b"__builtin__\ndict"))
    for name in ("omegaconf", "omegaconf.dictconfig", "omegaconf.nodes", "omegaconf.base", "examples"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in ("examples.data2vec", "examples.data2vec.data", "examples.data2vec.data.modality"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    cfg, model, missing = load_into_model(path)
    assert calls == [] and missing == []
    assert_same_architecture(src_cfg, cfg)
    assert cfg.targets.top_k == src_cfg.targets.top_k
    assert_same_features(src, model, torch.randn(1, 3, 32, 32))


# ----------------------------------------------------------------------------- files that are not checkpoints

TORCH_ADVICE = ("weights_only", "can still be loaded", "trust", "safe_globals", "file an issue")
"""Words of torch's hints on loading a refused file anyway, which no message may repeat."""


def test_a_refused_zip_pickle_says_only_what_was_found(tmp_path: Path) -> None:
    """A zip checkpoint whose pickle (protocol 4) holds a set, an instruction torch's weights-only
    reader lacks: the refusal names it, without torch's advice to load the file unsafely."""
    _, _, good = audio_v1_checkpoint(tmp_path)
    ck = torch.load(good, weights_only=True)
    ck["extra_state"] = {"seen": {1, 2}}
    path = tmp_path / "protocol4.pt"
    torch.save(ck, path, pickle_protocol=4)
    assert zipfile.is_zipfile(path) and is_fairseq_checkpoint(path)
    with pytest.raises(FairseqImportError) as info:
        load_fairseq(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: refused to load: its pickle holds what the safe reader does not accept (")
    assert "Unsupported operand" in msg and "\n" not in msg and not any(w in msg for w in TORCH_ADVICE), msg


def test_files_that_are_not_torch_checkpoints(tmp_path: Path) -> None:
    noise = tmp_path / "noise.pt"
    noise.write_bytes(random.Random(2).randbytes(2000))  # torch.load: IndexError: pop from empty list
    with pytest.raises(FairseqImportError) as info:
        load_fairseq(noise)
    assert str(info.value) == f"{noise}: not a torch checkpoint file (neither a zip archive nor torch's legacy format)"
    _, _, good = audio_v1_checkpoint(tmp_path)
    torn = tmp_path / "torn.pt"
    data = good.read_bytes()
    torn.write_bytes(data[: len(data) // 2] + data[-400:])  # the zip directory kept, members cut
    with pytest.raises(FairseqImportError) as info:
        load_fairseq(torn)
    msg = str(info.value)
    assert msg.startswith(f"{torn}: unreadable torch file, truncated or corrupt (") and "\n" not in msg, msg


def test_legacy_format_through_every_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A fairseq checkpoint in torch's legacy (non-zip) format: the importer, the loading chain and
    `data2vec convert` all read it."""
    from data2vec.cli import main
    from data2vec.pretrained import load_model

    _, src, good = audio_v1_checkpoint(tmp_path)
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(good, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy) and is_fairseq_checkpoint(legacy)
    wav = torch.randn(1, 4000)
    assert_same_features(src, load_into_model(legacy)[1], wav)
    assert_same_features(src, load_model(legacy), wav)
    assert main(["convert", str(legacy), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert_same_features(src, load_model(tmp_path / "out"), wav)


# ----------------------------------------------------------------------------- files written by fairseq

REAL_FILES = ["d2v2_image", "d2v2_image_dictconfig", "d2v1_audio", "d2v1_audio_legacy", "d2v2_audio", "d2v2_text"]
"""`FAIRSEQ_TINY` checkpoints: fairseq's classes from the official configs, saved by its trainer code."""


def test_shared_data_is_found_from_any_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SHARED_DATA_ENV, raising=False)
    beside = tmp_path / "work" / "shared" / "data" / "fairseq-tiny"
    beside.mkdir(parents=True)
    elsewhere = tmp_path / "ci" / "tests" / "test_fairseq.py"
    machine = tmp_path / "work" / "shared" / "data"
    # a checkout beside shared/ (work/main), one holding it, and a clone elsewhere (fallback)
    assert shared_data("fairseq-tiny", tmp_path / "work" / "main" / "tests" / "t.py", tmp_path) == beside
    (tmp_path / "ci" / "shared" / "data" / "fairseq-tiny").mkdir(parents=True)
    assert shared_data("fairseq-tiny", elsewhere, tmp_path) == tmp_path / "ci" / "shared" / "data" / "fairseq-tiny"
    assert shared_data("fairseq-tiny", tmp_path / "x" / "tests" / "t.py", machine) == beside
    assert shared_data("fairseq-tiny", tmp_path / "x" / "tests" / "t.py", tmp_path / "none") is None
    monkeypatch.setenv(SHARED_DATA_ENV, str(machine))
    assert shared_data("fairseq-tiny", elsewhere, tmp_path / "none") == beside
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "empty"))
    assert shared_data("fairseq-tiny", tmp_path / "work" / "main" / "tests" / "t.py") is None


def block_io(model: Data2Vec, inputs: Tensor, padding_mask: Tensor | None = None) -> list[Tensor]:
    """[encoder input (after positions and input LayerNorm), the output of each block (prenet
    blocks first)], prefix tokens included: what the references call layer0, layer1, ..."""
    blocks = [*model.encoder.prenet, *model.encoder.blocks]
    got: dict[int, Tensor] = {}
    handles = [blocks[0].register_forward_pre_hook(lambda m, a: got.__setitem__(0, a[0]))]
    for i, b in enumerate(blocks, start=1):
        handles.append(b.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o.x)))
    try:
        with torch.no_grad():
            model.encode(inputs, padding_mask)
    finally:
        for h in handles:
            h.remove()
    return [got[i] for i in range(len(blocks) + 1)]


def real_model(name: str, **audio: Any) -> tuple[Data2Vec, dict[str, Tensor]]:
    """A `FAIRSEQ_TINY` checkpoint imported (every weight used, none missing; fp32) and its references."""
    assert FAIRSEQ_TINY is not None
    cfg, sd = load_fairseq(FAIRSEQ_TINY / f"{name}.pt")
    if audio:
        cfg = replace(cfg, model=replace(cfg.model, audio=replace(cfg.model.audio, **audio)))
    model = Data2Vec.from_config(cfg).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert missing == [] and unexpected == []
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ref_name = name.removesuffix("_dictconfig").removesuffix("_legacy")
    return model, torch.load(FAIRSEQ_TINY / f"ref_{ref_name}.pt", weights_only=True)


def close(a: Tensor, b: Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def inputs_of(ref: dict[str, Tensor]) -> tuple[Tensor, Tensor | None, list[int]]:
    """(the padded batch, its input padding mask, each input's length)."""
    if "image" in ref:
        return ref["image"], None, [ref["image"].shape[-1]] * len(ref["image"])
    if "wav" in ref:
        return ref["wav"], ref["padding_mask"], (~ref["padding_mask"]).sum(1).tolist()
    return ref["tokens"], None, (ref["tokens"] != ref["pad"]).sum(1).tolist()


@needs_fairseq_tiny
@pytest.mark.parametrize("name", REAL_FILES)
def test_real_fairseq_checkpoints_compute_every_layer_fairseq_computes(name: str) -> None:
    """Every layer, fp32, against fairseq's own outputs: each input run alone (unpadded), and the
    padded batch's valid positions against the same padding-free answer (images: the batch, CLS
    token included; fairseq text is padding-invariant, so its padded batch is checked too)."""
    model, ref = real_model(name)
    x, pad, lengths = inputs_of(ref)
    n = len([k for k in ref if re.fullmatch(r"layer\d+", k)])
    batch = block_io(model, x, pad)
    assert len(batch) == n
    if "image" in ref:
        for i in range(n):
            close(batch[i], ref[f"layer{i}"], f"layer{i}")
        with torch.no_grad():
            close(model.encode(x).x, ref["x"], "x")
        return
    for j, length in enumerate(lengths):
        alone = block_io(model, x[j : j + 1, :length])
        for i in range(n):
            expected = ref[f"alone{j}_layer{i}"]
            close(alone[i], expected, f"input {j} alone, layer{i}")
            close(batch[i][j : j + 1, : expected.shape[1]], expected, f"input {j} in the padded batch, layer{i}")
            if "tokens" in ref:
                close(batch[i][j, :length], ref[f"layer{i}"][j, :length], f"fairseq's padded batch, layer{i}")


@needs_fairseq_tiny
@pytest.mark.parametrize("name", ["d2v1_audio", "d2v1_audio_legacy"])
def test_real_speech_1_0_padded_batch_with_zeroing_at_the_input(name: str) -> None:
    """fairseq 1.0 zeroes padded frames once, at the positional convs' input: with
    `pos_conv_zero_padding=input` the padded batch gives fairseq's own padded outputs (valid
    frames), and the frame padding mask is fairseq's."""
    model, ref = real_model(name, pos_conv_zero_padding="input")
    with torch.no_grad():
        assert torch.equal(
            model.frontend.local(ref["wav"], ref["padding_mask"]).padding_mask, ref["frame_padding_mask"]
        )
    valid = ~ref["frame_padding_mask"]
    batch = block_io(model, ref["wav"], ref["padding_mask"])
    for i, got in enumerate(batch):
        close(got[valid], ref[f"layer{i}"][valid], f"layer{i}")
    with torch.no_grad():
        close(model.encode(ref["wav"], ref["padding_mask"]).x[valid], ref["x"][valid], "x")


@needs_fairseq_tiny
def test_real_speech_2_0_padded_batch_is_not_padding_invariant_in_fairseq() -> None:
    """fairseq 2.0 never zeroes padded frames before its positional convs, so its padded batch
    differs from each clip alone by far more than rounding; no setting here reproduces it. The
    reference run with the padded frames zeroed at the convs' input (`zeroin_*`) is what
    `pos_conv_zero_padding=input` computes."""
    model, ref = real_model("d2v2_audio", pos_conv_zero_padding="input")
    valid = ~ref["frame_padding_mask"]
    for j in (1, 2):  # the padded clips: fairseq's batch is not what each gets alone
        alone = ref[f"alone{j}_layer3"]
        assert (ref["layer3"][j : j + 1, : alone.shape[1]] - alone).abs().max() > 0.1
    for i, got in enumerate(block_io(model, ref["wav"], ref["padding_mask"])):
        close(got[valid], ref[f"zeroin_layer{i}"][valid], f"layer{i}")
