"""Transformer blocks, attention, the encoder and position modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data2vec.config import DecoderConfig, EncoderConfig
from data2vec.nn.decoder import ConvDecoder
from data2vec.nn.pos import RelativePositionBias2d, sincos_1d, sincos_2d
from data2vec.nn.transformer import Attention, Block, BlockOutput, DropPath, Encoder, padding_bias


def enc_cfg(**kw) -> EncoderConfig:
    base = dict(dim=32, depth=3, num_heads=4, mlp_ratio=2.0)
    base.update(kw)
    return EncoderConfig(**base)


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Random non-trivial values for every parameter (LayerNorm affine, biases, LayerScale...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            offset = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0  # LayerNorm gains near 1
            p.copy_(torch.randn(p.shape, generator=g) * scale + offset)


def rand(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ Block


@pytest.mark.parametrize("norm_order, ls", [("pre", 0.1), ("pre", 0.0), ("post", 0.0)])
def test_block_runs_and_returns_block_output(norm_order: str, ls: float) -> None:
    torch.manual_seed(0)
    blk = Block(enc_cfg(norm_order=norm_order, layer_scale_init=ls), drop_path=0.0).eval()
    x = rand(2, 5, 32)
    out = blk(x)
    assert isinstance(out, BlockOutput)
    assert out.x.shape == (2, 5, 32) and out.ffn_out.shape == (2, 5, 32)
    assert torch.isfinite(out.x).all()
    assert not torch.allclose(out.x, out.ffn_out)


def test_post_ln_ffn_out_is_branch_before_residual() -> None:
    torch.manual_seed(0)
    blk = Block(enc_cfg(norm_order="post"), drop_path=0.0).eval()
    randomize(blk)
    x = rand(2, 6, 32, seed=1)
    out = blk(x)
    h = blk.norm1(x + blk.attn(x))
    expected_ffn = blk.mlp(h)
    torch.testing.assert_close(out.ffn_out, expected_ffn)
    torch.testing.assert_close(out.x, blk.norm2(h + expected_ffn))


def test_pre_ln_ffn_out_is_scaled_branch_before_residual() -> None:
    torch.manual_seed(0)
    blk = Block(enc_cfg(norm_order="pre", layer_scale_init=0.1, qkv_bias="qv"), drop_path=0.0).eval()
    randomize(blk)
    x = rand(2, 6, 32, seed=1)
    out = blk(x)
    x_attn = x + blk.gamma1 * blk.attn(blk.norm1(x))
    expected_ffn = blk.gamma2 * blk.mlp(blk.norm2(x_attn))
    torch.testing.assert_close(out.ffn_out, expected_ffn)
    torch.testing.assert_close(out.x, x_attn + expected_ffn)


def test_ffn_out_excludes_dropout() -> None:
    # In training mode with dropout, ffn_out is the branch *before* dropout: x - x_attn != ffn_out.
    torch.manual_seed(0)
    blk = Block(enc_cfg(norm_order="pre", dropout=0.5), drop_path=0.0).train()
    randomize(blk)
    blk.attn.proj_drop.p = 0.0
    x = rand(2, 6, 32, seed=1)
    out = blk(x)
    x_attn = x + blk.attn(blk.norm1(x))
    torch.testing.assert_close(out.ffn_out, blk.mlp(blk.norm2(x_attn)))
    assert not torch.allclose(out.x - x_attn, out.ffn_out)


# ------------------------------------------------------------------ Attention


def manual_attention(att: Attention, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    B, T, D = x.shape
    H = att.num_heads
    dh = D // H
    W = att.qkv.weight
    wq, wk, wv = W[:D], W[D : 2 * D], W[2 * D :]
    bq = bk = bv = torch.zeros(D)
    if att.qkv.bias is not None:
        bq, bk, bv = att.qkv.bias[:D], att.qkv.bias[D : 2 * D], att.qkv.bias[2 * D :]
    if att.q_bias is not None:
        bq, bv = att.q_bias, att.v_bias
    out = torch.zeros(B, T, D)
    for b in range(B):
        q = x[b] @ wq.T + bq
        k = x[b] @ wk.T + bk
        v = x[b] @ wv.T + bv
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            scores = q[:, sl] @ k[:, sl].T / math.sqrt(dh)
            if bias is not None:
                bb = bias[b if bias.shape[0] > 1 else 0]
                scores = scores + bb[h if bb.shape[0] > 1 else 0]
            out[b, :, sl] = torch.softmax(scores, dim=-1) @ v[:, sl]
    return att.proj(out)


@pytest.mark.parametrize("qkv_bias", ["all", "qv", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_matches_manual(qkv_bias: str, with_bias: bool) -> None:
    torch.manual_seed(0)
    att = Attention(32, 4, qkv_bias, 0.0, 0.0).eval()
    randomize(att, scale=0.2)
    assert (att.qkv.bias is not None) == (qkv_bias == "all")
    assert (att.q_bias is not None) == (qkv_bias == "qv")
    x = rand(2, 5, 32, seed=3)
    bias = rand(2, 4, 5, 5, seed=4) if with_bias else None
    torch.testing.assert_close(att(x, bias), manual_attention(att, x, bias), rtol=1e-4, atol=1e-5)


def test_attention_broadcast_bias_and_padding_bias() -> None:
    torch.manual_seed(0)
    att = Attention(32, 4, "all", 0.0, 0.0).eval()
    randomize(att, scale=0.2)
    x = rand(2, 5, 32, seed=3)
    bias = rand(1, 4, 5, 5, seed=5)
    torch.testing.assert_close(att(x, bias), manual_attention(att, x, bias), rtol=1e-4, atol=1e-5)
    pad = torch.tensor([[False, False, False, True, True], [False] * 5])
    pb = padding_bias(pad)
    assert pb.shape == (2, 1, 1, 5)
    assert torch.isinf(pb[0, 0, 0, 3:]).all() and (pb[0, 0, 0, :3] == 0).all() and (pb[1] == 0).all()
    full = pb.expand(2, 4, 5, 5).clone()
    torch.testing.assert_close(att(x, pb), manual_attention(att, x, full), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm_order", ["pre", "post"])
def test_padding_hides_padded_keys(norm_order: str) -> None:
    torch.manual_seed(0)
    enc = Encoder(enc_cfg(norm_order=norm_order, input_norm=norm_order == "post")).eval()
    randomize(enc, scale=0.2)
    x = rand(2, 7, 32, seed=1)
    pad = torch.tensor([[False] * 5 + [True] * 2, [False] * 6 + [True]])
    out = enc(x, pad, keep_layers=3)
    x2 = x.clone()
    x2[pad] = rand(int(pad.sum()), 32, seed=9) * 10
    out2 = enc(x2, pad, keep_layers=3)
    keep = ~pad
    torch.testing.assert_close(out.x[keep], out2.x[keep])
    for a, b in zip(out.layers, out2.layers, strict=True):
        torch.testing.assert_close(a.x[keep], b.x[keep])
        torch.testing.assert_close(a.ffn_out[keep], b.ffn_out[keep])
    # and a sample alone (no padding) gives the same outputs as in the padded batch
    alone = enc(x[:1, :5])
    torch.testing.assert_close(out.x[0, :5], alone.x[0], rtol=1e-5, atol=1e-5)
    # sanity: without the padding mask the padded tokens do leak
    leak = enc(x2)
    assert not torch.allclose(leak.x[keep], out.x[keep])


# ------------------------------------------------------------------ Encoder


def test_encoder_keep_layers_last_k_main_blocks_only() -> None:
    torch.manual_seed(0)
    cfg = enc_cfg(prenet_depth=2, depth=3, norm_order="post", input_norm=True)
    enc = Encoder(cfg).eval()
    randomize(enc, scale=0.2)
    x = rand(2, 5, 32, seed=1)
    # manual run
    h = enc.input_norm(x)
    for blk in enc.prenet:
        h = blk(h).x
    mains = []
    for blk in enc.blocks:
        o = blk(h)
        mains.append(o)
        h = o.x
    for k in (0, 1, 2, 3):
        out = enc(x, keep_layers=k)
        assert len(out.layers) == k
        for got, exp in zip(out.layers, mains[3 - k :], strict=True):
            torch.testing.assert_close(got.x, exp.x)
            torch.testing.assert_close(got.ffn_out, exp.ffn_out)
        torch.testing.assert_close(out.x, h)
    assert len(enc(x).layers) == 0  # default keeps none
    # keep_layers larger than depth never reaches into the prenet
    assert len(enc(x, keep_layers=5).layers) == 3


def test_encoder_final_norm() -> None:
    torch.manual_seed(0)
    enc = Encoder(enc_cfg(norm_order="pre", final_norm=True)).eval()
    randomize(enc, scale=0.2)
    x = rand(2, 5, 32, seed=1)
    out = enc(x, keep_layers=1)
    torch.testing.assert_close(out.x, enc.final_norm(out.layers[-1].x))


def test_encoder_position_bias_requires_provider() -> None:
    with pytest.raises(ValueError):
        Encoder(enc_cfg(position_bias="shared"))


def test_encoder_per_layer_vs_shared_position_bias() -> None:
    def make() -> RelativePositionBias2d:
        return RelativePositionBias2d((2, 3), 4, cls_token=True)

    shared = Encoder(enc_cfg(position_bias="shared"), make)
    per = Encoder(enc_cfg(position_bias="per_layer"), make)
    assert shared.position_bias is not None and all(b.position_bias is None for b in shared.blocks)
    assert per.position_bias is None and all(b.position_bias is not None for b in per.blocks)
    # with identical tables the two are the same function
    randomize(shared, seed=1, scale=0.2)
    per.load_state_dict(
        {k: v for k, v in shared.state_dict().items() if not k.startswith("position_bias")}, strict=False
    )
    with torch.no_grad():
        for b in per.blocks:
            b.position_bias.table.copy_(shared.position_bias.table)
    x = rand(2, 7, 32, seed=2)
    torch.testing.assert_close(shared.eval()(x).x, per.eval()(x).x)


# ------------------------------------------------------------------ positions


@pytest.mark.parametrize("cls_token", [True, False])
def test_relative_position_bias_none_equals_arange(cls_token: bool) -> None:
    rpb = RelativePositionBias2d((3, 4), 4, cls_token=cls_token)
    with torch.no_grad():
        rpb.table.copy_(rand(*rpb.table.shape, seed=0))
    n = 12 + int(cls_token)
    full = rpb(None, n)
    assert full.shape == (1, 4, n, n)
    pos = torch.arange(n).expand(2, n)
    torch.testing.assert_close(rpb(pos, n), full.expand(2, -1, -1, -1))
    with pytest.raises(ValueError):
        rpb(None, n + 1)


def test_relative_position_bias_is_translation_invariant() -> None:
    rpb = RelativePositionBias2d((3, 4), 2, cls_token=True)
    with torch.no_grad():
        rpb.table.copy_(rand(*rpb.table.shape, seed=0))
    full = rpb(None, 13)[0]

    def tok(r: int, c: int) -> int:
        return 1 + r * 4 + c

    # same offset (+1 row, +1 col) -> same bias; the offset and its reverse differ
    assert torch.equal(full[:, tok(0, 0), tok(1, 1)], full[:, tok(1, 2), tok(2, 3)])
    assert not torch.equal(full[:, tok(0, 0), tok(1, 1)], full[:, tok(1, 1), tok(0, 0)])
    # CLS rows/cols use their own three entries
    n_rel = rpb.table.shape[0]
    assert torch.equal(full[:, 0, 5], rpb.table[n_rel - 3])
    assert torch.equal(full[:, 5, 0], rpb.table[n_rel - 2])
    assert torch.equal(full[:, 0, 0], rpb.table[n_rel - 1])


def test_sincos_2d_layout() -> None:
    h, w, dim = 3, 5, 16
    emb = sincos_2d(dim, (h, w))
    assert emb.shape == (h * w, dim)
    assert emb.dtype == torch.float32
    half = dim // 2
    grid = emb.view(h, w, dim)
    # first half depends on the column only, second half on the row only
    for r in range(h):
        for c in range(w):
            assert torch.equal(grid[r, c, :half], grid[0, c, :half])
            assert torch.equal(grid[r, c, half:], grid[r, 0, half:])
    assert not torch.equal(grid[0, 0, :half], grid[0, 1, :half])
    assert not torch.equal(grid[0, 0, half:], grid[1, 0, half:])
    cols = torch.arange(w).repeat(h)
    rows = torch.arange(h).repeat_interleave(w)
    torch.testing.assert_close(emb[:, :half], sincos_1d(half, cols).float())
    torch.testing.assert_close(emb[:, half:], sincos_1d(half, rows).float())
    # MAE formula for one entry: column 2, frequency index 1 (sin part)
    omega1 = 1.0 / 10000 ** (1 / (half / 2))
    assert float(grid[0, 2, 1]) == pytest.approx(math.sin(2 * omega1), abs=1e-6)
    assert float(grid[0, 2, half // 2 + 1]) == pytest.approx(math.cos(2 * omega1), abs=1e-6)
    with pytest.raises(ValueError):
        sincos_2d(18, (2, 2))


# ------------------------------------------------------------------ DropPath


def test_drop_path() -> None:
    dp = DropPath(0.5)
    x = torch.ones(400, 3, 2)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    torch.manual_seed(0)
    y = dp(x)
    per_sample = y.view(400, -1)
    # whole samples are dropped or scaled by 1/keep
    assert all(set(r.unique().tolist()) <= {0.0, 2.0} and len(r.unique()) == 1 for r in per_sample)
    frac = (per_sample[:, 0] == 0).float().mean()
    assert 0.35 < float(frac) < 0.65
    assert torch.equal(DropPath(0.0).train()(x), x)


# ------------------------------------------------------------------ ConvDecoder


def _changed_positions(dec: ConvDecoder, T: int, D: int, where: int) -> set[int]:
    x = rand(1, T, D, seed=0)
    base = dec(x)
    x2 = x.clone()
    x2[0, where] += 3.0
    diff = (dec(x2) - base).abs().sum(-1)[0]
    return set(torch.nonzero(diff > 1e-6).flatten().tolist())


def test_conv_decoder_2d_receptive_field_row_major() -> None:
    torch.manual_seed(0)
    cfg = DecoderConfig(dim=8, kernel_size=3, groups=2, layers=1, residual=False)
    dec = ConvDecoder(cfg, 8, grid=(4, 5)).eval()
    # token 6 = row 1, col 1 of a 4x5 grid: its 3x3 neighbourhood changes
    expected = {r * 5 + c for r in (0, 1, 2) for c in (0, 1, 2)}
    assert _changed_positions(dec, 20, 8, 6) == expected
    # token 9 = row 1, col 4 (right border): the neighbourhood does not wrap to the next row
    assert _changed_positions(dec, 20, 8, 9) == {r * 5 + c for r in (0, 1, 2) for c in (3, 4)}


def test_conv_decoder_even_kernel_keeps_length() -> None:
    torch.manual_seed(0)
    cfg = DecoderConfig(dim=8, kernel_size=2, groups=1, layers=1, residual=False)
    dec = ConvDecoder(cfg, 8, grid=(4, 5)).eval()
    assert dec(rand(2, 20, 8)).shape == (2, 20, 8)
    # SamePad drops the last step: output (i, j) sees inputs (i-1..i, j-1..j)
    assert _changed_positions(dec, 20, 8, 6) == {r * 5 + c for r in (1, 2) for c in (1, 2)}
    dec1 = ConvDecoder(cfg, 8, grid=None).eval()
    assert dec1(rand(2, 9, 8)).shape == (2, 9, 8)
    assert _changed_positions(dec1, 9, 8, 4) == {4, 5}


def test_conv_decoder_1d_receptive_field() -> None:
    torch.manual_seed(0)
    cfg = DecoderConfig(dim=8, kernel_size=3, groups=4, layers=2, residual=True)
    dec = ConvDecoder(cfg, 8, grid=None).eval()
    assert _changed_positions(dec, 12, 8, 6) == {4, 5, 6, 7, 8}


def test_conv_decoder_residual_and_projection() -> None:
    torch.manual_seed(0)
    cfg = DecoderConfig(dim=8, kernel_size=3, groups=2, layers=2, residual=True)
    dec = ConvDecoder(cfg, 12, grid=(2, 3)).eval()  # model width 12 != decoder width 8
    x = rand(2, 6, 12, seed=1)
    h = x.transpose(1, 2).reshape(2, 12, 2, 3)
    h = dec.blocks[0](h)  # channel count changes: no residual on the first block
    h = dec.blocks[1](h) + h
    expected = dec.proj(h.reshape(2, 8, 6).transpose(1, 2))
    torch.testing.assert_close(dec(x), expected)
    assert dec.blocks[0].conv.weight.shape == (8, 12 // 2, 3, 3)
    # the conv block: conv -> LayerNorm over channels (no affine) -> GELU
    blk = dec.blocks[1]
    z = rand(2, 8, 2, 3, seed=2)
    c = blk.conv(z).movedim(1, -1)
    ref = F.gelu(F.layer_norm(c, (8,))).movedim(-1, 1)
    torch.testing.assert_close(blk(z), ref)
    two = ConvDecoder(DecoderConfig(dim=8, groups=2, layers=1, projection_layers=2, projection_ratio=2.0), 12)
    assert isinstance(two.proj, torch.nn.Sequential) and two.proj[0].out_features == 16
