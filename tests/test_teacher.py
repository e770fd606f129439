"""The EMA teacher and the schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from data2vec.schedules import cosine_lr, ema_decay
from data2vec.teacher import EMATeacher


def perturb_student(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.student_parts().values():
            for q in p.parameters():
                q.add_(torch.randn(q.shape, generator=g) * 0.1)


def teacher_snapshot(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, part in model.teacher.parts.items():
        for k, v in list(part.named_parameters()) + list(part.named_buffers()):
            out[f"{name}.{k}"] = v.detach().clone()
    return out


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("decay", [0.9, 0.999, 0.0])
def test_ema_update_rule_every_param(tiny_config, build_model, version: int, decay: float) -> None:
    model = build_model(tiny_config(version))
    perturb_student(model)
    # make the teacher differ from the student too, independently
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    old = teacher_snapshot(model)
    student = model.student_parts()
    model.update_teacher(decay)
    n_checked = 0
    for name, part in model.teacher.parts.items():
        s_params = dict(student[name].named_parameters())
        t_params = dict(part.named_parameters())
        assert set(s_params) == set(t_params)
        for pname, tp in t_params.items():
            # exact value in float64; the fp32 teacher must be within rounding of it
            expected = decay * old[f"{name}.{pname}"].double() + (1 - decay) * s_params[pname].detach().double()
            assert tp.dtype == torch.float32
            torch.testing.assert_close(tp.double(), expected, rtol=0, atol=1e-7, msg=f"{name}.{pname}")
            n_checked += 1
    assert n_checked == sum(1 for _ in model.teacher.parameters())
    assert n_checked > 20


def test_integer_buffer_untouched_by_ema(tiny_config, build_model) -> None:
    model = build_model(tiny_config(1))  # shared relative position bias in the encoder
    s_index = model.encoder.position_bias.index
    t_index = model.teacher["encoder"].position_bias.index
    assert s_index.dtype == torch.long
    # non-persistent, but still a registered buffer
    assert "position_bias.index" in dict(model.teacher["encoder"].named_buffers())
    assert "encoder.position_bias.index" not in model.state_dict()
    original = t_index.clone()
    assert torch.equal(s_index, original)
    with torch.no_grad():
        s_index.add_(3)
    perturb_student(model)
    for decay in (0.5, 0.9999):
        model.update_teacher(decay)
        assert torch.equal(model.teacher["encoder"].position_bias.index, original)
        assert model.teacher["encoder"].position_bias.index.dtype == torch.long


def test_float_buffers_copied_from_student(tiny_config, build_model) -> None:
    model = build_model(tiny_config(2))  # sin-cos table is a float buffer in the context stage
    s_table = model.frontend.context.positional.table
    t_table = model.teacher["context"].positional.table
    assert torch.equal(s_table, t_table)
    with torch.no_grad():
        s_table.mul_(2.0)
    model.update_teacher(0.9)
    assert torch.equal(model.teacher["context"].positional.table, s_table)


def test_decay_one_leaves_teacher_bit_identical(tiny_config, build_model) -> None:
    model = build_model(tiny_config(2))
    perturb_student(model)
    with torch.no_grad():
        model.frontend.context.positional.table.mul_(2.0)  # a float buffer: not copied either
    before = teacher_snapshot(model)
    model.update_teacher(1.0)
    after = teacher_snapshot(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_teacher_stays_in_eval_mode(tiny_config, build_model) -> None:
    model = build_model(tiny_config(1, model__encoder__dropout=0.3, model__encoder__drop_path=0.2))
    model.train()
    assert model.training and model.encoder.training
    assert not model.teacher.training
    assert all(not m.training for m in model.teacher.modules())
    model.teacher.train()
    assert all(not m.training for m in model.teacher.modules())
    model.eval()
    model.train(True)
    assert all(not m.training for m in model.teacher.modules())


def test_teacher_params_have_no_grad(tiny_config, build_model) -> None:
    model = build_model(tiny_config(1))
    params = list(model.teacher.parameters())
    assert params
    assert all(not p.requires_grad for p in params)
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("teacher."))
    model.update_teacher(0.5)
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_update_rejects_mismatched_parts() -> None:
    t = EMATeacher({"a": nn.Linear(2, 2)})
    with pytest.raises(ValueError):
        t.update({"b": nn.Linear(2, 2)}, 0.5)


def test_teacher_is_a_deep_copy_in_fp32() -> None:
    lin = nn.Linear(3, 3).bfloat16()
    t = EMATeacher({"lin": lin})
    assert t["lin"] is not lin
    assert t["lin"].weight.dtype == torch.float32
    assert torch.equal(t["lin"].weight, lin.weight.float())
    with torch.no_grad():
        lin.weight.add_(1.0)
    assert not torch.equal(t["lin"].weight, lin.weight.float())


# ------------------------------------------------------------------ schedules


def test_ema_decay_linear_anneal_then_hold() -> None:
    start, end, T = 0.999, 0.9999, 1000
    assert ema_decay(0, start, end, T) == pytest.approx(start, abs=1e-12)
    assert ema_decay(T // 2, start, end, T) == pytest.approx((start + end) / 2, abs=1e-12)
    assert ema_decay(T // 4, start, end, T) == pytest.approx(start + 0.25 * (end - start), abs=1e-12)
    assert ema_decay(T, start, end, T) == end
    assert ema_decay(2 * T, start, end, T) == end
    assert ema_decay(5, start, end, 0) == end
    values = [ema_decay(s, start, end, T) for s in range(0, T + 1, 50)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))


def test_cosine_lr() -> None:
    peak, final, warm, total = 1e-3, 1e-5, 10, 110
    # warm-up: linear from peak/warmup to peak
    assert cosine_lr(0, total, peak, final, warm) == pytest.approx(peak / warm)
    assert cosine_lr(4, total, peak, final, warm) == pytest.approx(peak * 5 / warm)
    assert cosine_lr(warm - 1, total, peak, final, warm) == pytest.approx(peak)
    # peak right after warm-up, then cosine
    assert cosine_lr(warm, total, peak, final, warm) == pytest.approx(peak)
    mid = warm + (total - warm) // 2
    assert cosine_lr(mid, total, peak, final, warm) == pytest.approx((peak + final) / 2)
    q = warm + (total - warm) // 4
    assert cosine_lr(q, total, peak, final, warm) == pytest.approx(
        final + 0.5 * (peak - final) * (1 + math.cos(math.pi / 4))
    )
    assert cosine_lr(total, total, peak, final, warm) == final
    assert cosine_lr(total + 100, total, peak, final, warm) == final
    # no warm-up: starts at peak
    assert cosine_lr(0, 100, peak) == pytest.approx(peak)
    assert cosine_lr(100, 100, peak) == 0.0
    lrs = [cosine_lr(s, total, peak, final, warm) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
