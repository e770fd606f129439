"""The smallest models of each modality, as `--set`-style overrides of the tiny presets: width 32,
depth 2, a one-layer decoder (speech: a 3-layer CNN and 2 positional convs). For checks that must
run in seconds on any machine (`data2vec doctor`, the test suite), not for learning anything.
"""

from __future__ import annotations

from data2vec.config import RunConfig, apply_overrides
from data2vec.presets import preset

IMAGE_SHAPE = [
    "model.encoder.dim=32",
    "model.encoder.depth=2",
    "model.encoder.num_heads=2",
    "model.decoder.dim=32",
    "model.decoder.groups=4",
    "model.decoder.layers=1",
    "targets.top_k=2",
]
"""digits-tiny shrunk (1-channel 32x32 images, patch 4)."""

AUDIO_SHAPE = [
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

AUDIO = [*AUDIO_SHAPE, "model.decoder.layers=1", "targets.top_k=2", "train.precision=fp32"]

TEXT = [
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

SHAPES = {"image": IMAGE_SHAPE, "audio": AUDIO, "text": TEXT}
PRESETS = {"image": "digits-tiny", "audio": "audio-tiny", "text": "text-tiny"}


def tiny_config(modality: str, version: int = 2, *extra: str) -> RunConfig:
    """The tiny preset of `modality` and data2vec `version`, shrunk, then `extra` overrides."""
    return apply_overrides(preset(PRESETS[modality], version), [*SHAPES[modality], *extra])
