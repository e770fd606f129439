"""Tiny speech and text configurations shared by the test files: `--set`-style overrides that
shrink the `audio-tiny` / `text-tiny` presets to width 32 and depth 2 (a 3-layer CNN, 2
positional convs, a 1-layer decoder), and the RunConfigs built from them.
"""

from __future__ import annotations

from data2vec import tiny
from data2vec.config import RunConfig, apply_overrides
from data2vec.presets import preset

TINY_AUDIO_SHAPE = tiny.AUDIO_SHAPE
"""The speech model's widths and layers, without the decoder depth and the run settings."""
TINY_AUDIO = tiny.AUDIO
TINY_TEXT = tiny.TEXT
"""The text model; the vocabulary size is left to the caller."""


def tiny_audio_config(version: int = 2, *extra: str) -> RunConfig:
    """`audio-tiny` of data2vec `version` shrunk by TINY_AUDIO, then `extra` overrides."""
    return apply_overrides(preset("audio-tiny", version), [*TINY_AUDIO, *extra])


def tiny_text_config(version: int = 2, *extra: str) -> RunConfig:
    """`text-tiny` of data2vec `version` shrunk by TINY_TEXT, then `extra` overrides."""
    return apply_overrides(preset("text-tiny", version), [*TINY_TEXT, *extra])
