"""What happens after each optimizer step, besides the update: small hooks the engine calls in a
fixed order (`build_hooks`). A hook may add to the step's record, write files, or return a
`Decision` (stop, rewind, pause); the engine acts on the first decision and skips the hooks
after it, so a collapsed step is never checkpointed.

Each hook sees the run through a `RunContext` and the step through a `StepInfo`, so it can be
tested on synthetic records without a model.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import torch
from tqdm import tqdm

from data2vec.checkpoint import Checkpoint, load_latest, save_checkpoint
from data2vec.config import RunConfig, TrainConfig
from data2vec.distributed import Dist
from data2vec.model import Data2Vec
from data2vec.probe import OnlineProbe
from data2vec.training.plots import plot_loss_curve, read_metrics
from data2vec.training.state import Learner, RunState, TrainingStopped
from data2vec.writes import append_line, write_text_atomic

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

HISTORY_LIMIT = 10_000
"""`TrainResult.history` keeps at most this many of the newest metrics.jsonl rows."""
LOCAL_STD_WARN = 0.05
"""Below this `local_std` (after `train.collapse_after`) train.log gets one warning."""
LOCAL_STD_REMEDY = "keep the local encoder at its initial weights with optim.local_lr_scale=0, or slow it down"


@dataclass
class RunContext:
    """What the hooks share about the run."""

    run_dir: Path
    train: TrainConfig
    state: RunState
    log: Callable[[str], None]
    dist: Dist = field(default_factory=Dist)
    last_saved: int = 0
    """The newest checkpoint's step (the checkpointer and rewinds move it)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """The newest rows written to metrics.jsonl (at most HISTORY_LIMIT)."""

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def last_good(self) -> str:
        """Where the run can be resumed from, for stop messages."""
        if not self.last_saved:
            return "no checkpoint has been written yet (nothing to resume from)"
        return f"the last good checkpoint is step {self.last_saved} in {self.run_dir}"


@dataclass
class StepInfo:
    step: int
    """Optimizer steps completed, this one included."""
    record: dict[str, Any]
    """The step's metrics.jsonl row, as far as it is built."""
    groups: dict[str, dict[str, float]]
    """Per modality ("" in a single-modality run): loss and model metrics, averaged across ranks."""
    samples: int
    """Samples this step, all ranks together."""


@dataclass(frozen=True)
class Decision:
    action: Literal["stop", "rewind", "pause", "interrupt"]
    message: str
    checkpoint: Checkpoint | None = None
    """rewind: the checkpoint to go back to."""


class Hook:
    def after_step(self, info: StepInfo) -> Decision | None:
        return None

    def on_rewind(self, step: int) -> None:
        """The run went back to `step` (after the engine restored that checkpoint)."""

    def on_checkpoint(self, step: int) -> None:
        """Checkpoint `step` was saved (on every rank, after the checkpointer's barrier)."""

    def on_end(self, step: int) -> None:
        """The run ends after `step` steps, finished or not (also on an exception)."""


def logging_step(step: int, train: TrainConfig) -> bool:
    """Whether step `step` writes a metrics.jsonl row: every `train.log_every` steps, and the last."""
    return step % train.log_every == 0 or step == train.steps


# ----------------------------------------------------------------------------- the hooks


class ProbeHook(Hook):
    """The online probe: every `probe.every` steps, linear and kNN probes of frozen features
    (probe.py), added to the record; one per modality in a joint run (keys suffixed `_<modality>`,
    plotted to probe_<modality>.png)."""

    def __init__(self, ctx: RunContext, members: dict[str, tuple[RunConfig, Data2Vec]]) -> None:
        self.ctx = ctx
        self.members = {g: (cfg, model) for g, (cfg, model) in members.items() if cfg.probe.every > 0}
        self.probes: dict[str, OnlineProbe] = {}

    def after_step(self, info: StepInfo) -> Decision | None:
        for g, (cfg, model) in self.members.items():
            if info.step % cfg.probe.every:
                continue
            if g not in self.probes:  # the labelled sets are read on the first probe step
                self.probes[g] = OnlineProbe(cfg, self.ctx.run_dir)
            info.record.update(self.probes[g].update(model, info.step, g))
        return None

    def on_end(self, step: int) -> None:
        self.probes.clear()  # the labelled data goes with the run


