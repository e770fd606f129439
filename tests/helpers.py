"""Tiny speech and text configurations shared by the test files: `--set`-style overrides that
shrink the `audio-tiny` / `text-tiny` presets to width 32 and depth 2 (a 3-layer CNN, 2
positional convs, a 1-layer decoder), and the RunConfigs built from them.
"""

from __future__ import annotations

from data2vec.config import RunConfig, apply_overrides
from data2vec.presets import preset

TINY_AUDIO_SHAPE = [
    "model.encoder.dim=32",
    "model.encoder.depth=2",
    "model.encoder.num_heads=4",
    "model.audio.conv_layers=[[16,10,5],[16,3,2],[16,3,2]]",
    "model.audio.pos_conv_depth=2",
    "model.audio.pos_conv_kernel=5",
    "model.audio.pos_conv_groups=4",
    "model.decoder.dim=32",
    "model.decoder.groups=4",
]
"""The speech model's widths and layers, without the decoder depth and the run settings."""

TINY_AUDIO = [*TINY_AUDIO_SHAPE, "model.decoder.layers=1", "targets.top_k=2", "train.precision=fp32"]

TINY_TEXT = [
    "model.encoder.dim=32",
    "model.encoder.depth=2",
    "model.encoder.num_heads=2",
    "model.decoder.dim=32",
    "model.decoder.layers=1",
    "model.text.max_positions=32",
    "model.text.mask_id=4",
    "data.text.block_size=32",
    "targets.top_k=2",
    "train.precision=fp32",
]
"""The text model; the vocabulary size is left to the caller (a fixed one or a trained tokenizer's)."""


def tiny_audio_config(version: int = 2, *extra: str) -> RunConfig:
    """`audio-tiny` of data2vec `version` shrunk by TINY_AUDIO, then `extra` overrides."""
    return apply_overrides(preset("audio-tiny", version), [*TINY_AUDIO, *extra])


def tiny_text_config(version: int = 2, *extra: str) -> RunConfig:
    """`text-tiny` of data2vec `version` shrunk by TINY_TEXT, then `extra` overrides."""
    return apply_overrides(preset("text-tiny", version), [*TINY_TEXT, *extra])
