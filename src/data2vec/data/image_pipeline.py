"""Image pretraining batches: augmented views of an image source, with block masks drawn per batch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from data2vec.config import RunConfig
from data2vec.data.batch import NothingUsable, PretrainBatch, PretrainItem
from data2vec.data.errors import BadInputError
from data2vec.data.images import ImageSource, PretrainTransform, TableImageSource, open_image_source
from data2vec.data.sampling import ResumableBatchSampler, batch_generator
from data2vec.data.tables import RowGroupBatchSampler
from data2vec.data.workers import ignore_stop_signals
from data2vec.masking import masks_from_config


class ImagePretrainDataset(Dataset[PretrainItem]):
    def __init__(self, source: ImageSource, transform: PretrainTransform, on_bad_input: str) -> None:
        self.source, self.transform, self.on_bad_input = source, transform, on_bad_input

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> PretrainItem:
        index, seed = item
        try:
            img = self.source.load(index)
            return PretrainItem(self.transform(img, np.random.default_rng(seed)), seed, None)
        except BadInputError as e:
            # Reported, not raised: the training loop applies data.on_bad_input in the main
            # process, so the error reaches the user as one line rather than a worker traceback.
            return PretrainItem(None, seed, str(e))


class MaskMaker:
    """Draws the (B*M, T) masks for a batch; picklable, for loader workers."""

    def __init__(self, cfg: RunConfig, grid: tuple[int, int]) -> None:
        self.masking, self.version, self.grid = cfg.masking, cfg.model.version, grid

    def __call__(self, batch: int, generator: torch.Generator) -> Tensor:
        return masks_from_config(self.masking, batch, self.grid, version=self.version, generator=generator)


class Collate:
    def __init__(self, mask_maker: Callable[[int, torch.Generator], Tensor]) -> None:
        self.mask_maker = mask_maker

    def __call__(self, items: list[PretrainItem]) -> PretrainBatch:
        good = [it for it in items if it.x is not None]
        skipped = [it.error for it in items if it.error is not None]
        if not good:
            return PretrainBatch(torch.empty(0), torch.empty(0, dtype=torch.bool), skipped)
        x = torch.stack([it.x for it in good if it.x is not None])
        mask = self.mask_maker(len(good), batch_generator([it.seed for it in good]))
        return PretrainBatch(x, mask, skipped)


def pretrain_decode_size(
    size: tuple[int, int], crop_scale: tuple[float, float], crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int]:
    """The least (height, width) a JPEG is decoded at for pretraining: large enough that the
    smallest crop the augmentation takes (area fraction crop_scale[0], aspect ratio in
    crop_ratio) still spans the output's size, so reduced-scale decoding never upsamples it.
    Such a crop spans sqrt(scale * ratio) of the image's side (or sqrt(scale / ratio))."""
    narrowest = min(crop_ratio[0], 1 / crop_ratio[1], 1.0)
    side = math.ceil(max(size) / math.sqrt(max(crop_scale[0], 1e-6) * narrowest))
    return side, side


def image_source_for(cfg: RunConfig) -> ImageSource:
    if not cfg.data.path:
        raise FileNotFoundError("data.path: no data given (pass --data PATH)")
    return open_image_source(
        cfg.data.path,
        image_size=cfg.model.image.image_size[0],
        on_bad_input=cfg.data.on_bad_input,
        min_size=pretrain_decode_size(cfg.model.image.image_size, cfg.data.crop_scale),
        max_pixels=cfg.data.max_image_pixels,
        column=cfg.data.column,
    )


class ImageBatches(Iterator[PretrainBatch]):
    """The loader's batches. What indexing found wrong under on_bad_input=skip (tar shards cut
    short or with damaged headers, `TarShardSource.problems`; unusable parquet/arrow files) rides
    on the first batch, so the run's summary lists each once; and with skip, two epochs of batches without one usable
    image stop the run with a BadInputError for the data (`NothingUsable`) instead of looping."""

    def __init__(
        self, it: Iterator[PretrainBatch], source: ImageSource, location: str, on_bad_input: str, empty_limit: int
    ) -> None:
        self._it, self.on_bad_input = it, on_bad_input
        problems = [str(p) for p in getattr(source, "problems", [])]
        self._pending = problems
        self.notes = (
            [f"images: {len(problems)} damaged file(s) or part(s) of tar shards left out (data.on_bad_input=skip)"]
            if problems
            else []
        )
        self._nothing_usable = NothingUsable(location, "images", len(source), empty_limit)

    def __next__(self) -> PretrainBatch:
        b = next(self._it)
        if self.on_bad_input != "fail":
            self._nothing_usable.check(b)
        if self._pending:
            b = b._replace(skipped=self._pending + b.skipped)
            self._pending = []
        return b


def image_loader(cfg: RunConfig, start_batch: int, rank: int, world_size: int) -> tuple[Iterator[PretrainBatch], int]:
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
    sampler: ResumableBatchSampler | RowGroupBatchSampler
    if isinstance(source, TableImageSource):  # read a row group at a time (data/tables.py)
        sampler = RowGroupBatchSampler(
            source.rows.group_rows, dcfg.batch_size, cfg.train.seed, start_batch, rank, world_size, dcfg.shuffle_buffer
        )
        source.rows.cache_groups = sampler.cache_groups
    else:
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
        worker_init_fn=ignore_stop_signals,
        # Its own generator, so creating the loader never draws from the global RNG
        # (which drives dropout and must replay exactly on resume).
        generator=torch.Generator().manual_seed(cfg.train.seed),
        **loader_kwargs,
    )
    batches = ImageBatches(iter(loader), source, dcfg.path, dcfg.on_bad_input, 2 * sampler.batches_per_epoch)
    return batches, len(dataset)


class ImagePipeline:
    """`PretrainPipeline` for images."""

    def check(self, cfg: RunConfig) -> None:
        image_source_for(cfg)

    def prepare(self, cfg: RunConfig, run_dir: Path) -> RunConfig:
        return cfg

    def loader(
        self, cfg: RunConfig, start_batch: int, rank: int, world_size: int
    ) -> tuple[Iterator[PretrainBatch], int]:
        return image_loader(cfg, start_batch, rank, world_size)