class MetricsLog(Hook):
    """metrics.jsonl: one row per `train.log_every` steps (and the last), with samples_per_sec;
    the same rows, the newest HISTORY_LIMIT, in `ctx.history`. A rewind drops the abandoned rows."""

    def __init__(self, ctx: RunContext, clock: Callable[[], float] = time.perf_counter) -> None:
        self.ctx, self.clock = ctx, clock
        self.t_last, self.samples = clock(), 0

    def after_step(self, info: StepInfo) -> Decision | None:
        self.samples += info.samples
        if not logging_step(info.step, self.ctx.train):
            return None
        now = self.clock()
        info.record["samples_per_sec"] = self.samples / max(now - self.t_last, 1e-9)
        self.t_last, self.samples = now, 0
        if self.ctx.dist.is_main:
            append_line(self.ctx.metrics_path, json.dumps(info.record), "metrics")
        self.ctx.history.append(info.record)
        del self.ctx.history[:-HISTORY_LIMIT]
        return None

    def on_rewind(self, step: int) -> None:
        if self.ctx.dist.is_main and (note := truncate_metrics(self.ctx.metrics_path, step)):
            self.ctx.log(note)
        self.ctx.history[:] = [r for r in self.ctx.history if r["step"] <= step]


class ProgressBar(Hook):
    def __init__(self, ctx: RunContext, start: int, enabled: bool) -> None:
        self.bar = tqdm(total=ctx.train.steps, initial=start, disable=not enabled, dynamic_ncols=True, unit="step")

    def after_step(self, info: StepInfo) -> Decision | None:
        r = info.record
        if "samples_per_sec" in r:
            label = {"modality": r["modality"]} if "modality" in r else {}
            self.bar.set_postfix(
                **label, loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}", tgt_std=f"{r['target_std']:.3f}"
            )
        self.bar.update(1)
        return None

    def on_rewind(self, step: int) -> None:
        self.bar.reset(total=self.bar.total)
        self.bar.update(step)

    def on_end(self, step: int) -> None:
        self.bar.close()


def low_local_std(metrics: dict[str, float], threshold: float) -> bool:
    """The local-encoder collapse check: `local_std` (when the step logged one) under a positive
    threshold."""
    return threshold > 0 and metrics.get("local_std", math.inf) < threshold


def local_std_warning(step: int, value: float) -> str:
    return (
        f"warning: local_std {value:.4f} at step {step} (0.5-1 at init): the local encoder "
        f"(CNN / patch or token embedding) emits nearly one vector for every token, a shortcut the "
        f"instance-normed targets hide from target_std; {LOCAL_STD_REMEDY} (train.min_local_std > 0 stops on it)"
    )


