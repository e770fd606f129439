"""Speech: CNN lengths, padding, masks, targets, ALiBi, the front-end contract and presets."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from data2vec.config import ConfigError, RunConfig, from_dict
from data2vec.masking import block_mask_1d, draw_masks, span_mask
from data2vec.modalities.audio import AlibiBias, alibi_slopes, conv_output_length, conv_output_lengths
from data2vec.model import Batch, Data2Vec
from data2vec.presets import preset

CONV = [[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2
FULL_CONV = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


def audio_config(version: int, **sections: Any) -> RunConfig:
    v2 = version == 2
    data: dict[str, Any] = {
        "model": {
            "modality": "audio",
            "version": version,
            "encoder": {
                "dim": 32,
                "depth": 3,
                "num_heads": 4,
                "mlp_ratio": 2.0,
                "norm_eps": 1e-5,
                "input_norm": True,
                "position_bias": "shared" if v2 else "none",
            },
            "audio": {
                "conv_layers": CONV,
                "pos_conv_depth": 2,
                "pos_conv_kernel": 6,
                "pos_conv_groups": 4,
                "alibi": v2,
            },
            "decoder": {"dim": 16, "layers": 2, "groups": 4, "kernel_size": 3},
        },
        "masking": {
            "kind": "block_1d" if v2 else "span",
            "mask_prob": 0.5 if v2 else 0.65,
            "mask_length": 3,
            "mask_prob_adjust": 0.05,
            "num_masks": 2 if v2 else 1,
        },
        "teacher": {"ema_scope": "context" if v2 else "encoder"},
        "targets": {"top_k": 2, "layer_norm": "instance", "final_norm": "none"},
        "train": {"precision": "fp32", "device": "cpu"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    cfg: RunConfig = from_dict(RunConfig, data)
    return cfg


def build(version: int, seed: int = 0, **sections: Any) -> Data2Vec:
    torch.manual_seed(seed)
    return Data2Vec.from_config(audio_config(version, **sections))


# ---------------------------------------------------------------------- CNN lengths


@pytest.mark.parametrize("length", [400, 401, 1999, 3201, 16_001, 16_383])
def test_conv_output_length_matches_the_cnn(length: int) -> None:
    model = build(2)
    with torch.no_grad():
        frames = model.frontend.local.cnn(torch.randn(1, length)).shape[-1]
    conv = model.cfg.audio.conv_layers
    assert conv_output_length(length, conv) == frames
    assert int(conv_output_lengths(torch.tensor([length]), conv)[0]) == frames


def test_official_cnn_frame_counts() -> None:
    # 25 ms receptive field, 20 ms hop: a 20 s crop gives 999 frames (docs/design.md, 'Front-ends').
    assert conv_output_length(320_000, FULL_CONV) == 999
    assert conv_output_length(400, FULL_CONV) == 1
    assert conv_output_length(399, FULL_CONV) == 0
    lengths = torch.tensor([320_000, 16_000, 16_079, 16_080, 401])
    assert conv_output_lengths(lengths, FULL_CONV).tolist() == [999, 49, 49, 50, 1]
    # The whole stack is one 400-sample window with a 320-sample hop.
    for n in range(400, 20_000, 37):
        assert conv_output_length(n, FULL_CONV) == (n - 400) // 320 + 1


# ---------------------------------------------------------------------- padding


def _padded(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(w) for w in waves)
    x = torch.zeros(len(waves), n)
    pad = torch.ones(len(waves), n, dtype=torch.bool)
    for i, w in enumerate(waves):
        x[i, : len(w)] = w
        pad[i, : len(w)] = False
    return x, pad


@pytest.mark.parametrize("version", [1, 2])
def test_padded_batch_gives_each_utterance_its_own_targets(version: int) -> None:
    model = build(version).eval()
    g = torch.Generator().manual_seed(1)
    waves = [torch.randn(n, generator=g) * 3 + 1 for n in (4001, 2600, 3333)]
    x, pad = _padded(waves)
    with torch.no_grad():
        tokens = model.frontend.local(x, pad)
        assert tokens.padding_mask is not None
        batch_targets = model.teacher_targets(x, tokens)
        batch_out = model.encode(x, pad).x
    frames = conv_output_lengths(torch.tensor([len(w) for w in waves]), model.cfg.audio.conv_layers)
    assert (~tokens.padding_mask).sum(1).tolist() == frames.tolist()
    for i, w in enumerate(waves):
        with torch.no_grad():
            alone = model.teacher_targets(w[None], model.frontend.local(w[None]))
            alone_out = model.encode(w[None]).x
        n = int(frames[i])
        assert alone.shape[1] == n
        torch.testing.assert_close(batch_targets[i, :n], alone[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(batch_out[i, :n], alone_out[0], atol=2e-5, rtol=1e-4)
        # padded frames carry no target (instance norm leaves them out and zeroes them)
        assert bool((batch_targets[i, n:] == 0).all())


def test_padding_changes_results_when_it_leaks() -> None:
    """The padded comparison above can fail: reading padded frames does change the targets."""
    model = build(1).eval()
    w = torch.randn(3000)
    x, pad = _padded([w, torch.randn(4000)])
    with torch.no_grad():
        tokens = model.frontend.local(x, pad)
        leaky = model.teacher_targets(x, tokens._replace(padding_mask=None))
        alone = model.teacher_targets(w[None], model.frontend.local(w[None]))
    n = alone.shape[1]
    assert not torch.allclose(leaky[0, :n], alone[0], atol=1e-3)


@pytest.mark.parametrize("version", [1, 2])
def test_model_drawn_masks_skip_padding(version: int) -> None:
    model = build(version)
    x, pad = _padded([torch.randn(4000), torch.randn(2000)])
    out = model(Batch(x, None, pad), generator=torch.Generator().manual_seed(0))  # 2.0 raises if a mask hits padding
    assert math.isfinite(float(out.loss.detach()))
    assert out.metrics["masked_tokens"] > 0


# ---------------------------------------------------------------------- masks


def test_span_mask_counts_and_valid_lengths() -> None:
    g = torch.Generator().manual_seed(0)
    valid = torch.tensor([999, 700, 501, 999, 650])
    mask = span_mask(5, 999, 0.65, generator=g, mask_length=10, valid_lengths=valid)
    counts = mask.sum(1)
    assert bool((counts == counts[0]).all()) and int(counts[0]) > 0
    for row, n in zip(mask, valid.tolist(), strict=True):
        assert not bool(row[n:].any())


def test_span_mask_covers_about_half_at_full_length() -> None:
    # fairseq: p=0.65, length 10 masks ~49% of a 999-frame utterance (docs/design.md, 'Masking').
    g = torch.Generator().manual_seed(0)
    ratios = [span_mask(8, 999, 0.65, generator=g, mask_length=10).float().mean().item() for _ in range(25)]
    assert 0.45 < sum(ratios) / len(ratios) < 0.50


def test_span_mask_is_made_of_spans() -> None:
    g = torch.Generator().manual_seed(3)
    mask = span_mask(1, 200, 0.05, generator=g, mask_length=10)[0]  # few spans: no trimming needed
    runs = []
    run = 0
    for v in mask.tolist() + [False]:
        if v:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    assert runs and all(r >= 10 for r in runs)


def test_block_mask_1d_exact_counts() -> None:
    g = torch.Generator().manual_seed(0)
    mask = block_mask_1d(6, 999, 0.5, generator=g, mask_length=5, mask_prob_adjust=0.05)
    assert mask.sum(1).tolist() == [499] * 6  # int(0.5 * 999), docs/design.md 'Masking'
    valid = torch.tensor([999, 400, 777])
    mask = block_mask_1d(3, 999, 0.55, generator=g, mask_length=5, mask_prob_adjust=0.1, valid_lengths=valid)
    assert mask.sum(1).tolist() == [int(400 * 0.55)] * 3
    for row, n in zip(mask, valid.tolist(), strict=True):
        assert not bool(row[n:].any())


def test_masks_are_pure_functions_of_the_generator() -> None:
    for kind in ("span", "block_1d"):
        a = draw_masks(kind, 3, (1, 120), 0.5, generator=torch.Generator().manual_seed(7), num_masks=2, mask_length=5)
        b = draw_masks(kind, 3, (1, 120), 0.5, generator=torch.Generator().manual_seed(7), num_masks=2, mask_length=5)
        c = draw_masks(kind, 3, (1, 120), 0.5, generator=torch.Generator().manual_seed(8), num_masks=2, mask_length=5)
        assert a.shape == (6, 120) and torch.equal(a, b) and not torch.equal(a, c)


def test_draw_masks_repeats_valid_lengths_per_mask() -> None:
    valid = torch.tensor([100, 60])
    mask = draw_masks(
        "block_1d", 2, (1, 100), 0.5, generator=torch.Generator().manual_seed(0), num_masks=3, valid_lengths=valid
    )
    assert mask.shape == (6, 100)
    assert not bool(mask[3:, 60:].any()) and bool(mask[:3, 60:].any())
    assert mask.sum(1).tolist() == [30] * 6


# ---------------------------------------------------------------------- targets, teacher, init


@pytest.mark.parametrize("version", [1, 2])
def test_targets_are_the_ffn_output_before_the_residual(version: int) -> None:
    model = build(version, targets={"top_k": 1, "layer_norm": "none", "final_norm": "none"}).eval()
    captured: dict[str, torch.Tensor] = {}
    last = model.teacher["encoder"].blocks[-1]
    h1 = last.mlp.register_forward_hook(lambda m, i, o: captured.__setitem__("ffn", o))
    h2 = last.register_forward_hook(lambda m, i, o: captured.__setitem__("block", o.x))
    x = torch.randn(2, 3200)
    with torch.no_grad():
        y = model.teacher_targets(x, model.frontend.local(x))
    h1.remove()
    h2.remove()
    torch.testing.assert_close(y, captured["ffn"].float())
    assert not torch.allclose(y, captured["block"].float(), atol=1e-3)


def test_teacher_scopes_follow_the_official_sharing() -> None:
    v1, v2 = build(1), build(2)
    # 1.0 (ema_transformer_only + ema_layers_only): CNN, projection and pos-conv shared.
    assert v1.teacher.part("local") is None and v1.teacher.part("context") is None
    # 2.0: CNN and projection shared; pos-conv and ALiBi scale EMA'd with the blocks.
    assert v2.teacher.part("local") is None and v2.teacher.part("context") is not None
    names = [n for n, _ in v2.teacher.named_parameters()]
    assert any("position_bias.scale" in n for n in names)
    assert any("positional.convs" in n for n in names)


def test_front_end_initialisation() -> None:
    model = build(1, model={"encoder": {"dim": 256, "num_heads": 4}})
    assert model.frontend.context.mask_emb is not None
    mask_emb = model.frontend.context.mask_emb.detach()
    assert float(mask_emb.min()) >= 0 and float(mask_emb.max()) <= 1 and float(mask_emb.mean()) > 0.3  # uniform(0, 1)
    conv = model.frontend.local.cnn.layers[1][0].weight  # kaiming normal: std sqrt(2 / fan_in)
    fan_in = conv.shape[1] * conv.shape[2]
    assert abs(float(conv.std()) - math.sqrt(2 / fan_in)) < 0.1 * math.sqrt(2 / fan_in)
    assert model.frontend.local.cnn.layers[0][0].bias is None
    proj = model.frontend.local.proj.weight  # PyTorch default Linear init, not N(0, 0.02)
    assert float(proj.abs().max()) > 0.1


# ---------------------------------------------------------------------- ALiBi


def test_alibi_slopes() -> None:
    assert alibi_slopes(8) == [2 ** -(i + 1) for i in range(8)]
    s12 = alibi_slopes(12)
    assert s12[:8] == alibi_slopes(8) and s12[8:] == alibi_slopes(16)[0::2][:4]


def test_alibi_gathered_equals_the_sub_matrix_of_the_full_bias() -> None:
    bias = AlibiBias(4)
    with torch.no_grad():
        bias.scale.copy_(torch.tensor([1.0, 0.5, 2.0, -1.0]))  # a negative scale is clamped to 0
    full = bias(None, 50)  # (1, H, 50, 50)
    assert full.shape == (1, 4, 50, 50)
    assert bool((full[0, 3] == 0).all())
    assert float(full[0, 0, 3, 10]) == pytest.approx(-7 * 0.25)
    g = torch.Generator().manual_seed(0)
    keep = torch.stack([torch.randperm(50, generator=g)[:20] for _ in range(3)])  # any order
    gathered = bias(keep, 20)
    for b in range(3):
        ids = keep[b]
        torch.testing.assert_close(gathered[b], full[0][:, ids][:, :, ids])


def test_alibi_follows_the_kept_tokens_in_the_model() -> None:
    """2.0 drops masked frames; the bias the encoder sees must be the kept rows and columns."""
    model = build(2)
    seen: list[tuple[torch.Tensor | None, int]] = []
    pb = model.encoder.position_bias
    assert pb is not None
    pb.register_forward_hook(lambda m, i, o: seen.append((i[0], i[1])))
    x = torch.randn(1, 4000)
    g = torch.Generator().manual_seed(0)
    frames = conv_output_length(4000, model.cfg.audio.conv_layers)
    mask = model.draw_masks(1, g, (1, frames))
    model(Batch(x, mask))
    positions, n = seen[-1]  # the student pass (the teacher runs first, unmasked)
    assert positions is not None and n == int((~mask[0]).sum())
    assert positions.tolist()[0] == torch.nonzero(~mask[0]).flatten().tolist()


# ---------------------------------------------------------------------- config and presets


def test_alibi_needs_a_position_bias_slot() -> None:
    with pytest.raises(ConfigError, match="model.encoder.position_bias"):
        audio_config(2, model={"encoder": {"position_bias": "none"}, "audio": {"alibi": True}})
    with pytest.raises(ConfigError, match="model.encoder.position_bias"):
        audio_config(1, model={"encoder": {"position_bias": "shared"}, "audio": {"alibi": False}})


def test_audio_presets_hold_the_official_numbers() -> None:
    b1, b2, l2 = preset("audio-base", 1), preset("audio-base", 2), preset("audio-large", 2)
    assert (b1.masking.kind, b1.masking.mask_prob, b1.masking.mask_length) == ("span", 0.65, 10)
    assert (b1.targets.top_k, b1.teacher.ema_scope, b1.teacher.anneal_steps) == (8, "encoder", 30_000)
    assert (b1.optim.lr, b1.optim.betas, b1.optim.eps, b1.optim.weight_decay) == (5e-4, (0.9, 0.98), 1e-6, 0.01)
    assert b1.data.audio.batch_seconds * 16_000 == 3_800_000 and b1.train.steps == 400_000
    assert b1.model.encoder.layerdrop == 0.05 and not b1.model.audio.alibi
    assert (b2.masking.kind, b2.masking.mask_prob, b2.masking.mask_length, b2.masking.num_masks) == (
        "block_1d",
        0.5,
        5,
        8,
    )
    assert (b2.teacher.ema_scope, b2.teacher.end_decay, b2.teacher.anneal_steps) == ("context", 0.99999, 75_000)
    assert (b2.optim.lr, b2.optim.warmup_steps, b2.data.audio.batch_seconds) == (7.5e-4, 8_000, 62.5)
    assert b2.model.audio.alibi and b2.model.encoder.position_bias == "shared"
    assert (b2.model.decoder.dim, b2.model.decoder.kernel_size, b2.model.decoder.layers) == (384, 7, 4)
    enc = l2.model.encoder
    assert (enc.dim, enc.num_heads, enc.prenet_depth, enc.depth, enc.layerdrop) == (1024, 16, 8, 16, 0.0)
    assert (l2.targets.top_k, l2.teacher.decay, l2.teacher.end_decay, l2.masking.num_masks) == (16, 0.9997, 1.0, 12)
    assert (l2.optim.lr, l2.optim.clip_grad, l2.data.audio.batch_seconds, l2.train.steps) == (4e-4, 1.0, 20.0, 600_000)
    with pytest.raises(ConfigError, match="no data2vec 1.0 variant"):
        preset("audio-large", 1)


def test_audio_base_builds_at_full_size() -> None:
    cfg = preset("audio-base", 2)
    torch.manual_seed(0)
    model = Data2Vec.from_config(cfg)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 90e6 < n < 100e6  # ~94M for the wav2vec 2.0 / data2vec Base architecture (incl. head/decoder)
    assert model.frontend.grid == (1, 999)
