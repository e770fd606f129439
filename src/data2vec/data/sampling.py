"""Deterministic, resumable sampling shared by every modality.

The data position is a pure function of the micro-batch counter: micro-batch k of the
run reads epoch k // batches_per_epoch of a permutation seeded by (seed, epoch). Every
sample gets its own seed from (seed, epoch, index), used for augmentation and masking,
so a resumed run sees exactly the batches an uninterrupted run would have seen, no
matter how many loader workers there are.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def batch_generator(seeds: list[int]) -> torch.Generator:
    """A torch generator seeded from the seeds of the samples in a batch."""
    state = np.random.SeedSequence(seeds).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class ResumableBatchSampler:
    """Yields micro-batches of (dataset index, sample seed) forever, starting at `start_batch`.

    With `world_size` processes, each global batch of `batch_size * world_size` samples is
    split so rank r reads the r-th slice; the last incomplete batch of an epoch is dropped.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(
                f"the data has {num_samples} samples, fewer than one batch of {global_batch}; "
                "lower data.batch_size or add data"
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start_batch, self.rank, self.world_size, self.shuffle = start_batch, rank, world_size, shuffle
        self.batches_per_epoch = num_samples // global_batch

    def position(self, batch: int) -> tuple[int, int]:
        """(epoch, batch within epoch) of micro-batch `batch`."""
        return divmod(batch, self.batches_per_epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.start_batch
        epoch, _ = self.position(k)
        order = self._order(epoch)
        while True:
            e, j = self.position(k)
            if e != epoch:
                epoch, order = e, self._order(e)
            start = (j * self.world_size + self.rank) * self.batch_size
            idx = order[start : start + self.batch_size].tolist()
            yield [(i, sample_seed(self.seed, epoch, i)) for i in idx]
            k += 1

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1 & 0x7FFFFFFF))
        return torch.randperm(self.num_samples, generator=g)
