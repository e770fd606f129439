"""What one optimizer step computes before the update: forward and backward of its
micro-batches. The engine calls `forward_backward(step)` and sees only metrics.

`SingleObjective` is a single-modality run: `train.grad_accum` micro-batches, each loss divided
by `grad_accum`. `JointObjective` is a joint run: the modalities the step plan gives, each with
`grad_accum` micro-batches and its loss weight. Both run the forward under autocast and skip the
DDP gradient all-reduce on all but the last backward of the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from data2vec.config import RunConfig, TrainConfig
from data2vec.data.batch import PretrainBatch
from data2vec.data.errors import BadInputError
from data2vec.data.pipeline import build_pretrain_loader
from data2vec.distributed import Dist
from data2vec.joint import JointConfig, JointData2Vec, step_weights, steps_per_modality
from data2vec.model import Batch
from data2vec.training.devices import autocast


@dataclass
class StepOutcome:
    groups: dict[str, dict[str, float]]
    """Per modality ("" in a single-modality run): the loss and the model's metrics, means over
    the micro-batches."""
    weights: dict[str, float]
    """Each group's loss weight in the backpropagated objective."""
    samples: int
    """Samples this process saw in the step."""
    warnings: list[str] = field(default_factory=list)
    """Lines for train.log (said once per run, e.g. masks that leave nothing visible)."""


class Objective(Protocol):
    def seek(self, step: int, stream: int = 0) -> list[str]:
        """Position the data at optimizer step `step` (a fresh run, a resume, a rewind) of data
        stream `stream` (the number of rewinds so far: `reseeded`); returns lines for the log."""

    def forward_backward(self, step: int) -> StepOutcome:
        """Forward and backward of optimizer step `step` (0-based); gradients accumulate in the
        model, nothing is updated."""

    def fields(self, groups: dict[str, dict[str, float]], weights: dict[str, float]) -> dict[str, Any]:
        """The step's metrics.jsonl fields from the (rank-averaged) groups; `loss` is the
        objective that was backpropagated."""

    def close(self) -> None:
        """Release the data loaders (their worker processes) now, when the run ends."""


def stream_seed(seed: int, stream: int) -> int:
    """The data seed of stream `stream` of a run seeded `seed` (stream 0 is `seed` itself)."""
    if stream == 0:
        return seed
    return int(np.random.SeedSequence([seed, stream, 0x5EED]).generate_state(1)[0] & 0x7FFFFFFF)


def reseeded(cfg: RunConfig, stream: int) -> RunConfig:
    """`cfg` whose data order, augmentation and masks come from stream `stream` (after `stream`
    rewinds: the same steps with other batches and masks)."""
    return cfg if stream == 0 else replace(cfg, train=replace(cfg.train, seed=stream_seed(cfg.train.seed, stream)))


