"""Numbers that lie: exploding weights and losses, rewinds that replay the same statistics, runs
that skip most of their steps, collapse monitors that are off, and "the last good checkpoint"."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.test_train import tiny_run_config

import data2vec.model as model_module
import data2vec.training.engine as engine_module
from data2vec.checkpoint import list_checkpoints, load_latest
from data2vec.config import ConfigError, apply_overrides
from data2vec.presets import PRESETS, preset
from data2vec.presets_audio import AUDIO_PRESETS
from data2vec.presets_text import TEXT_PRESETS
from data2vec.training import TrainingStopped, train


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def _lr_jump_at(monkeypatch: pytest.MonkeyPatch, step: int, lr: float) -> None:
    """From optimizer step `step` (1-based) on, the learning rate is `lr`."""
    real = engine_module.set_lr
    calls = {"n": 0}

    def jumping(optimizer: torch.optim.Optimizer, value: float) -> None:
        calls["n"] += 1
        real(optimizer, lr if calls["n"] >= step else value)

    monkeypatch.setattr(engine_module, "set_lr", jumping)


def _scale_loss_at(monkeypatch: pytest.MonkeyPatch, calls_hit: set[int], factor: float) -> list[float]:
    """regression_loss (one call per 1.0 step) times `factor` at the given calls; returns the
    losses seen, call by call."""
    real = model_module.regression_loss
    seen: list[float] = []

    def scaled(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real(*args, **kwargs)
        seen.append(float(out.detach().float().sum()))
        return out * factor if len(seen) in calls_hit else out

    monkeypatch.setattr(model_module, "regression_loss", scaled)
    return seen


# ---------------------------------------------------------------- weights checked at save time


def test_huge_weights_are_never_saved_and_the_last_good_checkpoint_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _lr_jump_at(monkeypatch, step=3, lr=1e3)  # steps 3 and 4 move every weight by ~1000
    cfg = tiny_run_config(1, "train.steps=6", "train.ckpt_every=2", "train.keep_last=5")
    with pytest.raises(TrainingStopped) as e:
        train(cfg, tmp_path / "run", progress=False, quiet=True)
    msg = str(e.value)
    assert "weights after step 4" in msg and "train.max_weight_abs" in msg, msg
    assert "not saved" in msg and "last good checkpoint is step 2" in msg, msg
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]
    ck = load_latest(tmp_path / "run")
    assert ck is not None and max(float(v.abs().max()) for v in ck.student.values()) < 100


def test_weights_over_the_bound_with_no_checkpoint_yet_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _lr_jump_at(monkeypatch, step=1, lr=1e3)
    cfg = tiny_run_config(1, "train.steps=4", "train.ckpt_every=2")
    with pytest.raises(TrainingStopped, match="no checkpoint has been written") as e:
        train(cfg, tmp_path / "run", progress=False, quiet=True)
    assert "step 0" not in str(e.value)
    assert list_checkpoints(tmp_path / "run") == []


def test_the_weight_bound_follows_the_weights_the_run_started_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A model whose weights are legitimately large (an imported checkpoint, say) is not refused.
    cfg = tiny_run_config(1, "train.steps=2", "train.ckpt_every=2", "train.max_weight_abs=0.5")
    result = train(cfg, tmp_path / "run", progress=False, quiet=True)  # LayerNorm weights are 1 at init
    assert result.step == 2 and len(list_checkpoints(tmp_path / "run")) == 1


# ---------------------------------------------------------------- loss explosions


def test_a_loss_explosion_stops_like_a_non_finite_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _scale_loss_at(monkeypatch, {7}, 1e8)
    cfg = tiny_run_config(1, "train.steps=10", "train.ckpt_every=4")
    with pytest.raises(TrainingStopped, match=r"loss explosion at step 7 .* times the running median") as e:
        train(cfg, tmp_path / "run", progress=False, quiet=True)
    assert "train.max_loss_ratio" in str(e.value) and "last good checkpoint is step 4" in str(e.value)


def test_a_loss_explosion_under_skip_is_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _scale_loss_at(monkeypatch, {7}, 1e8)
    cfg = tiny_run_config(1, "train.steps=8", "train.ckpt_every=4", "train.on_nan=skip")
    assert train(cfg, tmp_path / "run", progress=False, quiet=True).step == 8
    assert _summary(tmp_path / "run")["nan_skipped_steps"] == 1


def test_loss_explosion_check_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _scale_loss_at(monkeypatch, {7}, 1e8)
    cfg = tiny_run_config(1, "train.steps=8", "train.ckpt_every=4", "train.max_loss_ratio=0", "train.max_weight_abs=0")
    assert train(cfg, tmp_path / "run", progress=False, quiet=True).step == 8


# ---------------------------------------------------------------- skipped steps


def test_on_nan_skip_stops_when_most_steps_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _scale_loss_at(monkeypatch, set(range(2, 100)), math.inf)  # every step from the second on
    cfg = tiny_run_config(1, "train.steps=20", "train.ckpt_every=2", "train.on_nan=skip")
    with pytest.raises(TrainingStopped, match=r"skipped 5 of the 6 steps so far .*train.max_nan_share=0.2"):
        train(cfg, tmp_path / "run", progress=False, quiet=True)
    assert _summary(tmp_path / "run")["nan_skipped_steps"] == 5


# ---------------------------------------------------------------- rewinds change the data


def test_a_rewind_sees_new_data_and_masks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _scale_loss_at(monkeypatch, set(), 1.0)
    real_std = model_module.feature_std
    calls = {"n": 0}

    def collapse_once(x: torch.Tensor) -> torch.Tensor:  # two calls per step: target std, prediction std
        calls["n"] += 1
        return real_std(x) * 0 if calls["n"] == 7 else real_std(x)  # the target std of step 4

    monkeypatch.setattr(model_module, "feature_std", collapse_once)
    cfg = tiny_run_config(
        1,
        "train.steps=6",
        "train.ckpt_every=2",
        "train.collapse_after=1",
        "train.on_collapse=rewind",
        "train.min_target_std=0.1",
        "train.min_pred_std=0",
    )
    result = train(cfg, tmp_path / "run", progress=False, quiet=True)
    assert result.step == 6 and _summary(tmp_path / "run")["rewinds"] == 1
    # Calls 1-4 are steps 1-4; the rewind restores step 2, so call 5 is step 3 again: same weights,
    # and it must not be the same data and masks.
    assert len(seen) == 8
    assert seen[4] != pytest.approx(seen[2], rel=1e-6), seen
    assert "new data order and masks" in (tmp_path / "run" / "train.log").read_text()


def test_a_resume_after_a_rewind_continues_the_rewound_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_std = model_module.feature_std
    calls = {"n": 0}

    def collapse_once(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return real_std(x) * 0 if calls["n"] == 7 else real_std(x)

    overrides = (
        "train.steps=6",
        "train.ckpt_every=1",
        "train.keep_last=10",
        "train.collapse_after=1",
        "train.on_collapse=rewind",
        "train.min_target_std=0.1",
        "train.min_pred_std=0",
    )
    monkeypatch.setattr(model_module, "feature_std", collapse_once)
    whole = train(tiny_run_config(1, *overrides), tmp_path / "whole", progress=False, quiet=True)
    calls["n"] = 0
    train(tiny_run_config(1, *overrides), tmp_path / "split", progress=False, quiet=True, stop_after=5)
    monkeypatch.setattr(model_module, "feature_std", real_std)
    split = train(tiny_run_config(1, *overrides), tmp_path / "split", resume=True, progress=False, quiet=True)
    assert whole.step == split.step == 6
    rows = [json.loads(ln) for ln in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    rows_split = [json.loads(ln) for ln in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in rows_split], rel=1e-6)


# ---------------------------------------------------------------- "the last good checkpoint"


def test_a_stop_before_any_checkpoint_does_not_name_step_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _scale_loss_at(monkeypatch, {1}, math.inf)
    cfg = tiny_run_config(1, "train.steps=4", "train.ckpt_every=2")
    with pytest.raises(TrainingStopped) as e:
        train(cfg, tmp_path / "run", progress=False, quiet=True)
    assert "step 0" not in str(e.value) and "no checkpoint has been written" in str(e.value).lower()


def test_a_collapse_before_any_checkpoint_does_not_name_step_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_module, "feature_std", lambda x: torch.zeros(x.shape[-1]).mean())
    cfg = tiny_run_config(1, "train.steps=4", "train.ckpt_every=2", "train.collapse_after=0")
    with pytest.raises(TrainingStopped, match="collapse") as e:
        train(cfg, tmp_path / "run", progress=False, quiet=True)
    assert "step 0" not in str(e.value) and "no checkpoint has been written" in str(e.value).lower()


# ---------------------------------------------------------------- collapse thresholds


def _all_presets() -> list[tuple[str, int]]:
    tables = (PRESETS, AUDIO_PRESETS, TEXT_PRESETS)
    return [(n, v) for table in tables for n, versions in table.items() for v in versions]


@pytest.mark.parametrize(("name", "version"), _all_presets())
def test_every_preset_has_a_working_collapse_monitor(name: str, version: int) -> None:
    tc = preset(name, version).train
    assert tc.min_target_std > 0 and tc.min_pred_std > 0, (name, version)
    assert tc.collapse_after < tc.steps, (name, version)


def test_nan_thresholds_are_refused() -> None:
    base = preset("digits-tiny", 2)
    for key in ("min_target_std", "min_pred_std", "min_local_std", "max_loss_ratio", "max_weight_abs"):
        with pytest.raises(ConfigError, match=f"train.{key}"):
            apply_overrides(base, [f"train.{key}=nan"])


def test_a_collapse_monitor_that_is_off_is_said_once(tmp_path: Path) -> None:
    cfg = tiny_run_config(1, "train.steps=3", "train.min_target_std=0", "train.min_pred_std=0")
    train(cfg, tmp_path / "run", progress=False, quiet=True)
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("collapse monitor is off") == 1, log


def test_mask_leaving_no_visible_token_is_warned(tmp_path: Path) -> None:
    cfg = tiny_run_config(2, "train.steps=2", "masking.mask_prob=0.999")
    train(cfg, tmp_path / "run", progress=False, quiet=True)
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("no visible token") == 1, log
    assert "masking.mask_prob=0.999" in log


# ---------------------------------------------------------------- precision


def test_auto_precision_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    from data2vec.training import devices

    cpu, real = torch.device("cpu"), devices.native_bf16
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(devices, "native_bf16", lambda kind, native=native: native)
        assert devices.resolve_precision(cpu, "auto") == want
        assert devices.resolve_precision(cpu, "fp32") == "fp32" and devices.resolve_precision(cpu, "bf16") == "bf16"
        assert (devices.precision_warning(cpu, "bf16") is None) == native
        assert devices.precision_warning(cpu, "auto") is None
    assert preset("image-base", 2).train.precision == "auto"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if cpuinfo:  # what the kernel says this CPU has
        assert real("cpu") == ("amx_tile" in cpuinfo or "avx512_bf16" in cpuinfo)


def test_emulated_bf16_is_warned_in_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from data2vec.training import devices

    monkeypatch.setattr(devices, "native_bf16", lambda kind: False)
    train(tiny_run_config(2, "train.steps=1", "train.precision=auto"), tmp_path / "auto", progress=False, quiet=True)
    log = (tmp_path / "auto" / "train.log").read_text()
    assert "fp32 on cpu" in log and "bf16 products are emulated" not in log
    train(tiny_run_config(2, "train.steps=1", "train.precision=bf16"), tmp_path / "bf16", progress=False, quiet=True)
    log = (tmp_path / "bf16" / "train.log").read_text()
    assert "bf16 on cpu" in log and log.count("bf16 products are emulated") == 1
