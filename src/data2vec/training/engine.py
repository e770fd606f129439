"""The training loop every pretraining run uses (single-modality and joint alike).

One optimizer step:
    learning rate from the schedule  ->  objective.forward_backward(step)  ->  metrics averaged
    across ranks  ->  gradient clipping  ->  the NaN policy  ->  optimizer.step()  ->  EMA update
    of the teacher with ema_decay(step + 1)  ->  the step's record  ->  the hooks, in order  ->
    act on the first decision a hook returns (stop, rewind, pause, interrupt).
Schedules are pure functions of the step and the data position a pure function of the step, so
a resumed or rewound run continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from data2vec.config import OptimConfig, TeacherConfig
from data2vec.data.errors import BadInputError
from data2vec.schedules import cosine_lr, ema_decay
from data2vec.training.hooks import Checkpointer, Decision, Hook, RunContext, StepInfo
from data2vec.training.objectives import Objective
from data2vec.training.optim import set_lr
from data2vec.training.state import Learner, TrainingInterrupted, TrainingStopped
from data2vec.writes import WriteFailed


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

    def ema_decay(self, step: int) -> float:
        """The teacher's EMA decay after `step` optimizer steps."""
        t, steps = self.teacher, self.ctx.train.steps
        return ema_decay(step, t.decay, t.end_decay, steps if t.anneal_steps is None else t.anneal_steps)

    def run(self, start: int) -> int:
        """Train from step `start` to `train.steps` (or a pause); returns the steps completed."""
        step = start
        self.ctx.last_saved = start
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
        # The same numbers, hence the same decisions, on every rank.
        groups = {g: ctx.dist.mean_metrics(ms) for g, ms in out.groups.items()}
        fields = self.objective.fields(groups, out.weights)
        max_norm = self.optim.clip_grad if self.optim.clip_grad > 0 else float("inf")
        grad_norm = ctx.dist.grad_norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        decay = self.ema_decay(step + 1)

        # A non-finite loss or gradient never reaches the weights, nor the teacher.
        loss = fields["loss"]
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step + 1}"
            what += f" ({fields['modality']})" if "modality" in fields else ""
            if ctx.train.on_nan == "stop":
                raise TrainingStopped(
                    f"{what} (loss {loss}, grad norm {grad_norm}); stopped. "
                    f"The last good checkpoint is step {ctx.last_saved} in {ctx.run_dir}."
                )
            optimizer.zero_grad(set_to_none=True)
            ctx.state.nan_skipped += 1
            ctx.log(f"{what}: step skipped ({ctx.state.nan_skipped} so far, train.on_nan=skip)")
        else:
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

    def rewind(self, decision: Decision) -> int:
        """Back to the decision's checkpoint: weights, optimizer, RNG and data position restored,
        the counters kept (one more rewind), the learning rate lowered. Returns its step."""
        ck, ctx = decision.checkpoint, self.ctx
        assert ck is not None
        self.learner.restore(ck, ctx.state, counters=False)
        ctx.state.rewinds += 1
        ctx.state.lr_scale *= ctx.train.rewind_lr_factor
        ctx.last_saved = ck.step
        for hook in self.hooks:
            hook.on_rewind(ck.step)
        self.objective.seek(ck.step)
        ctx.log(
            f"{decision.message}. Rewound to step {ck.step} (rewind {ctx.state.rewinds} of {ctx.train.max_rewinds}); "
            f"learning rate now x{ctx.state.lr_scale:g}"
        )
        return ck.step
