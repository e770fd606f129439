"""The training engine with a fake objective, and each hook on synthetic step records: no data,
no data2vec model. What the engine promises: a skipped non-finite step leaves the weights and
the teacher untouched; the teacher is updated exactly once per applied step, with
ema_decay(step + 1); each parameter group's lr_scale applies; a rewind restores the weights,
the RNG and the data position, keeps the counters and lowers the learning rate."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import data2vec.training.hooks as hooks_module
from data2vec.checkpoint import Checkpoint, list_checkpoints
from data2vec.config import OptimConfig, TeacherConfig, TrainConfig
from data2vec.distributed import Dist
from data2vec.training import TrainingStopped
from data2vec.training.engine import Engine
from data2vec.training.hooks import (
    HISTORY_LIMIT,
    Checkpointer,
    CollapseGuard,
    Decision,
    LocalStdWarning,
    MetricsLog,
    RunContext,
    StepInfo,
    Summary,
    build_hooks,
)
from data2vec.training.objectives import StepOutcome
from data2vec.training.state import Learner, RunState


class FakeModel(nn.Module):
    """A student (two linear layers: "local" and "encoder") and an EMA teacher of them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.local = nn.Linear(3, 3)
        self.encoder = nn.Linear(3, 1)
        self.teacher = nn.ModuleDict({"local": copy.deepcopy(self.local), "encoder": copy.deepcopy(self.encoder)})
        self.teacher.requires_grad_(False)
        self.decays: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(torch.tanh(self.local(x)))

    @torch.no_grad()
    def update_teacher(self, decay: float) -> None:
        self.decays.append(decay)
        for name in ("local", "encoder"):
            for t, s in zip(self.teacher[name].parameters(), getattr(self, name).parameters(), strict=True):
                t.mul_(decay).add_(s, alpha=1 - decay)


class FakeObjective:
    """Data at position p is a fixed tensor of p; each step also draws from the global RNG (as
    masks and crops do). `nan_at`/`collapse_at`: 0-based steps whose loss is NaN / whose target
    std is 0 (the first time only)."""

    def __init__(self, model: FakeModel, nan_at: tuple[int, ...] = (), collapse_at: tuple[int, ...] = ()) -> None:
        self.model, self.nan_at, self.collapse_at = model, set(nan_at), set(collapse_at)
        self.position = 0
        self.streams: list[int] = []
        """The data stream of every seek (the number of rewinds before it)."""
        self.seen: list[tuple[int, int, float]] = []
        """(step, data position, random draw) of every forward."""

    def seek(self, step: int, stream: int = 0) -> list[str]:
        self.position = step
        self.streams.append(stream)
        return []

    def forward_backward(self, step: int) -> StepOutcome:
        draw = float(torch.rand(()))
        x = torch.full((4, 3), float(self.position % 5)) + draw
        self.seen.append((step, self.position, draw))
        self.position += 1
        loss = (self.model(x) - 1).pow(2).mean()
        if step in self.nan_at:
            loss = loss * float("nan")
        loss.backward()
        target_std = 0.0 if step in self.collapse_at else 1.0
        self.collapse_at.discard(step)
        metrics = {"loss": float(loss.detach()), "target_std": target_std, "pred_std": 1.0}
        return StepOutcome({"": metrics}, {"": 1.0}, 4)

    def fields(self, groups: dict[str, dict[str, float]], weights: dict[str, float]) -> dict[str, Any]:
        return dict(groups[""])

    def close(self) -> None:
        pass


