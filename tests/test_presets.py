"""Presets: every one is valid and round-trips; the image ones carry the official numbers."""

from __future__ import annotations

import pytest
import torch

from data2vec.config import RunConfig
from data2vec.model import Batch, Data2Vec
from data2vec.presets import PRESETS, preset

ALL = [(name, v) for name in sorted(PRESETS) for v in sorted(PRESETS[name])]


@pytest.mark.parametrize(("name", "version"), ALL)
def test_preset_is_valid_and_round_trips(name: str, version: int) -> None:
    cfg = preset(name, version)
    assert cfg.model.version == version
    assert cfg.preset == f"{name}@v{version}"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_image_base_v1_official_numbers() -> None:
    cfg = preset("image-base", 1)
    enc = cfg.model.encoder
    assert (enc.dim, enc.depth, enc.num_heads, enc.norm_order, enc.qkv_bias) == (768, 12, 12, "pre", "qv")
    assert enc.layer_scale_init == 1e-4 and enc.position_bias == "shared"
    assert round(cfg.masking.mask_prob * 196) == 120
    assert (cfg.targets.top_k, cfg.targets.layer_source, cfg.targets.final_norm) == (6, "block", "layer")
    assert (cfg.loss.beta, cfg.loss.scale) == (2.0, "inv_dim")
    assert cfg.teacher.decay == cfg.teacher.end_decay == 0.9998
    assert (cfg.optim.lr, cfg.optim.clip_grad, cfg.optim.weight_decay) == (2e-3, 3.0, 0.05)


def test_image_base_v2_official_numbers() -> None:
    cfg = preset("image-base", 2)
    enc = cfg.model.encoder
    assert (enc.prenet_depth, enc.depth, enc.norm_order) == (2, 10, "post")
    assert cfg.model.image.positions == "sincos"
    assert (cfg.masking.kind, cfg.masking.mask_prob, cfg.masking.mask_length) == ("inverse_block", 0.8, 3)
    assert (cfg.masking.mask_prob_adjust, cfg.masking.num_masks) == (0.07, 16)
    d = cfg.model.decoder
    assert (d.dim, d.kernel_size, d.groups, d.layers) == (768, 3, 16, 6)
    assert (cfg.targets.top_k, cfg.targets.layer_norm, cfg.targets.final_norm) == (10, "instance", "layer")
    assert (cfg.teacher.decay, cfg.teacher.end_decay, cfg.teacher.anneal_steps) == (0.9998, 0.99999, 100_000)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.warmup_steps, cfg.train.steps) == (
        1e-3,
        (0.9, 0.95),
        50_040,
        375_300,
    )
    assert cfg.loss.cls_weight == pytest.approx(0.01 * 16 * 16)


@pytest.mark.parametrize("version", [1, 2])
def test_image_base_builds_at_full_size(version: int) -> None:
    model = Data2Vec.from_config(preset("image-base", version))
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert 84e6 < encoder_params < 87e6  # ViT-B/16 blocks
    with torch.no_grad():
        out = model.encode(torch.randn(1, 3, 224, 224), keep_layers=2)
    assert out.x.shape == (1, 197, 768) and len(out.layers) == 2


@pytest.mark.parametrize("version", [1, 2])
def test_image_tiny_trains_one_step(version: int) -> None:
    cfg = preset("image-tiny", version)
    model = Data2Vec.from_config(cfg)
    out = model(Batch(torch.randn(4, 3, 32, 32)), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