class LocalStdWarning(Hook):
    """One train.log warning per modality when `local_std` falls under LOCAL_STD_WARN."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.warned: set[str] = set()

    def after_step(self, info: StepInfo) -> Decision | None:
        if info.step <= self.ctx.train.collapse_after:
            return None
        for g, ms in info.groups.items():
            if g not in self.warned and low_local_std(ms, LOCAL_STD_WARN):
                msg = local_std_warning(info.step, ms["local_std"])
                self.ctx.log(f"{g}: {msg}" if g else msg)
                self.warned.add(g)
        return None


def collapse_message(step: int, group: str, ms: dict[str, float], tc: TrainConfig) -> str | None:
    """Why the step counts as a representation collapse, or None."""
    local_low = low_local_std(ms, tc.min_local_std)
    if not (ms["target_std"] < tc.min_target_std or ms["pred_std"] < tc.min_pred_std or local_low):
        return None
    what = (
        f"representation collapse at step {step}{f' ({group})' if group else ''}: target std "
        f"{ms['target_std']:.4f} (min {tc.min_target_std}), prediction std {ms['pred_std']:.4f} (min {tc.min_pred_std})"
    )
    if local_low:
        what += f", local std {ms['local_std']:.4f} (min {tc.min_local_std}; {LOCAL_STD_REMEDY})"
    return what


class CollapseGuard(Hook):
    """After `train.collapse_after` steps: a target, prediction or local-encoder std under its
    threshold stops the run, or (train.on_collapse=rewind, at most train.max_rewinds times) goes
    back to the last checkpoint."""

    def __init__(self, ctx: RunContext, load: Callable[[], Checkpoint | None]) -> None:
        self.ctx, self.load = ctx, load
        tc = ctx.train
        if not (tc.min_target_std or tc.min_pred_std or tc.min_local_std):
            ctx.log(
                "warning: the collapse monitor is off (train.min_target_std, min_pred_std and min_local_std "
                "are 0): a collapsed run will not be stopped"
            )
        elif tc.collapse_after >= tc.steps:
            ctx.log(
                f"warning: the collapse monitor is off in this run: it starts after train.collapse_after="
                f"{tc.collapse_after} steps and the run has {tc.steps}"
            )

    def after_step(self, info: StepInfo) -> Decision | None:
        tc = self.ctx.train
        if info.step <= tc.collapse_after:
            return None
        what = next((m for g, ms in info.groups.items() if (m := collapse_message(info.step, g, ms, tc))), None)
        if what is None:
            return None
        if tc.on_collapse == "rewind" and self.ctx.state.rewinds < tc.max_rewinds:
            good = self.load()
            if good is not None:
                return Decision("rewind", what, good)
        return Decision(
            "stop",
            f"{what}. Stopped without saving; {self.ctx.last_good()}. Try a lower optim.lr, a slower "
            "teacher (teacher.decay closer to 1), or train.on_collapse=rewind.",
        )


class Checkpointer(Hook):
    """A checkpoint every `train.ckpt_every` steps, at the end, and at `stop_after` (then: pause);
    loss.png redrawn with each, and each of `observers` told (`on_checkpoint`)."""

    def __init__(
        self, ctx: RunContext, learner: Learner, config: dict[str, Any], stop_after: int | None = None
    ) -> None:
        self.ctx, self.learner, self.config, self.stop_after = ctx, learner, config, stop_after
        self.observers: list[Hook] = []
        """The hooks told of every checkpoint saved (`build_hooks`: all of the run's)."""
        self.weight_bound = 0.0
        """Weights above this (in absolute value) are not saved; 0 = no bound (`start_weights`)."""

    def start_weights(self) -> None:
        """Set the weight bound from the weights the run starts from: train.max_weight_abs, or 4x
        the largest of them if that is larger (a model imported with large weights is not refused)."""
        limit = self.ctx.train.max_weight_abs
        start = largest_weight(self.learner.model.state_dict())
        self.weight_bound = max(limit, WEIGHT_BOUND_FACTOR * start) if limit > 0 else 0.0

    def save(self, step: int) -> None:
        """Checkpoint `step` (collective: every rank calls it; rank 0 writes). Weights that are not
        finite or exceed the bound stop the run instead (TrainingStopped), naming the last good one."""
        ctx = self.ctx
        student, teacher, state = self.learner.snapshot(step, ctx.state)
        problem = weight_problem({**student, **teacher}, self.weight_bound)
        if ctx.dist.max_int(int(problem is not None)):
            raise TrainingStopped(
                f"weights after step {step} {problem or 'fail the check on another rank'}; not saved. "
                f"Stopped: {ctx.last_good()}. Try a lower optim.lr or a stronger optim.clip_grad"
            )
        if ctx.dist.is_main:
            path = save_checkpoint(
                ctx.run_dir, step, student, teacher, self.config, state, keep_last=ctx.train.keep_last
            )
            ctx.log(f"saved checkpoint {path}")
        ctx.dist.barrier()  # nobody reads or rewinds to a checkpoint before it is complete
        ctx.last_saved = step
        for hook in self.observers:
            hook.on_checkpoint(step)

    def after_step(self, info: StepInfo) -> Decision | None:
        tc, step = self.ctx.train, info.step
        stopping = self.stop_after is not None and step >= self.stop_after
        if step % tc.ckpt_every == 0 or step == tc.steps or stopping:
            self.save(step)
            if self.ctx.dist.is_main:
                plot_loss_curve(self.ctx.metrics_path, self.ctx.run_dir / "loss.png")
        if stopping and step < tc.steps:
            return Decision(
                "pause", f"stopping after step {step} as asked (--stop-after); resume with --resume {self.ctx.run_dir}"
            )
        return None

    def latest(self) -> Checkpoint | None:
        return load_latest(self.ctx.run_dir, map_location=self.learner.device)


WEIGHT_BOUND_FACTOR = 4.0


def largest_weight(tensors: dict[str, Any]) -> float:
    """The largest absolute value among the floating-point tensors (this rank's shards under FSDP)."""
    largest = 0.0
    for t in tensors.values():
        local = t.to_local() if hasattr(t, "to_local") else t
        if isinstance(local, torch.Tensor) and local.is_floating_point() and local.numel():
            largest = max(largest, float(local.detach().abs().max()))
    return largest


def weight_problem(tensors: dict[str, torch.Tensor], bound: float) -> str | None:
    """Why these weights must not be saved (non-finite values, or larger than `bound` when it is
    positive), or None."""
    worst, worst_name = 0.0, ""
    for name, t in tensors.items():
        if not t.is_floating_point() or not t.numel():
            continue
        if not bool(torch.isfinite(t).all()):
            return f"hold non-finite values ({name})"
        m = float(t.detach().abs().max())
        if m > worst:
            worst, worst_name = m, name
    if bound > 0 and worst > bound:
        return (
            f"are out of bounds: |w| reaches {worst:.4g} in {worst_name}, over {bound:.4g} (train.max_weight_abs, or "
            f"{WEIGHT_BOUND_FACTOR:g}x the largest weight the run started from)"
        )
    return None


class Summary(Hook):
    """summary.json at the end of every invocation, and the skipped-input and skipped-step report."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def on_end(self, step: int) -> None:
        ctx, state = self.ctx, self.ctx.state
        if ctx.dist.is_main:
            write_summary(ctx.run_dir, step, state)
        if state.skipped_inputs:
            unique = sorted(set(state.skipped_inputs))
            ctx.log(f"skipped {len(unique)} bad input(s):\n  " + "\n  ".join(unique))
        if state.nan_skipped:
            ctx.log(f"skipped {state.nan_skipped} step(s) with a non-finite loss or gradient")


class SignalStop(Hook):
    """SIGTERM and SIGINT (what SLURM, Kubernetes and Ctrl-C send before a kill) end the run with a
    checkpoint. The first signal is only noted: the step in progress finishes, then this hook (after
    the collapse guard, so a collapsed step is never saved) checkpoints it and stops the run with
    `TrainingInterrupted` (the command exits with EXIT_INTERRUPTED, 75, for job scripts to requeue
    on). A second signal exits at once. Under torchrun the ranks agree on whether any of them got a
    signal (one integer all-reduced per step), so all save and stop at the same step."""

    def __init__(self, ctx: RunContext, checkpointer: Checkpointer) -> None:
        self.ctx, self.checkpointer = ctx, checkpointer
        self.received = 0
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received:  # the second signal: the default action, now
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        self.ctx.log(
            f"received {signal.Signals(signum).name}: finishing this step, then a checkpoint "
            "(a second signal exits at once)"
        )

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def after_step(self, info: StepInfo) -> Decision | None:
        got = self.ctx.dist.max_int(self.received)
        if not got:
            return None
        if info.step > self.ctx.last_saved:
            self.checkpointer.save(info.step)
        name = signal.Signals(got).name
        return Decision(
            "interrupt",
            f"stopped by {name} after step {info.step}; checkpoint step {self.ctx.last_saved} in "
            f"{self.ctx.run_dir / 'checkpoints'}. Resume with: data2vec pretrain --resume {self.ctx.run_dir}",
        )

    def on_end(self, step: int) -> None:
        self.restore()


def build_hooks(
    ctx: RunContext,
    learner: Learner,
    config: dict[str, Any],
    members: dict[str, tuple[RunConfig, Data2Vec]],
    *,
    start: int,
    progress: bool,
    stop_after: int | None,
    loggers: Sequence[Hook] = (),
) -> tuple[list[Hook], Checkpointer]:
    """The hooks of a run, in the order they run after each step (and the checkpointer, which
    the engine also calls to save on a bad input). `members`: the model per modality, for probes;
    `loggers`: the hooks `train.loggers` asks for (`tensorboard.logger_hooks`), which write the
    metrics.jsonl row elsewhere too. Every hook hears of each checkpoint saved."""
    checkpointer = Checkpointer(ctx, learner, config, stop_after)
    hooks: list[Hook] = [
        ProbeHook(ctx, members),  # adds probe_* to the record, so it runs before the record is written
        MetricsLog(ctx),
        *loggers,  # after MetricsLog: its row, samples_per_sec included
        ProgressBar(ctx, start, progress and ctx.dist.is_main),
        LocalStdWarning(ctx),
        CollapseGuard(ctx, checkpointer.latest),  # before the checkpointer: a collapsed step is never saved
        SignalStop(ctx, checkpointer),  # SIGTERM/SIGINT: checkpoint this step, then stop
        checkpointer,
        Summary(ctx),
    ]
    checkpointer.observers = hooks
    return hooks, checkpointer


# ----------------------------------------------------------------------------- run files


def truncate_metrics(metrics_path: Path, step: int) -> str | None:
    """Drop metrics logged after `step` (we are resuming or rewinding to it), and lines that are not
    a whole record; returns what was dropped of those, for train.log."""
    if not metrics_path.exists():
        return None
    if step == 0:
        metrics_path.unlink()
        return None
    rows, torn = read_metrics(metrics_path)
    write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step), "metrics")
    if not torn:
        return None
    where = ", ".join(str(i) for i in torn)
    return (
        f"{metrics_path}: dropped {len(torn)} line(s) that are not a whole record (line {where}; "
        "a process stopped mid-write)"
    )


def write_summary(run_dir: Path, step: int, state: RunState) -> None:
    summary = {
        "step": step,
        "skipped_inputs": len(set(state.skipped_inputs)),
        "skipped_input_files": sorted(set(state.skipped_inputs)),
        "nan_skipped_steps": state.nan_skipped,
        "rewinds": state.rewinds,
        "lr_scale": state.lr_scale,
    }
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n", "the run summary")