def _engine(
    tmp_path: Path,
    objective: FakeObjective | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    optim: OptimConfig | None = None,
    **train: Any,
) -> tuple[Engine, RunContext, list[str]]:
    settings = {"steps": 6, "ckpt_every": 3, "collapse_after": 0, "log_every": 1, **train}
    tc = TrainConfig(**settings)
    model = objective.model if objective is not None else FakeModel()
    objective = objective or FakeObjective(model)
    optimizer = optimizer or torch.optim.SGD([p for n, p in model.named_parameters() if "teacher" not in n], lr=0.1)
    for g in optimizer.param_groups:
        g.setdefault("lr_scale", 1.0)
    learner = Learner(model, optimizer, Dist(), torch.device("cpu"))
    lines: list[str] = []
    ctx = RunContext(tmp_path, tc, RunState(), lines.append)
    hooks, checkpointer = build_hooks(ctx, learner, {"fake": True}, {}, start=0, progress=False, stop_after=None)
    optim = optim or OptimConfig(lr=0.1, warmup_steps=0)
    engine = Engine(learner, objective, hooks, checkpointer, ctx, optim, TeacherConfig(decay=0.9, end_decay=0.99))
    objective.seek(0)
    return engine, ctx, lines


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_skipped_step_leaves_weights_and_teacher_untouched(tmp_path: Path) -> None:
    model = FakeModel()
    engine, ctx, lines = _engine(tmp_path, FakeObjective(model, nan_at=(2,)), on_nan="skip")
    assert engine.step(0) is None and engine.step(1) is None
    before = _weights(model)
    engine.step(2)
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())  # the poisoned gradient is dropped
    assert ctx.state.nan_skipped == 1
    assert lines[0] == "non-finite loss at step 3 (loss nan, grad norm nan): step skipped (1 so far, train.on_nan=skip)"
    assert math.isnan(ctx.history[-1]["loss"])  # the skipped step is still recorded
    engine.step(3)
    assert not torch.equal(model.encoder.weight, after["encoder.weight"])


def test_the_teacher_is_updated_once_per_applied_step(tmp_path: Path) -> None:
    model = FakeModel()
    engine, ctx, _ = _engine(tmp_path, FakeObjective(model, nan_at=(1, 4)), on_nan="skip")
    assert engine.run(0) == 6
    applied = [0, 2, 3, 5]
    assert model.decays == [engine.ema_decay(s + 1) for s in applied]
    assert [r["ema_decay"] for r in ctx.history] == [engine.ema_decay(s + 1) for s in range(6)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["nan_skipped_steps"] == 2 and summary["step"] == 6


def test_a_non_finite_step_under_stop_names_the_last_checkpoint(tmp_path: Path) -> None:
    model = FakeModel()
    engine, _, _ = _engine(tmp_path, FakeObjective(model, nan_at=(4,)))
    with pytest.raises(
        TrainingStopped, match=f"non-finite loss at step 5.*last good checkpoint is step 3 in {tmp_path}"
    ):
        engine.run(0)
    assert model.decays == [engine.ema_decay(s + 1) for s in range(4)]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003"]


def test_each_group_lr_scale_applies(tmp_path: Path) -> None:
    model = FakeModel()
    optimizer = torch.optim.SGD(
        [
            {"params": list(model.local.parameters()), "lr_scale": 0.0},
            {"params": list(model.encoder.parameters()), "lr_scale": 0.25},
        ],
        lr=0.1,
    )
    optim = OptimConfig(lr=0.1, warmup_steps=0, min_lr=0.1)  # a constant schedule
    engine, ctx, _ = _engine(tmp_path, FakeObjective(model), optimizer=optimizer, optim=optim)
    local = model.local.weight.clone()
    engine.step(0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.025]
    assert torch.equal(model.local.weight, local)  # lr_scale 0: frozen
    ctx.state.lr_scale = 0.5  # what a rewind sets: it multiplies every group
    engine.step(1)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0125]
    assert ctx.history[-1]["lr"] == 0.05


