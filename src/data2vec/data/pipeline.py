"""From a `RunConfig` to an endless, resumable stream of pretraining batches: the registry of
modality pipelines (images: data/image_pipeline.py, speech: data/audio.py, text: data/text.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from data2vec.config import RunConfig
from data2vec.data.audio import AudioPipeline
from data2vec.data.batch import PretrainBatch
from data2vec.data.image_pipeline import ImagePipeline
from data2vec.data.text import TextPipeline


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


PIPELINES: dict[str, PretrainPipeline] = {
    "image": ImagePipeline(),
    "audio": AudioPipeline(),
    "text": TextPipeline(),
}


def pipeline_for(cfg: RunConfig) -> PretrainPipeline:
    return PIPELINES[cfg.model.modality]


def build_pretrain_loader(
    cfg: RunConfig, start_batch: int, rank: int = 0, world_size: int = 1
) -> tuple[Iterator[PretrainBatch], int]:
    """An endless iterator of batches starting at micro-batch `start_batch`, and the data size."""
    return pipeline_for(cfg).loader(cfg, start_batch, rank, world_size)