def mask_warning(batch: PretrainBatch, mask_prob: float) -> str | None:
    """A warning when masks of the batch leave no token visible to the student."""
    mask = batch.mask
    if mask is None or mask.ndim != 2 or not mask.numel():
        return None
    hidden = mask
    pad = batch.padding_mask
    if pad is not None and pad.ndim == 2 and pad.shape[1] == mask.shape[1] and mask.shape[0] % pad.shape[0] == 0:
        hidden = mask | pad.repeat_interleave(mask.shape[0] // pad.shape[0], dim=0)
    blind = int(hidden.all(dim=1).sum())
    if not blind:
        return None
    return (
        f"warning: {blind} of the {mask.shape[0]} masks of the first batch leave no visible token "
        f"(masking.mask_prob={mask_prob:g}): the student sees only mask tokens and cannot learn from the "
        "input; lower masking.mask_prob"
    )


def next_batch(it: Iterator[PretrainBatch], skipped: list[str], on_bad_input: str) -> PretrainBatch:
    """The next non-empty batch; bad inputs are recorded in `skipped`, or raised under
    data.on_bad_input=fail."""
    while True:
        b = next(it)
        if b.skipped and on_bad_input == "fail":
            raise BadInputError(b.skipped[0] + " (set data.on_bad_input=skip to skip bad files)")
        skipped.extend(b.skipped)
        if b.inputs.numel():
            return b


def to_device(b: PretrainBatch, device: torch.device) -> Batch:
    def move(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    return Batch(b.inputs.to(device, non_blocking=True), move(b.mask), move(b.padding_mask), move(b.student_inputs))


class SingleObjective:
    """One modality: the data2vec loss of `train.grad_accum` micro-batches."""

    def __init__(
        self, cfg: RunConfig, step_model: nn.Module, dist: Dist, device: torch.device, skipped: list[str]
    ) -> None:
        self.cfg, self.step_model, self.dist, self.device, self.skipped = cfg, step_model, dist, device, skipped
        self.data: Iterator[PretrainBatch] = iter(())
        self.samples = 0
        self.notes: list[str] = []
        self.mask_checked = False

    def seek(self, step: int, stream: int = 0) -> list[str]:
        self.close()  # the old loader's workers go before the new ones start
        self.data, self.samples = build_pretrain_loader(
            reseeded(self.cfg, stream), step * self.cfg.train.grad_accum, self.dist.rank, self.dist.world_size
        )
        self.notes = [str(note) for note in getattr(self.data, "notes", ())]  # optional, per pipeline
        return self.notes

    def forward_backward(self, step: int) -> StepOutcome:
        tc = self.cfg.train
        sums: dict[str, float] = {}
        samples = 0
        warnings: list[str] = []
        for micro in range(tc.grad_accum):
            raw = next_batch(self.data, self.skipped, self.cfg.data.on_bad_input)
            if not self.mask_checked:
                self.mask_checked = True
                warnings += [w] if (w := mask_warning(raw, self.cfg.masking.mask_prob)) else []
            batch = to_device(raw, self.device)
            with self.dist.accumulating(self.step_model, last=micro == tc.grad_accum - 1):
                with autocast(self.device, tc.precision):
                    out = self.step_model(batch)
                (out.loss / tc.grad_accum).backward()
            samples += batch.inputs.shape[0]
            sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach()) / tc.grad_accum
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / tc.grad_accum
        return StepOutcome({"": sums}, {"": 1.0}, samples, warnings)

    def fields(self, groups: dict[str, dict[str, float]], weights: dict[str, float]) -> dict[str, Any]:
        return dict(groups[""])

    def close(self) -> None:
        # Dropping the last reference shuts the workers down at once; left to the garbage
        # collector, each loader with workers costs a 5 s timeout.
        self.data = iter(())


PER_MODALITY_METRICS = ("loss", "target_std", "pred_std")
"""Logged per modality in every joint step record as `<name>_<modality>`."""


def backward_step(
    model: nn.Module,
    weights: dict[str, float],
    next_batch: Callable[[str], Batch],
    train: TrainConfig,
    device: torch.device,
    accumulating: Callable[[bool], Any] | None = None,
) -> tuple[dict[str, dict[str, float]], int]:
    """Forward and backward of one joint optimizer step (no update): for each modality in
    `weights`, `train.grad_accum` batches from `next_batch(modality)`, each loss scaled by the
    modality's weight, gradients accumulating. Backpropagating modality by modality gives the
    gradient of the weighted sum while holding one modality's graph at a time. `accumulating(last)`
    wraps each backward (DDP: no all-reduce until the last). Returns each modality's metrics
    (loss and `StepOutput.metrics`, means over the micro-batches) and the samples seen."""
    metrics: dict[str, dict[str, float]] = {}
    samples, n, total = 0, 0, len(weights) * train.grad_accum
    for m, weight in weights.items():
        sums: dict[str, float] = {}
        for _ in range(train.grad_accum):
            batch = next_batch(m)
            n += 1
            with accumulating(n == total) if accumulating is not None else contextlib.nullcontext():
                with autocast(device, train.precision):
                    out = model(batch, m)
                (out.loss * weight / train.grad_accum).backward()
            samples += batch.inputs.shape[0]
            for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / train.grad_accum
        metrics[m] = sums
    return metrics, samples


def step_record(metrics: dict[str, dict[str, float]], weights: dict[str, float]) -> dict[str, Any]:
    """A joint step's metrics.jsonl fields: `modality`, the weighted mean of every metric (`loss` is
    the objective that was backpropagated), and `PER_MODALITY_METRICS` per modality."""
    record: dict[str, Any] = {"modality": "+".join(metrics)}
    for k in metrics[next(iter(metrics))]:
        record[k] = sum(weights[m] * ms[k] for m, ms in metrics.items())
    for m, ms in metrics.items():
        record.update({f"{k}_{m}": ms[k] for k in PER_MODALITY_METRICS})
    return record


class JointObjective:
    """A joint run: per step, the modalities `step_weights` gives, each with its loss weight."""

    def __init__(
        self, cfg: JointConfig, step_model: nn.Module, dist: Dist, device: torch.device, skipped: list[str]
    ) -> None:
        self.cfg, self.step_model, self.dist, self.device, self.skipped = cfg, step_model, dist, device, skipped
        self.loaders: dict[str, Iterator[PretrainBatch]] = {}
        self.notes: list[str] = []
        self.mask_checked: set[str] = set()
        self.warnings: list[str] = []

    def seek(self, step: int, stream: int = 0) -> list[str]:
        """One endless loader per modality, each at the micro-batch it had reached by `step`."""
        counts = steps_per_modality(self.cfg, step)
        self.close()
        lines = []
        for m in self.cfg.modalities:
            member = self.cfg.member(m)
            self.loaders[m], n = build_pretrain_loader(
                reseeded(member, stream), counts[m] * self.cfg.train.grad_accum, self.dist.rank, self.dist.world_size
            )
            lines.append(f"{m}: {n} samples, batch {member.data.batch_size}x{self.cfg.train.grad_accum}")
            lines += [f"{m}: {note}" for note in getattr(self.loaders[m], "notes", ())]
        return lines

    def _batch(self, m: str) -> Batch:
        on_bad_input = self.cfg.section(m).data.on_bad_input
        raw = next_batch(self.loaders[m], self.skipped, on_bad_input)
        if m not in self.mask_checked:
            self.mask_checked.add(m)
            if w := mask_warning(raw, self.cfg.member(m).masking.mask_prob):
                self.warnings.append(f"{m}: {w}")
        return to_device(raw, self.device)

    def _accumulating(self, last: bool) -> Any:
        return self.dist.accumulating(self.step_model, last=last)

    def forward_backward(self, step: int) -> StepOutcome:
        weights = step_weights(self.cfg, step)
        groups, samples = backward_step(
            self.step_model, weights, self._batch, self.cfg.train, self.device, self._accumulating
        )
        warnings, self.warnings = self.warnings, []
        return StepOutcome(groups, weights, samples, warnings)

    def fields(self, groups: dict[str, dict[str, float]], weights: dict[str, float]) -> dict[str, Any]:
        return step_record(groups, weights)

    def close(self) -> None:
        self.loaders.clear()  # see SingleObjective.close


def joint_model(step_model: nn.Module) -> JointData2Vec:
    """The JointData2Vec inside a (possibly DDP-wrapped) step model."""
    inner = getattr(step_model, "module", step_model)
    assert isinstance(inner, JointData2Vec)
    return inner