def test_a_rewind_restores_weights_and_data_position_in_a_new_stream(tmp_path: Path) -> None:
    model = FakeModel()
    objective = FakeObjective(model, collapse_at=(4,))
    engine, ctx, lines = _engine(tmp_path, objective, on_collapse="rewind", rewind_lr_factor=0.5)
    before_3: list[dict[str, torch.Tensor]] = []  # the weights each time step 3 (0-based) starts
    real_step = engine.step

    def step(s: int) -> Decision | None:
        if s == 3:
            before_3.append(_weights(model))
        return real_step(s)

    engine.step = step  # type: ignore[method-assign]
    assert engine.run(0) == 6
    assert [s for s, _, _ in objective.seen] == [0, 1, 2, 3, 4, 3, 4, 5]
    first, replay = objective.seen[3:5], objective.seen[5:7]
    assert [p for _, p, _ in replay] == [p for _, p, _ in first] == [3, 4]  # data position restored ...
    assert objective.streams == [0, 1]  # ... in a newly seeded stream (other batches and masks)
    assert all(d != e for (_, _, d), (_, _, e) in zip(replay, first, strict=True))  # and a reseeded RNG
    a, b = before_3  # student and teacher back at the step-3 checkpoint
    assert all(torch.equal(a[k], b[k]) for k in a) and any(k.startswith("teacher.") for k in a)
    assert len(model.decays) == 8  # 5 steps, then 3 again from step 3
    assert ctx.state.rewinds == 1 and ctx.state.lr_scale == 0.5
    assert any("Rewound to step 3 (rewind 1 of 3); learning rate now x0.5" in ln for ln in lines)
    # metrics.jsonl and the history hold each step once, the abandoned step 5 row gone
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ctx.history] == [1, 2, 3, 4, 5, 6]
    assert rows[3]["lr"] == pytest.approx(0.5 * engine.optim.lr * _cos(3, 6))
    assert json.loads((tmp_path / "summary.json").read_text())["rewinds"] == 1


def _cos(step: int, steps: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / steps))


# ----------------------------------------------------------------------------- hooks on synthetic records


def _ctx(tmp_path: Path, lines: list[str] | None = None, **train: Any) -> RunContext:
    log = lines.append if lines is not None else (lambda _: None)
    return RunContext(tmp_path, TrainConfig(**{"steps": 100, **train}), RunState(), log)


def _info(step: int, **metrics: float) -> StepInfo:
    ms = {"loss": 1.0, "target_std": 1.0, "pred_std": 1.0, **metrics}
    return StepInfo(step, {"step": step, **ms}, {"": ms}, 8)


def test_metrics_log_writes_logging_steps_and_keeps_a_bounded_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert HISTORY_LIMIT == 10_000
    monkeypatch.setattr(hooks_module, "HISTORY_LIMIT", 3)
    ctx = _ctx(tmp_path, steps=11, log_every=2)
    clock = iter(range(100))
    log = MetricsLog(ctx, clock=lambda: float(next(clock)))
    for s in range(1, 12):
        assert log.after_step(_info(s)) is None
    rows = [json.loads(ln) for ln in ctx.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 11]  # every log_every steps, and the last
    assert rows[0]["samples_per_sec"] == 16.0  # 2 steps x 8 samples in 1 s
    assert [r["step"] for r in ctx.history] == [8, 10, 11]
    log.on_rewind(8)
    assert [json.loads(ln)["step"] for ln in ctx.metrics_path.read_text().splitlines()] == [2, 4, 6, 8]
    assert [r["step"] for r in ctx.history] == [8]


def test_local_std_warning_once_per_modality(tmp_path: Path) -> None:
    lines: list[str] = []
    hook = LocalStdWarning(_ctx(tmp_path, lines, collapse_after=2))
    low = {"loss": 1.0, "target_std": 1.0, "pred_std": 1.0, "local_std": 0.01}
    for s in range(1, 6):
        hook.after_step(StepInfo(s, {}, {"image": low, "text": {**low, "local_std": 0.9}}, 1))
    hook.after_step(StepInfo(6, {}, {"image": low, "text": low}, 1))
    assert len(lines) == 2
    assert lines[0].startswith("image: warning: local_std 0.0100 at step 3")
    assert lines[1].startswith("text: warning: local_std 0.0100 at step 6")


def _checkpoint(step: int) -> Checkpoint:
    return Checkpoint(Path("ck"), step, {}, {}, {}, {})


