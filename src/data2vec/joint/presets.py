"""Joint presets: the single-modality presets around one shared encoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from data2vec.config import MODALITIES, ConfigError, EncoderConfig, TeacherConfig, TrainConfig
from data2vec.joint.config import JointConfig, joint_config
from data2vec.presets import preset


def joint_tiny(modalities: Sequence[str] = MODALITIES, version: int = 2) -> JointConfig:
    """The tiny presets (digits-tiny, audio-tiny, text-tiny) around one 4-block width-192
    encoder (post-LN, input LayerNorm, no dropout, no ALiBi)."""
    names = {"image": "digits-tiny", "audio": "audio-tiny", "text": "text-tiny"}
    for m in modalities:
        if m not in names:
            raise ConfigError(f"modality: {m!r} is not one of {', '.join(MODALITIES)}")
    members = {m: preset(names[m], version) for m in MODALITIES if m in modalities}
    enc = EncoderConfig(dim=192, depth=4, num_heads=4, norm_eps=1e-5, input_norm=True)
    first = members[next(iter(members))]
    return joint_config(
        members,
        encoder=enc,
        teacher=TeacherConfig(decay=0.998, end_decay=0.9995),
        optim=replace(first.optim, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, clip_grad=1.0),
        train=TrainConfig(steps=2_000, ckpt_every=500, collapse_after=500),
        preset=f"joint-tiny@v{version}",
    )


def joint_base(modalities: Sequence[str] = MODALITIES, version: int = 2) -> JointConfig:
    """image-base, audio-base and text-base (2.0) around one 12-block width-768 encoder."""
    if version != 2:
        raise ConfigError("version: joint-base is data2vec 2.0 only")

    names = {"image": "image-base", "audio": "audio-base", "text": "text-base"}
    members = {m: preset(names[m], 2) for m in MODALITIES if m in modalities}
    enc = EncoderConfig(dim=768, depth=12, num_heads=12, norm_eps=1e-5, input_norm=True)
    first = members[next(iter(members))]
    return joint_config(members, encoder=enc, train=replace(first.train, steps=400_000), preset="joint-base@v2")


JOINT_PRESETS: dict[str, Callable[[Sequence[str], int], JointConfig]] = {
    "joint-tiny": joint_tiny,
    "joint-base": joint_base,
}
"""Joint presets: (modalities, data2vec version) -> config."""


def joint_preset(name: str, modalities: Sequence[str] = MODALITIES, version: int = 2) -> JointConfig:
    if name not in JOINT_PRESETS:
        raise ConfigError(f"preset: {name!r} is not a joint preset (available: {', '.join(sorted(JOINT_PRESETS))})")
    return JOINT_PRESETS[name](modalities, version)


def with_data(cfg: JointConfig, paths: dict[str, str]) -> JointConfig:
    """Set each named modality's data.path."""
    changes: dict[str, Any] = {}
    for m, p in paths.items():
        section = cfg.section(m)
        changes[m] = replace(section, data=replace(section.data, path=p))
    return replace(cfg, **changes)
