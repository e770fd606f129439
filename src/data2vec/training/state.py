"""What a run carries from step to step besides the weights, and the one way it is saved and
restored: a resume restores everything, a rewind everything but the counters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from data2vec.checkpoint import Checkpoint
from data2vec.distributed import Dist


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (collapse, non-finite loss); the last checkpoint is intact."""


class TrainingInterrupted(TrainingStopped):
    """A stop signal (SIGTERM, SIGINT) ended the run after a checkpoint; resume it with --resume."""


EXIT_INTERRUPTED = 75
"""The command's exit status after a stop signal (sysexits.h EX_TEMPFAIL: try again later)."""


@dataclass
class RunState:
    """Counters that survive resumes and rewinds (saved in every checkpoint's state.pt)."""

    lr_scale: float = 1.0
    """Multiplies the scheduled learning rate; each collapse rewind lowers it."""
    nan_skipped: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient (train.on_nan=skip)."""
    rewinds: int = 0
    skipped_inputs: list[str] = field(default_factory=list)
    """Bad input files skipped so far (data.on_bad_input=skip), one entry per encounter."""

    def counters(self) -> dict[str, Any]:
        return {
            "lr_scale": self.lr_scale,
            "nan_skipped": self.nan_skipped,
            "rewinds": self.rewinds,
            "skipped_inputs": self.skipped_inputs,
        }

    def load_counters(self, saved: Mapping[str, Any]) -> None:
        """From a checkpoint's state (older checkpoints may lack some keys)."""
        self.lr_scale = saved.get("lr_scale", self.lr_scale)
        self.nan_skipped = saved.get("nan_skipped", self.nan_skipped)
        self.rewinds = saved.get("rewinds", self.rewinds)
        self.skipped_inputs[:] = saved.get("skipped_inputs", [])  # the same list: loaders append to it


@dataclass
class Learner:
    """The model being trained, its optimizer, and where it runs."""

    model: nn.Module
    """The bare model (not a DDP wrapper): its parameters are clipped and stepped, its teacher updated."""
    optimizer: torch.optim.Optimizer
    dist: Dist
    device: torch.device

    def snapshot(self, step: int, state: RunState) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
        """(student weights, teacher weights, state.pt contents) after `step` steps. Collective
        under torchrun (FSDP gathers shards; every rank's RNG state is collected)."""
        student, teacher, optim_state = self.dist.checkpoint_parts(self.model, self.optimizer)
        saved: dict[str, Any] = {
            "optimizer": optim_state,
            "step": step,
            "rng_cpu": torch.get_rng_state(),
            **state.counters(),
            **self.dist.rng_states(),
        }
        if self.device.type == "cuda":
            saved["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return student, teacher, saved

    def restore(self, ck: Checkpoint, state: RunState, *, counters: bool) -> None:
        """Weights, optimizer and RNG from `ck`; with `counters`, the run counters too (a resume;
        a rewind keeps counting)."""
        self.dist.load_checkpoint(self.model, self.optimizer, {**ck.student, **ck.teacher}, ck.state["optimizer"])
        torch.set_rng_state(ck.state["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in ck.state:
            torch.cuda.set_rng_state(ck.state["rng_cuda"], self.device)
        self.dist.restore_rng(ck.state)
        if counters:
            state.load_counters(ck.state)
