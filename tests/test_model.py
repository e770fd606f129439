"""End-to-end properties of `Data2Vec` (student + EMA teacher + objective), 1.0 and 2.0 modes."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data2vec.config import apply_overrides
from data2vec.masking import gather_tokens, mask_to_indices
from data2vec.modalities import Tokens
from data2vec.modalities.image import patchify
from data2vec.model import Batch, Data2Vec, no_weight_decay
from data2vec.nn.pos import RelativePositionBias2d
from data2vec.targets import feature_std

# sizes of the tiny configs built in conftest.py (checked in test_tiny_config_sizes)
NUM_TOKENS = 16
DEPTH = 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def student_params(model: Data2Vec) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not n.startswith("teacher.")}


def randomize_tables(model: Data2Vec, seed: int = 0) -> None:
    """Relative-position tables start at zero; give them values so that position bugs show."""
    g = gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RelativePositionBias2d):
                m.table.copy_(torch.randn(m.table.shape, generator=g) * 0.5)


def perturb(params, seed: int, scale: float = 0.05) -> None:
    g = gen(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_tiny_config_sizes(tiny_config) -> None:
    for version in (1, 2):
        cfg = tiny_config(version)
        assert cfg.model.image.grid == (4, 4) and cfg.model.encoder.depth == DEPTH
        assert cfg.model.encoder.dim == 32 and cfg.targets.top_k == 2


# ------------------------------------------------------------------ (a) gradients


@pytest.mark.parametrize("version", [1, 2])
def test_forward_backward_gradients(tiny_config, build_model, images, version: int) -> None:
    model = build_model(tiny_config(version))
    model.train()
    x = images(2)
    out = model(Batch(x), generator=gen(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.loss.requires_grad
    out.loss.backward()
    params = student_params(model)
    assert params
    for name, p in params.items():
        assert p.requires_grad, name
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    for name, p in model.teacher.named_parameters():
        assert p.grad is None, name
        assert not p.requires_grad, name
    for k in ("loss_reg", "loss_cls", "target_std", "pred_std", "masked_tokens"):
        assert k in out.metrics and not out.metrics[k].requires_grad
    if version == 2:
        assert out.metrics["masked_tokens"] == 2 * 2 * 12  # B*M rows, 12 of 16 masked
        torch.testing.assert_close(out.loss, out.metrics["loss_reg"] + 0.5 * out.metrics["loss_cls"])
    else:
        assert out.metrics["loss_cls"] == 0


def test_forward_checks_mask_shape(tiny_config, build_model, images) -> None:
    model = build_model(tiny_config(2))
    x = images(2)
    with pytest.raises(ValueError, match="mask has shape"):
        model(Batch(x, mask=torch.zeros(2, NUM_TOKENS, dtype=torch.bool)))  # needs B*M = 4 rows
    bad = model.draw_masks(2, gen(0))
    bad[0, (~bad[0]).nonzero()[0]] = True  # one row masks one more token
    with pytest.raises(ValueError, match="same number"):
        model(Batch(x, mask=bad))


def test_forward_is_deterministic_given_generator(tiny_config, build_model, images) -> None:
    model = build_model(tiny_config(2)).eval()
    x = images(2)
    # decoder noise uses the global RNG: fix it for the comparison
    torch.manual_seed(1)
    a = model(Batch(x), generator=gen(3)).loss
    torch.manual_seed(1)
    b = model(Batch(x), generator=gen(3)).loss
    assert torch.equal(a, b)
    torch.manual_seed(1)
    c = model(Batch(x), generator=gen(4)).loss  # another mask
    assert not torch.equal(a, c)


# ------------------------------------------------------------------ full objective by hand


def test_v1_objective_by_hand(tiny_config, build_model, images) -> None:
    cfg = tiny_config(1)
    model = build_model(cfg).eval()
    randomize_tables(model)
    x = images(2)
    mask = model.draw_masks(2, gen(1))
    out = model(Batch(x, mask=mask))

    tokens = model.frontend.local(x).x  # (B, T, D)
    ctx = model.frontend.context
    inp = torch.where(mask[..., None], ctx.mask_emb, tokens)
    inp = torch.cat([ctx.prefix.expand(2, -1, -1), inp], dim=1)
    enc = model.encoder(inp)
    pred = model.head(enc.x[:, 1:][mask])
    y = model.teacher_targets(x, Tokens(tokens, None))[mask]
    # [DV]: Smooth-L1, beta 2, mean over elements
    expected = F.smooth_l1_loss(pred, y, beta=2.0)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert out.metrics["masked_tokens"] == mask.sum()


def test_v2_objective_by_hand(tiny_config, build_model, images) -> None:
    cfg = tiny_config(2, masking__num_masks=1, model__decoder__mask_noise_std=0.0)
    model = build_model(cfg).eval()
    x = images(2)
    mask = model.draw_masks(2, gen(1))
    out = model(Batch(x, mask=mask))

    B, T, D = 2, NUM_TOKENS, 32
    tokens = model.frontend.local(x).x + model.frontend.context.positional.table
    ids_keep, ids_restore = mask_to_indices(mask)
    vis = torch.stack([tokens[b][~mask[b]] for b in range(B)])
    inp = torch.cat([model.frontend.context.prefix.expand(B, -1, -1), vis], dim=1)
    enc = model.encoder(inp)
    # decoder input: visible outputs at their slots, zeros (noise std 0) at masked ones
    dec_in = torch.zeros(B, T, D)
    for b in range(B):
        dec_in[b][~mask[b]] = enc.x[b, 1:]
    pred = model.head(dec_in)[mask]
    y_full = model.teacher_targets(x, Tokens(tokens, None))
    y = y_full[mask]
    reg = ((pred - y) ** 2).sum(-1).mean() / math.sqrt(D)
    cls = ((enc.x[:, 0] - y_full.mean(1)) ** 2).sum(-1).mean() / math.sqrt(D)
    torch.testing.assert_close(out.metrics["loss_reg"], reg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["loss_cls"], cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, reg + 0.5 * cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["target_std"], feature_std(y))
    torch.testing.assert_close(out.metrics["pred_std"], feature_std(pred), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ (b) M masks == M separate passes


def test_multi_mask_equals_separate_passes(tiny_config, build_model, images) -> None:
    cfg2 = tiny_config(2, model__decoder__mask_noise_std=0.0)
    assert cfg2.masking.num_masks == 2
    model2 = build_model(cfg2, seed=0).eval()
    cfg1 = apply_overrides(cfg2, ["masking.num_masks=1"])
    model1 = build_model(cfg1, seed=123).eval()
    model1.load_state_dict(model2.state_dict(), strict=True)
    # make the teacher differ from the student so that a mix-up would show
    perturb(model2.teacher.parameters(), seed=4)
    model1.teacher.load_state_dict(model2.teacher.state_dict(), strict=True)

    x = images(3)
    mask = model2.draw_masks(3, gen(5))
    assert mask.shape == (6, NUM_TOKENS)
    assert not torch.equal(mask[0::2], mask[1::2])
    with torch.no_grad():
        out2 = model2(Batch(x, mask=mask))
        out_a = model1(Batch(x, mask=mask[0::2]))
        out_b = model1(Batch(x, mask=mask[1::2]))
    for key in ("loss_reg", "loss_cls"):
        torch.testing.assert_close(
            out2.metrics[key], (out_a.metrics[key] + out_b.metrics[key]) / 2, rtol=1e-5, atol=1e-7
        )
    torch.testing.assert_close(out2.loss, (out_a.loss + out_b.loss) / 2, rtol=1e-5, atol=1e-7)
    assert out2.metrics["masked_tokens"] == out_a.metrics["masked_tokens"] + out_b.metrics["masked_tokens"]
    # and the two single-mask losses really differ (the test is not trivially satisfied)
    assert not torch.allclose(out_a.metrics["loss_reg"], out_b.metrics["loss_reg"])


# ------------------------------------------------------------------ (c) visible-only encoding


def _visible_only_checks(model: Data2Vec, x: torch.Tensor, mask: torch.Tensor) -> None:
    B = x.shape[0]
    tokens = model.frontend.local(x)
    ids_keep, _ = mask_to_indices(mask)
    enc_in = model.frontend.context(tokens, mask=mask, ids_keep=ids_keep)
    idx = torch.cat([torch.zeros(B, 1, dtype=torch.long), ids_keep + 1], dim=1)
    assert enc_in.positions is not None and torch.equal(enc_in.positions, idx)
    dropped = model.encoder(enc_in.x, enc_in.padding_mask, enc_in.positions, keep_layers=DEPTH)

    full = model.frontend.context(tokens, clean=True)  # positions added, CLS prepended, nothing masked
    assert full.x.shape == (B, 1 + NUM_TOKENS, 32)
    torch.testing.assert_close(enc_in.x, gather_tokens(full.x, idx))

    # the whole sequence with masked tokens hidden as keys gives the same visible outputs
    pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool), mask], dim=1)
    hidden = model.encoder(full.x, pad, None, keep_layers=DEPTH)
    torch.testing.assert_close(dropped.x, gather_tokens(hidden.x, idx), rtol=1e-5, atol=1e-5)
    for a, b in zip(dropped.layers, hidden.layers, strict=True):
        torch.testing.assert_close(a.ffn_out, gather_tokens(b.ffn_out, idx), rtol=1e-5, atol=1e-5)
    # sanity: attending to the masked tokens changes the result
    unhidden = model.encoder(full.x, None, None)
    assert not torch.allclose(dropped.x, gather_tokens(unhidden.x, idx), atol=1e-4)


def test_visible_only_encoding_sincos(tiny_config, build_model, images) -> None:
    model = build_model(tiny_config(2, masking__num_masks=1)).eval()
    x = images(2)
    mask = model.draw_masks(2, gen(2))
    _visible_only_checks(model, x, mask)
    # explicit gather of the full context output, run through the encoder
    tokens = model.frontend.local(x)
    ids_keep, _ = mask_to_indices(mask)
    full = model.frontend.context(tokens, clean=True)
    idx = torch.cat([torch.zeros(2, 1, dtype=torch.long), ids_keep + 1], dim=1)
    ref = model.encoder(gather_tokens(full.x, idx))
    enc_in = model.frontend.context(tokens, mask=mask, ids_keep=ids_keep)
    got = model.encoder(enc_in.x, enc_in.padding_mask, enc_in.positions)
    torch.testing.assert_close(got.x, ref.x)


@pytest.mark.parametrize("position_bias", ["shared", "per_layer"])
def test_visible_only_encoding_relative_bias(tiny_config, build_model, images, position_bias: str) -> None:
    # data2vec 1.0 vision architecture (pre-LN, rel-pos bias, no absolute positions) run in 2.0 mode
    cfg = tiny_config(
        2,
        masking__num_masks=1,
        model__encoder__norm_order="pre",
        model__encoder__layer_scale_init=0.1,
        model__encoder__qkv_bias="qv",
        model__encoder__position_bias=position_bias,
        model__encoder__input_norm=False,
        model__encoder__final_norm=True,
        model__image__positions="none",
    )
    model = build_model(cfg).eval()
    randomize_tables(model, seed=7)
    x = images(2)
    mask = model.draw_masks(2, gen(3))
    _visible_only_checks(model, x, mask)

    ids_keep, _ = mask_to_indices(mask)
    idx = torch.cat([torch.zeros(2, 1, dtype=torch.long), ids_keep + 1], dim=1)
    rpbs = (
        [model.encoder.position_bias] if position_bias == "shared" else [b.position_bias for b in model.encoder.blocks]
    )
    for rpb in rpbs:
        full_bias = rpb(None, 1 + NUM_TOKENS)[0]  # (H, N, N)
        sub = rpb(idx, idx.shape[1])  # (B, H, T', T')
        for b in range(2):
            torch.testing.assert_close(sub[b], full_bias[:, idx[b]][:, :, idx[b]])

    if position_bias == "shared":
        # encoder on the gathered tokens with positions == blocks run with the sub-matrix of the bias
        tokens = model.frontend.local(x)
        enc_in = model.frontend.context(tokens, mask=mask, ids_keep=ids_keep)
        got = model.encoder(enc_in.x, None, enc_in.positions).x
        full_bias = model.encoder.position_bias(None, 1 + NUM_TOKENS)[0]
        bias = torch.stack([full_bias[:, idx[b]][:, :, idx[b]] for b in range(2)])
        h = enc_in.x
        for blk in model.encoder.blocks:
            h = blk(h, bias).x
        torch.testing.assert_close(got, model.encoder.final_norm(h), rtol=1e-5, atol=1e-5)
        # with positions=None the wrong (un-gathered) bias would be needed: it refuses
        with pytest.raises(ValueError):
            model.encoder(enc_in.x, None, None)

    # the training forward runs with it
    out = model(Batch(x, mask=mask))
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------ (d) teacher targets


@pytest.mark.parametrize("version", [1, 2])
def test_teacher_targets_by_hand(tiny_config, build_model, images, ref_targets, version: int) -> None:
    cfg = tiny_config(version)
    model = build_model(cfg).eval()
    randomize_tables(model)
    perturb(model.teacher.parameters(), seed=11, scale=0.1)  # teacher != student
    x = images(2)
    tokens = model.frontend.local(x)
    got = model.teacher_targets(x, tokens)
    assert got.shape == (2, NUM_TOKENS, 32) and got.dtype == torch.float32
    assert not got.requires_grad

    t = model.teacher
    with torch.no_grad():
        t_tokens = t["local"](x)
        enc_in = t["context"](t_tokens, clean=True)
        out = t["encoder"](enc_in.x, enc_in.padding_mask, enc_in.positions, keep_layers=DEPTH)
    tc = cfg.targets
    layers = [(o.x if tc.layer_source == "block" else o.ffn_out)[:, 1:].numpy() for o in out.layers]
    assert len(layers) == DEPTH
    expected = ref_targets(layers, tc.top_k, tc.layer_norm, tc.final_norm)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)

    # the wrong layer source would give different targets
    other = [(o.ffn_out if tc.layer_source == "block" else o.x)[:, 1:].numpy() for o in out.layers]
    assert not np.allclose(ref_targets(other, tc.top_k, tc.layer_norm, tc.final_norm), expected, atol=1e-2)
    # ...and so would the student's weights
    with torch.no_grad():
        s_out = model.encoder(model.frontend.context(tokens, clean=True).x, keep_layers=DEPTH)
    s_layers = [(o.x if tc.layer_source == "block" else o.ffn_out)[:, 1:].numpy() for o in s_out.layers]
    assert not np.allclose(ref_targets(s_layers, tc.top_k, tc.layer_norm, tc.final_norm), expected, atol=1e-2)


@pytest.mark.parametrize("version", [1, 2])
def test_forward_uses_unmasked_teacher_targets(tiny_config, build_model, images, version: int) -> None:
    # The teacher never sees masked input: the forward's targets are the unmasked targets
    # selected at the masked positions (repeated per mask in 2.0), whatever the mask.
    model = build_model(tiny_config(version)).eval()
    randomize_tables(model)
    perturb(model.teacher.parameters(), seed=3, scale=0.1)
    x = images(2)
    y = model.teacher_targets(x, model.frontend.local(x))
    M = model.masking.num_masks if version == 2 else 1
    y_rep = y.repeat_interleave(M, 0)
    for seed in (0, 1):
        mask = model.draw_masks(2, gen(seed))
        out = model(Batch(x, mask=mask))
        torch.testing.assert_close(out.metrics["target_std"], feature_std(y_rep[mask]))
        assert out.metrics["masked_tokens"] == mask.sum()


# ------------------------------------------------------------------ (e) bf16 autocast


@pytest.mark.parametrize("version", [1, 2])
def test_bf16_autocast_matches_fp32(tiny_config, build_model, images, version: int) -> None:
    cfg = tiny_config(version, model__decoder__mask_noise_std=0.0)
    model32 = build_model(cfg).train()
    model16 = copy.deepcopy(model32)
    x = images(2)
    mask = model32.draw_masks(2, gen(0))

    out32 = model32(Batch(x, mask=mask))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model16(Batch(x, mask=mask))
    assert out16.loss.dtype == torch.float32
    assert torch.isfinite(out16.loss)
    l16, l32 = out16.loss.item(), out32.loss.item()
    assert abs(l16 - l32) / abs(l32) < 5e-2, (l16, l32)

    before = {n: p.detach().clone() for n, p in student_params(model32).items()}
    opt32 = torch.optim.AdamW(student_params(model32).values(), lr=1e-3)
    opt16 = torch.optim.AdamW(student_params(model16).values(), lr=1e-3)
    out32.loss.backward()
    out16.loss.backward()
    opt32.step()
    opt16.step()
    p32 = student_params(model32)
    p16 = student_params(model16)
    d32 = torch.cat([(p32[n].detach() - before[n]).flatten() for n in before])
    d16 = torch.cat([(p16[n].detach() - before[n]).flatten() for n in before])
    for n in before:
        assert p16[n].dtype == torch.float32
        assert torch.isfinite(p16[n]).all()
        torch.testing.assert_close(p16[n], p32[n], rtol=0, atol=2.1e-3)
    # Adam's first step is ~ lr * sign(grad): the two updates must agree almost everywhere
    cos = F.cosine_similarity(d32, d16, dim=0)
    assert cos > 0.9, float(cos)
    disagree = ((d32 - d16).abs() > 5e-4).float().mean()
    assert disagree < 0.1, float(disagree)
    # the step did move the parameters
    assert d32.abs().mean() > 1e-4


# ------------------------------------------------------------------ (f) EMA after an optimizer step


@pytest.mark.parametrize("version", [1, 2])
def test_update_teacher_after_step_moves_towards_student(tiny_config, build_model, images, version: int) -> None:
    model = build_model(tiny_config(version)).train()
    x = images(2)
    opt = torch.optim.AdamW(student_params(model).values(), lr=1e-2)
    model(Batch(x), generator=gen(0)).loss.backward()
    opt.step()
    student = model.student_parts()
    t_before = {
        (name, k): p.detach().clone() for name, part in model.teacher.parts.items() for k, p in part.named_parameters()
    }
    gaps_before = {key: (t - dict(student[key[0]].named_parameters())[key[1]].detach()) for key, t in t_before.items()}
    total_before = sum(float(g.norm() ** 2) for g in gaps_before.values()) ** 0.5
    assert total_before > 0  # the student moved, the teacher did not
    y_before = model.teacher_targets(x, model.frontend.local(x))

    decay = 0.9
    model.update_teacher(decay)
    total_after = 0.0
    for (name, k), gap in gaps_before.items():
        new_gap = dict(model.teacher[name].named_parameters())[k] - dict(student[name].named_parameters())[k].detach()
        torch.testing.assert_close(new_gap, decay * gap, rtol=1e-4, atol=1e-7)
        total_after += float(new_gap.norm() ** 2)
    assert total_after**0.5 == pytest.approx(decay * total_before, rel=1e-4)
    y_after = model.teacher_targets(x, model.frontend.local(x))
    assert not torch.allclose(y_before, y_after)
    # the optimizer does not see the teacher
    opt_ids = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not any(id(p) in opt_ids for p in model.teacher.parameters())


# ------------------------------------------------------------------ (g) the teacher starts as a copy


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "scope, parts",
    [
        ("local", {"local", "context", "encoder"}),
        ("context", {"context", "encoder"}),
        ("encoder", {"encoder"}),
    ],
)
def test_teacher_starts_as_exact_copy(tiny_config, build_model, version: int, scope: str, parts: set) -> None:
    model = build_model(tiny_config(version, teacher__ema_scope=scope))
    student = model.student_parts()
    assert set(model.teacher.parts) == parts == set(student)
    for name, part in model.teacher.parts.items():
        s_state = dict(student[name].named_parameters()) | dict(student[name].named_buffers())
        t_state = dict(part.named_parameters()) | dict(part.named_buffers())
        assert s_state.keys() == t_state.keys()
        for k, t in t_state.items():
            s = s_state[k]
            assert torch.equal(t, s), f"{name}.{k}"
            assert t.data_ptr() != s.data_ptr(), f"{name}.{k} shares storage"
    # student-only modules (head/decoder) are not in the teacher
    assert not any(k.startswith("teacher.parts.head") for k in model.state_dict())
    # the pre-LN BEiT rescale happened before the copy
    if version == 1:
        assert torch.equal(model.teacher["encoder"].blocks[2].mlp.fc2.weight, model.encoder.blocks[2].mlp.fc2.weight)


def test_teacher_and_student_state_dict_split(tiny_config, build_model) -> None:
    model = build_model(tiny_config(2))
    s, t = model.student_state_dict(), model.teacher_state_dict()
    assert s and t and not (s.keys() & t.keys())
    assert set(s) | set(t) == set(model.state_dict())
    for k, v in t.items():
        sk = k.replace("teacher.parts.local.", "frontend.local.").replace("teacher.parts.context.", "frontend.context.")
        sk = sk.replace("teacher.parts.encoder.", "encoder.")
        assert torch.equal(v, s[sk]), k


# ------------------------------------------------------------------ (h) shared stages


def test_ema_scope_encoder_uses_clean_student_context(tiny_config, build_model, images) -> None:
    cfg = tiny_config(
        2,
        teacher__ema_scope="encoder",
        model__encoder__dropout=0.3,
        model__encoder__attn_dropout=0.2,
        model__encoder__drop_path=0.2,
    )
    model = build_model(cfg)
    assert set(model.teacher.parts) == {"encoder"}
    # the image front-end builds its context with dropout 0; switch it on to test `clean`
    model.frontend.context.dropout = 0.5
    model.train()
    x = images(2)
    tokens = model.frontend.local(x)
    # sanity: the student context is noisy in train mode
    a = model.frontend.context(tokens).x
    b = model.frontend.context(tokens).x
    assert not torch.equal(a, b)
    y1 = model.teacher_targets(x, tokens)
    y2 = model.teacher_targets(x, tokens)
    assert torch.equal(y1, y2)
    # and equal to the fully clean (eval) computation
    model.eval()
    y_eval = model.teacher_targets(x, tokens)
    torch.testing.assert_close(y1, y_eval)
    # the shared context is the student's: changing the student CLS changes the targets
    with torch.no_grad():
        model.frontend.context.prefix.add_(1.0)
    assert not torch.allclose(model.teacher_targets(x, tokens), y_eval)
    # a training step still runs
    model.train()
    out = model(Batch(x), generator=gen(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_shared_local_stage_reads_student_tokens(tiny_config, build_model, images) -> None:
    x = images(2)
    for scope, depends in (("local", False), ("context", True), ("encoder", True)):
        model = build_model(tiny_config(2, teacher__ema_scope=scope)).eval()
        tokens = model.frontend.local(x)
        other = Tokens(tokens.x + 0.5 * torch.randn(tokens.x.shape, generator=gen(1)), None)
        y1 = model.teacher_targets(x, tokens)
        y2 = model.teacher_targets(x, other)
        assert (not torch.allclose(y1, y2)) == depends, scope
        # at init the teacher is a copy, so every scope gives the same targets
        if scope == "local":
            ref = y1
        else:
            torch.testing.assert_close(y1, ref)


# ------------------------------------------------------------------ front-end and helpers


def test_patch_embed_row_major(tiny_config, build_model, images) -> None:
    model = build_model(tiny_config(2))
    pe = model.frontend.local
    x = images(2)
    tokens = pe(x)
    assert tokens.x.shape == (2, NUM_TOKENS, 32) and tokens.padding_mask is None
    patches = patchify(x, 8)  # (B, T, p*p*C), row-major patches, (p, q, c) inside
    assert patches.shape == (2, NUM_TOKENS, 8 * 8 * 3)
    # patch (row 1, col 2) is the pixel block [8:16, 16:24]
    torch.testing.assert_close(patches[0, 1 * 4 + 2], x[0, :, 8:16, 16:24].permute(1, 2, 0).reshape(-1))
    w = pe.proj.weight.permute(0, 2, 3, 1).reshape(32, -1)
    torch.testing.assert_close(tokens.x, patches @ w.T + pe.proj.bias, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="expected images"):
        pe(torch.zeros(2, 3, 32, 24))
    with pytest.raises(ValueError, match="expected images"):
        pe(torch.zeros(2, 1, 32, 32))


def test_no_weight_decay_selection(tiny_config, build_model) -> None:
    model = build_model(tiny_config(1))
    decayed = {n for n, p in student_params(model).items() if not no_weight_decay(n, p)}
    assert "encoder.blocks.0.attn.qkv.weight" in decayed
    assert "encoder.blocks.0.mlp.fc1.weight" in decayed
    assert "head.weight" in decayed
    for n in (
        "encoder.blocks.0.attn.qkv.weight",
        "encoder.blocks.0.mlp.fc2.weight",
        "frontend.local.proj.weight",
    ):
        assert n in decayed
    for n in (
        "encoder.blocks.0.norm1.weight",
        "encoder.blocks.0.attn.q_bias",
        "encoder.blocks.0.gamma1",
        "encoder.position_bias.table",
        "frontend.context.prefix",
        "frontend.context.mask_emb",
        "head.bias",
    ):
        assert n not in decayed, n


# ------------------------------------------------------------------ regressions (bugs found and fixed)


def test_post_ln_layer_scale_is_rejected(tiny_config) -> None:
    """Post-LN blocks have no LayerScale; asking for it would create parameters that never train."""
    from data2vec.config import ConfigError

    with pytest.raises(ConfigError, match="layer_scale_init"):
        tiny_config(2, model__encoder__layer_scale_init=0.1)
