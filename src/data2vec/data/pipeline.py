"""From a `RunConfig` to an endless, resumable stream of pretraining batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from data2vec.config import RunConfig
from data2vec.data.errors import BadInputError
from data2vec.data.images import ImageSource, PretrainTransform, open_image_source
from data2vec.data.sampling import ResumableBatchSampler, batch_generator
from data2vec.masking import draw_masks


class Item(NamedTuple):
    x: Tensor | None
    seed: int
    error: str | None


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


class ImagePretrainDataset(Dataset[Item]):
    def __init__(self, source: ImageSource, transform: PretrainTransform, on_bad_input: str) -> None:
        self.source, self.transform, self.on_bad_input = source, transform, on_bad_input

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> Item:
        index, seed = item
        try:
            img = self.source.load(index)
            return Item(self.transform(img, np.random.default_rng(seed)), seed, None)
        except BadInputError as e:
            # Reported, not raised: the training loop applies data.on_bad_input in the main
            # process, so the error reaches the user as one line rather than a worker traceback.
            return Item(None, seed, str(e))


class MaskMaker:
    """Draws the (B*M, T) masks for a batch; picklable, for loader workers."""

    def __init__(self, cfg: RunConfig, grid: tuple[int, int]) -> None:
        self.m = cfg.masking
        self.grid = grid
        self.num_masks = cfg.masking.num_masks if cfg.model.version == 2 else 1

    def __call__(self, batch: int, generator: torch.Generator) -> Tensor:
        m = self.m
        return draw_masks(
            m.kind,
            batch,
            self.grid,
            m.mask_prob,
            generator=generator,
            num_masks=self.num_masks,
            mask_length=m.mask_length,
            mask_prob_adjust=m.mask_prob_adjust,
            min_block_patches=m.min_block_patches,
        )


class Collate:
    def __init__(self, mask_maker: Callable[[int, torch.Generator], Tensor]) -> None:
        self.mask_maker = mask_maker

    def __call__(self, items: list[Item]) -> PretrainBatch:
        good = [it for it in items if it.x is not None]
        skipped = [it.error for it in items if it.error is not None]
        if not good:
            return PretrainBatch(torch.empty(0), torch.empty(0, dtype=torch.bool), skipped)
        x = torch.stack([it.x for it in good if it.x is not None])
        mask = self.mask_maker(len(good), batch_generator([it.seed for it in good]))
        return PretrainBatch(x, mask, skipped)


class PretrainPipeline(Protocol):
    """What a modality provides to the training loop."""

    def check(self, cfg: RunConfig) -> None:
        """Fail early, with the path in the message, if the data cannot be used."""

    def prepare(self, cfg: RunConfig, run_dir: Path) -> RunConfig:
        """Once, before the model is built (e.g. train a tokenizer); returns the final config."""

    def loader(
        self, cfg: RunConfig, start_batch: int, rank: int, world_size: int
    ) -> tuple[Iterator[PretrainBatch], int]:
        """Endless batches from micro-batch `start_batch` on, and the number of samples."""


def image_source_for(cfg: RunConfig) -> ImageSource:
    if not cfg.data.path:
        raise FileNotFoundError("data.path: no data given (pass --data PATH)")
    return open_image_source(
        cfg.data.path, image_size=cfg.model.image.image_size[0], on_bad_input=cfg.data.on_bad_input
    )


def _image_loader(cfg: RunConfig, start_batch: int, rank: int, world_size: int) -> tuple[Iterator[PretrainBatch], int]:
    source = image_source_for(cfg)
    icfg, dcfg = cfg.model.image, cfg.data
    transform = PretrainTransform(
        size=icfg.image_size,
        channels=icfg.channels,
        crop_scale=dcfg.crop_scale,
        hflip=dcfg.hflip,
        color_jitter=dcfg.color_jitter,
        mean=dcfg.mean,
        std=dcfg.std,
    )
    dataset = ImagePretrainDataset(source, transform, dcfg.on_bad_input)
    sampler = ResumableBatchSampler(
        len(dataset), dcfg.batch_size, cfg.train.seed, start_batch, rank=rank, world_size=world_size
    )
    loader_kwargs: dict[str, Any] = {}
    if dcfg.num_workers > 0:
        loader_kwargs = {"persistent_workers": True, "prefetch_factor": 4}
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=Collate(MaskMaker(cfg, icfg.grid)),
        num_workers=dcfg.num_workers,
        # Its own generator, so creating the loader never draws from the global RNG
        # (which drives dropout and must replay exactly on resume).
        generator=torch.Generator().manual_seed(cfg.train.seed),
        **loader_kwargs,
    )
    return iter(loader), len(dataset)


class ImagePipeline:
    def check(self, cfg: RunConfig) -> None:
        image_source_for(cfg)

    def prepare(self, cfg: RunConfig, run_dir: Path) -> RunConfig:
        return cfg

    def loader(
        self, cfg: RunConfig, start_batch: int, rank: int, world_size: int
    ) -> tuple[Iterator[PretrainBatch], int]:
        return _image_loader(cfg, start_batch, rank, world_size)


PIPELINES: dict[str, PretrainPipeline] = {
    "image": ImagePipeline(),
}


def pipeline_for(cfg: RunConfig) -> PretrainPipeline:
    return PIPELINES[cfg.model.modality]


def build_pretrain_loader(
    cfg: RunConfig, start_batch: int, rank: int = 0, world_size: int = 1
) -> tuple[Iterator[PretrainBatch], int]:
    """An endless iterator of batches starting at micro-batch `start_batch`, and the data size."""
    return pipeline_for(cfg).loader(cfg, start_batch, rank, world_size)


# Pipelines in their own modules import PretrainBatch from here, so they register last.
from data2vec.data.audio import AudioPipeline  # noqa: E402

PIPELINES["audio"] = AudioPipeline()

from data2vec.data.text import TextPipeline  # noqa: E402

PIPELINES["text"] = TextPipeline()
