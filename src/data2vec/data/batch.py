"""What the data layer hands on: pretraining samples and batches, and lazily loaded inputs for
feature extraction and probes."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

from data2vec.data.errors import BadInputError


class PretrainItem(NamedTuple):
    """One pretraining sample as a loader worker returns it (images, speech)."""

    x: Tensor | None
    """The sample, or None when it could not be read."""
    seed: int
    """Its sample seed (drives the batch's mask generator)."""
    error: str | None
    """Why it could not be read ('path: reason'), reported rather than raised."""


class PretrainBatch(NamedTuple):
    inputs: Tensor
    """The teacher's input: (B, C, H, W) images, (B, L) waveforms or (B, T) token ids. For images
    the same augmented view feeds student and teacher."""
    mask: Tensor
    """(B*M, T) bool over tokens, True = masked."""
    skipped: list[str]
    """Messages for samples dropped from this batch under on_bad_input=skip."""
    padding_mask: Tensor | None = None
    """(B, L) input-level padding, True = pad."""
    student_inputs: Tensor | None = None
    """The student's corrupted input when masking happens at the input (1.0 text)."""


class EvalItem(NamedTuple):
    """One input to feature extraction: its length (samples, tokens; 1 for images) and how to load it."""

    name: str
    length: int
    load: Callable[[], Tensor]


class NothingUsable:
    """Stops a run whose data has nothing usable left. Under data.on_bad_input=skip the training
    loop waits for a batch with at least one usable sample; when every sample is bad it would
    wait forever. `limit` batches in a row without one (two epochs' worth: every sample was
    tried) raise BadInputError for the data instead, naming the last reason."""

    def __init__(self, location: str, what: str, count: int, limit: int) -> None:
        self.location, self.what, self.count, self.limit = location, what, count, limit
        self.run = 0

    def check(self, batch: PretrainBatch) -> None:
        self.run = self.run + 1 if batch.inputs.numel() == 0 else 0
        if self.limit and self.run >= self.limit:
            last = batch.skipped[-1] if batch.skipped else "none"
            raise BadInputError(
                self.location,
                f"no usable {self.what}: none of the {self.count} {self.what} could be read in "
                f"{self.run} batches in a row (last: {last})",
            )
