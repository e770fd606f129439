"""From a `RunConfig` to an endless, resumable stream of pretraining batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from data2vec.config import RunConfig
from data2vec.data.images import BadInputError, ImageSource, PretrainTransform, open_image_source
from data2vec.data.sampling import ResumableBatchSampler, batch_generator
from data2vec.masking import draw_masks


class Item(NamedTuple):
    x: Tensor | None
    seed: int
    error: str | None


class PretrainBatch(NamedTuple):
    inputs: Tensor
    """(B, C, H, W) images; the same augmented view feeds student and teacher."""
    mask: Tensor
    """(B*M, T) bool, True = masked."""
    skipped: list[str]
    """Messages for samples dropped from this batch under on_bad_input=skip."""


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
            if self.on_bad_input == "fail":
                raise
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
            block_size=m.block_size,
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


def image_source_for(cfg: RunConfig) -> ImageSource:
    if not cfg.data.path:
        raise FileNotFoundError("data.path: no data given (pass --data PATH)")
    return open_image_source(
        cfg.data.path, image_size=cfg.model.image.image_size[0], on_bad_input=cfg.data.on_bad_input
    )


def build_pretrain_loader(
    cfg: RunConfig, start_batch: int, rank: int = 0, world_size: int = 1
) -> tuple[Iterator[PretrainBatch], int]:
    """An endless iterator of batches starting at micro-batch `start_batch`, and the data size."""
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
