"""Modality front-ends, looked up by name."""

from __future__ import annotations

from collections.abc import Callable

from data2vec.config import ModelConfig
from data2vec.modalities.audio import AudioFrontend
from data2vec.modalities.base import ContextEncoder, EncoderInput, Frontend, LocalEncoder, Tokens
from data2vec.modalities.image import ImageFrontend
from data2vec.modalities.text import TextFrontend

FRONTENDS: dict[str, Callable[[ModelConfig], Frontend]] = {
    "image": ImageFrontend,
    "audio": AudioFrontend,
    "text": TextFrontend,
}


def build_frontend(cfg: ModelConfig) -> Frontend:
    return FRONTENDS[cfg.modality](cfg)


__all__ = ["FRONTENDS", "ContextEncoder", "EncoderInput", "Frontend", "LocalEncoder", "Tokens", "build_frontend"]
