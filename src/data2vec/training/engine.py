"""The training loop every pretraining run uses (single-modality and joint alike).

One optimizer step:
    learning rate from the schedule  ->  objective.forward_backward(step)  ->  metrics averaged
    across ranks  ->  gradient clipping  ->  the NaN policy  ->  optimizer.step()  ->  EMA update
    of the teacher with ema_decay(step + 1)  ->  the step's record  ->  the hooks, in order  ->
    act on the first decision a hook returns (stop, rewind, pause, interrupt).
Schedules are pure functions of the step and the data position a pure function of the step (and
of the number of rewinds: each rewind reads a newly seeded data stream), so a resumed run
continues exactly where the checkpoint left it.

A step whose loss or gradient is not finite, or whose loss is more than `train.max_loss_ratio`
times the running median of the last LOSS_WINDOW losses, never reaches the weights: the run stops
(train.on_nan=stop) or skips the step (skip), and stops too once more than `train.max_nan_share`
of its steps (and at least MIN_SKIPS_TO_STOP) were skipped.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import torch

from data2vec.config import OptimConfig, TeacherConfig
from data2vec.data.errors import BadInputError
from data2vec.schedules import cosine_lr, ema_decay
from data2vec.training.hooks import Checkpointer, Decision, Hook, RunContext, StepInfo
from data2vec.training.objectives import Objective, stream_seed
from data2vec.training.optim import set_lr
from data2vec.training.state import Learner, TrainingInterrupted, TrainingStopped
from data2vec.writes import WriteFailed

LOSS_WINDOW = 100
"""The running median of the loss is over this many of the last finite, kept losses."""
LOSS_HISTORY_MIN = 5
"""No explosion check before this many losses are in the window."""
MIN_SKIPS_TO_STOP = 5


class Engine:
    def __init__(
        self,
        learner: Learner,
        objective: Objective,
        hooks: list[Hook],
        checkpointer: Checkpointer,
        ctx: RunContext,
        optim: OptimConfig,
        teacher: TeacherConfig,
    ) -> None:
        self.learner, self.objective, self.hooks, self.checkpointer = learner, objective, hooks, checkpointer
        self.ctx, self.optim, self.teacher = ctx, optim, teacher
        self.losses: deque[float] = deque(maxlen=LOSS_WINDOW)

    def ema_decay(self, step: int) -> float:
        """The teacher's EMA decay after `step` optimizer steps."""
        t, steps = self.teacher, self.ctx.train.steps
        return ema_decay(step, t.decay, t.end_decay, steps if t.anneal_steps is None else t.anneal_steps)

    def run(self, start: int) -> int:
        """Train from step `start` to `train.steps` (or a pause); returns the steps completed."""
        step = start
        self.ctx.last_saved = start
        self.checkpointer.start_weights()
        ended = False
        try:
            while step < self.ctx.train.steps:
                decision = self.step(step)
                step += 1
                if decision is None:
                    continue
                if decision.action == "stop":
                    raise TrainingStopped(decision.message)
                if decision.action == "interrupt":
                    raise TrainingInterrupted(decision.message)
                if decision.action == "pause":
                    self.ctx.log(decision.message)
                    break
                step = self.rewind(decision)
        except TrainingStopped as e:
            self.ctx.log(str(e))
            raise
        except BadInputError as e:
            # Keep what was done: checkpoint the last completed step before stopping.
            self.learner.optimizer.zero_grad(set_to_none=True)
            if step > self.ctx.last_saved and not self.ctx.dist.enabled:  # saving is collective
                self.checkpointer.save(step)
            self.ctx.log(f"stopped on bad input at step {step}: {e}")
            raise
        except WriteFailed as e:  # e.g. a full disk: nothing more is written, the checkpoints stay
            newest = f"checkpoint step {self.ctx.last_saved} is intact" if self.ctx.last_saved else "no checkpoint yet"
            raise WriteFailed(
                f"{e}. Stopped at step {step}; {newest}: free space, then --resume {self.ctx.run_dir}"
            ) from e
        else:
            ended = True
        finally:
            for hook in self.hooks:
                try:
                    hook.on_end(step)
                except WriteFailed:
                    if ended:  # otherwise the error that ended the run is the one to report
                        raise
        return step

    def step(self, step: int) -> Decision | None:
        """Optimizer step `step` (0-based) and its hooks; the first decision a hook returns."""
        ctx, model, optimizer = self.ctx, self.learner.model, self.learner.optimizer
        lr = ctx.state.lr_scale * cosine_lr(
            step, ctx.train.steps, self.optim.lr, self.optim.min_lr, self.optim.warmup_steps
        )
        set_lr(optimizer, lr)
        out = self.objective.forward_backward(step)
        for warning in out.warnings:
            ctx.log(warning)
        # The same numbers, hence the same decisions, on every rank.
        groups = {g: ctx.dist.mean_metrics(ms) for g, ms in out.groups.items()}
        fields = self.objective.fields(groups, out.weights)
        max_norm = self.optim.clip_grad if self.optim.clip_grad > 0 else float("inf")
        grad_norm = ctx.dist.grad_norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        decay = self.ema_decay(step + 1)

        # A non-finite or exploding loss or gradient never reaches the weights, nor the teacher.
        loss = fields["loss"]
        what = self.bad_step(step + 1, loss, grad_norm)
        if what is not None:
            what += f" ({fields['modality']})" if "modality" in fields else ""
            if ctx.train.on_nan == "stop":
                raise TrainingStopped(f"{what}; stopped. {ctx.last_good().capitalize()}.")
            optimizer.zero_grad(set_to_none=True)
            ctx.state.nan_skipped += 1
            ctx.log(f"{what}: step skipped ({ctx.state.nan_skipped} so far, train.on_nan=skip)")
            skipped, share = ctx.state.nan_skipped, ctx.train.max_nan_share
            if skipped >= MIN_SKIPS_TO_STOP and skipped > share * (step + 1):
                raise TrainingStopped(
                    f"skipped {skipped} of the {step + 1} steps so far for a non-finite or exploding loss or "
                    f"gradient, more than train.max_nan_share={share:g} of them; stopped. "
                    f"{ctx.last_good().capitalize()}. Try a lower optim.lr or a stronger optim.clip_grad"
                )
        else:
            self.losses.append(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_teacher(decay)  # type: ignore[operator]

        record: dict[str, Any] = {"step": step + 1, **fields, "lr": lr, "grad_norm": grad_norm, "ema_decay": decay}
        info = StepInfo(step + 1, record, groups, out.samples * ctx.dist.world_size)
        for hook in self.hooks:
            decision = hook.after_step(info)
            if decision is not None:
                return decision
        return None

    def bad_step(self, step: int, loss: float, grad_norm: float) -> str | None:
        """Why optimizer step `step` (1-based) must not be applied, or None."""
        if not math.isfinite(loss):
            return f"non-finite loss at step {step} (loss {loss}, grad norm {grad_norm})"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient at step {step} (loss {loss}, grad norm {grad_norm})"
        ratio = self.ctx.train.max_loss_ratio
        if ratio > 0 and len(self.losses) >= LOSS_HISTORY_MIN:
            median = statistics.median(self.losses)
            if median > 0 and loss > ratio * median:
                return (
                    f"loss explosion at step {step} (loss {loss:.4g}, {loss / median:.3g} times the running median "
                    f"{median:.4g} of the last {len(self.losses)} steps; train.max_loss_ratio={ratio:g})"
                )
        return None

    def rewind(self, decision: Decision) -> int:
        """Back to the decision's checkpoint: weights, optimizer, RNG and data position restored,
        the counters kept (one more rewind), the learning rate lowered. Returns its step."""
        ck, ctx = decision.checkpoint, self.ctx
        assert ck is not None
        self.learner.restore(ck, ctx.state, counters=False)
        ctx.state.rewinds += 1
        ctx.state.lr_scale *= ctx.train.rewind_lr_factor
        ctx.last_saved = ck.step
        self.losses.clear()
        for hook in self.hooks:
            hook.on_rewind(ck.step)
        # Replaying the same batches and masks would replay the same statistics: the rewound run
        # reads a data stream seeded anew (and draws new dropout).
        torch.manual_seed(stream_seed(ctx.train.seed, ctx.state.rewinds))
        self.objective.seek(ck.step, ctx.state.rewinds)
        ctx.log(
            f"{decision.message}. Rewound to step {ck.step} (rewind {ctx.state.rewinds} of {ctx.train.max_rewinds}); "
            f"learning rate now x{ctx.state.lr_scale:g}; new data order and masks"
        )
        return ck.step