def test_collapse_guard_stops_or_rewinds_at_most_max_rewinds(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, collapse_after=3, min_target_std=0.1, min_pred_std=0.01, max_rewinds=2)
    ctx.last_saved = 2
    stop = CollapseGuard(ctx, lambda: _checkpoint(2))
    assert stop.after_step(_info(3, target_std=0.0)) is None  # warm-up
    assert stop.after_step(_info(4)) is None
    d = stop.after_step(_info(4, pred_std=0.001))
    assert d is not None and d.action == "stop" and d.checkpoint is None
    assert "representation collapse at step 4" in d.message and "last good checkpoint is step 2" in d.message

    ctx = _ctx(tmp_path, collapse_after=0, on_collapse="rewind", max_rewinds=2)
    guard = CollapseGuard(ctx, lambda: _checkpoint(2))
    d = guard.after_step(_info(4, target_std=0.0))
    assert d is not None and d.action == "rewind" and d.checkpoint is not None and d.checkpoint.step == 2
    ctx.state.rewinds = 2
    d = guard.after_step(_info(4, target_std=0.0))
    assert d is not None and d.action == "stop"  # rewinds used up
    ctx.state.rewinds = 0
    d = CollapseGuard(ctx, lambda: None).after_step(_info(4, target_std=0.0))
    assert d is not None and d.action == "stop"  # no checkpoint to go back to


def test_collapse_guard_checks_the_local_encoder_per_modality(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, collapse_after=0, min_local_std=0.1)
    ok = {"loss": 1.0, "target_std": 1.0, "pred_std": 1.0, "local_std": 0.5}
    d = CollapseGuard(ctx, lambda: None).after_step(
        StepInfo(7, {}, {"image": ok, "audio": {**ok, "local_std": 0.01}}, 1)
    )
    assert d is not None and "collapse at step 7 (audio)" in d.message and "local std 0.0100" in d.message


def test_checkpointer_saves_on_schedule_and_pauses_at_stop_after(tmp_path: Path) -> None:
    model = FakeModel()
    learner = Learner(model, torch.optim.SGD(model.encoder.parameters(), lr=0.1), Dist(), torch.device("cpu"))
    lines: list[str] = []
    ctx = _ctx(tmp_path, lines, steps=10, ckpt_every=4, keep_last=5)
    hook = Checkpointer(ctx, learner, {"x": 1}, stop_after=5)
    decisions = [hook.after_step(_info(s)) for s in range(1, 6)]
    assert decisions[:4] == [None] * 4
    assert decisions[4] is not None and decisions[4].action == "pause" and "--resume" in decisions[4].message
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert ctx.last_saved == 5 and (tmp_path / "loss.png").exists() is False  # no metrics yet: no plot
    ck = hook.latest()
    assert ck is not None and ck.step == 5 and ck.config == {"x": 1}
    assert set(ck.teacher) == {k for k in model.state_dict() if k.startswith("teacher.")}
    assert ck.state["step"] == 5 and ck.state["rewinds"] == 0


def test_summary_reports_skipped_inputs_and_steps(tmp_path: Path) -> None:
    lines: list[str] = []
    ctx = _ctx(tmp_path, lines)
    ctx.state.skipped_inputs.extend(["b.wav: bad", "a.png: bad", "b.wav: bad"])
    ctx.state.nan_skipped, ctx.state.rewinds, ctx.state.lr_scale = 2, 1, 0.5
    Summary(ctx).on_end(7)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {
        "step": 7,
        "skipped_inputs": 2,
        "skipped_input_files": ["a.png: bad", "b.wav: bad"],
        "nan_skipped_steps": 2,
        "rewinds": 1,
        "lr_scale": 0.5,
    }
    assert lines == [
        "skipped 2 bad input(s):\n  a.png: bad\n  b.wav: bad",
        "skipped 2 step(s) with a non-finite loss or gradient",
    ]


def test_hooks_run_in_a_fixed_order_and_the_first_decision_wins(tmp_path: Path) -> None:
    """A collapsed step is never checkpointed: the guard runs before the checkpointer."""
    model = FakeModel()
    engine, ctx, _ = _engine(tmp_path, FakeObjective(model, collapse_at=(2,)), ckpt_every=1)
    names = [type(h).__name__ for h in engine.hooks]
    assert names == [
        "ProbeHook",
        "MetricsLog",
        "ProgressBar",
        "LocalStdWarning",
        "CollapseGuard",
        "SignalStop",
        "Checkpointer",
        "Summary",
    ]
    with pytest.raises(TrainingStopped, match="collapse at step 3"):
        engine.run(0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]
    assert [r["step"] for r in ctx.history] == [1, 2, 3]  # the collapsed step is logged
