"""TensorBoard event files (`train.loggers=[tensorboard]`, the optional extra `tensorboard`).

`TensorBoardLog` is the pretraining hook: in RUN_DIR/tensorboard/, on rank 0, every metrics.jsonl
row as scalars (the same row, on the steps MetricsLog writes it; tags are the row's keys), and at
each checkpoint the picture of what the student of an image model sees under its masks
(`plots.masked_grid`; tag `masked_inputs`, `masked_inputs/<modality>` in a joint run). `EventLog`
is the writer it and fine-tuning share.

Resumes and rewinds write steps an earlier writer may have written already (a crash after the last
checkpoint, the steps a rewind abandons). Each writer starts with a SessionLog START at the first step
it will write (SummaryWriter's `purge_step`), and a rewind writes another: TensorBoard drops the
events at that step and after that it read before, so every step shows once, as metrics.jsonl has it.
Everything up to a checkpoint is flushed with it, so a crash loses no step the resume keeps.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from data2vec.config import ConfigError, RunConfig
from data2vec.data.errors import BadInputError
from data2vec.data.image_pipeline import image_source_for
from data2vec.data.images import eval_transform
from data2vec.model import Data2Vec
from data2vec.training.hooks import Decision, Hook, RunContext, StepInfo, logging_step
from data2vec.training.plots import masked_grid
from data2vec.writes import writing

TENSORBOARD_DIR = "tensorboard"
"""The event files' folder in a run (or fine-tuning output) directory."""
INSTALL = "pip install 'data2vec[tensorboard]'"
PICTURE_IMAGES = 8
"""The masked-inputs picture shows this many images (the first of data.path that decode)."""
WHAT = "TensorBoard events"


def require_loggers(loggers: Collection[str], key: str) -> None:
    """Fail in one line, naming the extra to install, when a requested logger's package is missing."""
    if "tensorboard" not in loggers:
        return
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(f"{key}: tensorboard needs the tensorboard package: {INSTALL}") from None


class EventLog:
    """One event file in `log_dir`. TensorBoard drops whatever earlier writers there wrote at steps
    >= `purge_from` (a resumed run writes those steps anew)."""

    def __init__(self, log_dir: Path, purge_from: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        with writing(log_dir, WHAT):
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_from)

    def scalars(self, row: Mapping[str, Any], step: int, skip: Collection[str] = ("step",)) -> None:
        """The row's numbers (not `skip`, strings or flags) at `step`, tagged by their keys."""
        with writing(self.log_dir, WHAT):
            for key, value in row.items():
                if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def image(self, tag: str, picture: np.ndarray, step: int) -> None:
        """A uint8 picture, (H, W) or (H, W, C)."""
        with writing(self.log_dir, WHAT):
            self.writer.add_image(tag, picture, step, dataformats="HW" if picture.ndim == 2 else "HWC")

    def purge_from(self, step: int) -> None:
        """TensorBoard drops the events at steps >= `step` written before this call (a rewind)."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        start = Event(step=step, session_log=SessionLog(status=SessionLog.START))  # what purge_step writes
        with writing(self.log_dir, WHAT):
            cast(Any, self.writer)._get_file_writer().add_event(start)

    def flush(self) -> None:
        with writing(self.log_dir, WHAT):
            self.writer.flush()

    def close(self) -> None:
        with writing(self.log_dir, WHAT):
            self.writer.close()


def picture_images(cfg: RunConfig, n: int = PICTURE_IMAGES) -> torch.Tensor | None:
    """The first `n` images of data.path that decode (of the first 4n), resized and normalised as for
    probes; None when none does."""
    source = image_source_for(cfg)
    icfg = cfg.model.image
    images = []
    for i in range(min(len(source), 4 * n)):
        try:
            img = source.load(i)
        except BadInputError:
            continue
        images.append(eval_transform(img, icfg.image_size, icfg.channels, cfg.data.mean, cfg.data.std))
        if len(images) == n:
            break
    return torch.stack(images) if images else None


class TensorBoardLog(Hook):
    """RUN_DIR/tensorboard/ on rank 0: the metrics.jsonl rows, and the masked-inputs picture of each
    image model at each checkpoint (speech and text have no picture). Runs after MetricsLog, whose
    row it writes; `start`: the step the run (re)starts from."""

    def __init__(self, ctx: RunContext, members: Mapping[str, tuple[RunConfig, Data2Vec]], start: int) -> None:
        self.ctx = ctx
        self.events = EventLog(ctx.run_dir / TENSORBOARD_DIR, start + 1) if ctx.dist.is_main else None
        self.pictured = {g: member for g, member in members.items() if member[0].model.modality == "image"}
        self.images: dict[str, torch.Tensor | None] = {}

    def after_step(self, info: StepInfo) -> Decision | None:
        if self.events is not None and logging_step(info.step, self.ctx.train):
            self.events.scalars(info.record, info.step)
        return None

    def on_checkpoint(self, step: int) -> None:
        if self.events is None:
            return
        for g, (cfg, model) in self.pictured.items():
            if g not in self.images:  # read once, at the first checkpoint
                self.images[g] = picture_images(cfg)
            images = self.images[g]
            if images is not None:
                picture = masked_grid(model, images, cfg.data.mean, cfg.data.std, seed=step)
                self.events.image(f"masked_inputs/{g}" if g else "masked_inputs", picture, step)
        self.events.flush()

    def on_rewind(self, step: int) -> None:
        if self.events is not None:
            self.events.purge_from(step + 1)

    def on_end(self, step: int) -> None:
        if self.events is not None:
            self.events.close()


def logger_hooks(ctx: RunContext, members: Mapping[str, tuple[RunConfig, Data2Vec]], start: int) -> list[Hook]:
    """The hooks `train.loggers` asks for, for a run (re)starting at step `start`."""
    return [TensorBoardLog(ctx, members, start)] if "tensorboard" in ctx.train.loggers else []
