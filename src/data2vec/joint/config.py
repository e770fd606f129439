"""A joint run's configuration: one complete `RunConfig` per modality around one shared
encoder, the sampling ratios, the step kind, and the settings the modalities share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from data2vec.config import (
    MODALITIES,
    ConfigError,
    EncoderConfig,
    OptimConfig,
    RunConfig,
    TeacherConfig,
    TrainConfig,
    from_dict,
    read_config_json,
    to_dict,
    write_config_json,
)
from data2vec.data.pipeline import pipeline_for

JOINT_FSDP_REFUSAL = (
    "train.fsdp: not available for joint runs (a step runs only some modalities' front-ends and decoders, "
    "and the sharded path is built and tested for single-modality models); under torchrun joint runs use DDP"
)
"""Why a joint run refuses FSDP; the one place it does."""

StepKind = Literal["one", "mixed"]
"""What one optimizer step trains: one modality drawn by the ratios, or a batch of every modality."""
STEP_KINDS: tuple[str, ...] = get_args(StepKind)


@dataclass(frozen=True, kw_only=True)
class Ratios:
    """Relative sampling weight of each modality (only the modalities in the run count)."""

    image: float = 1.0
    audio: float = 1.0
    text: float = 1.0


@dataclass(frozen=True, kw_only=True)
class JointConfig:
    """A joint run: one complete `RunConfig` per modality (front-end, masking, targets, loss, data)
    plus what the modalities share. Saved as config.json with `kind: "joint"`.

    Shared, and taken from here rather than from the members: `optim`, `train`, and the EMA
    schedule (`teacher.decay`, `end_decay`, `anneal_steps`; `ema_scope` stays per modality).
    The encoder is shared too: every member's `model.encoder` must be the same (`joint_config`
    sets it)."""

    kind: Literal["joint"] = "joint"
    image: RunConfig | None = None
    audio: RunConfig | None = None
    text: RunConfig | None = None
    ratios: Ratios = field(default_factory=Ratios)
    step: StepKind = "one"
    """"one": each optimizer step trains one modality, drawn with `ratios` (the sampling weights).
    "mixed": each step trains every modality, one batch of each (its `data.batch_size`), and
    backpropagates the mean of their losses weighted by `ratios`."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""

    def __post_init__(self) -> None:
        self.teacher.validate("teacher")
        self.optim.validate("optim")
        self.train.validate("train")
        if self.step not in STEP_KINDS:
            raise ConfigError(f"step: {self.step!r} is not one of {', '.join(map(repr, STEP_KINDS))}")
        mods = self.modalities
        if not mods:
            raise ConfigError("joint: no modality configured (set image, audio and/or text)")
        first = mods[0]
        for m in mods:
            cfg = self.section(m)
            if cfg.model.modality != m:
                raise ConfigError(f"{m}.model.modality: {cfg.model.modality!r} in the {m} section")
            if cfg.model.encoder != self.section(first).model.encoder:
                raise ConfigError(
                    f"{m}.model.encoder: differs from {first}.model.encoder; the Transformer is shared, "
                    "so every modality needs the same encoder settings"
                )
            if cfg.probe.every % self.train.log_every:
                raise ConfigError(
                    f"{m}.probe.every: {cfg.probe.every} is not a multiple of train.log_every {self.train.log_every}"
                )
            ratio = getattr(self.ratios, m)
            if not (ratio > 0 and math.isfinite(ratio)):
                raise ConfigError(f"ratios.{m}: must be positive (got {ratio})")
        enc = self.section(first).model.encoder
        if enc.position_bias != "none":
            raise ConfigError(
                f"{first}.model.encoder.position_bias: {enc.position_bias!r}; a shared encoder cannot hold one "
                "modality's attention bias (for speech, set model.audio.alibi=false and position_bias='none')"
            )
        if self.train.fsdp:
            raise ConfigError(JOINT_FSDP_REFUSAL)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if getattr(self, m, None) is not None)

    @property
    def encoder(self) -> EncoderConfig:
        return self.section(self.modalities[0]).model.encoder

    def section(self, modality: str) -> RunConfig:
        """The member config as written (shared settings not applied)."""
        cfg = getattr(self, modality, None) if modality in MODALITIES else None
        if not isinstance(cfg, RunConfig):
            raise ConfigError(
                f"modality: {modality!r} is not in this joint model (it has {', '.join(self.modalities)})"
            )
        return cfg

    def member(self, modality: str) -> RunConfig:
        """The complete single-modality config of one member: its section with the shared
        optimiser, training and EMA settings applied (what `extract` and `finetune` see)."""
        cfg = self.section(modality)
        t = self.teacher
        teacher = replace(cfg.teacher, decay=t.decay, end_decay=t.end_decay, anneal_steps=t.anneal_steps)
        return replace(cfg, optim=self.optim, train=self.train, teacher=teacher, preset=self.preset or cfg.preset)

    def probabilities(self) -> list[float]:
        w = [float(getattr(self.ratios, m)) for m in self.modalities]
        return [x / sum(w) for x in w]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = to_dict(self)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JointConfig:
        return from_dict(cls, data)

    def save(self, path: str | Path) -> None:
        write_config_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> JointConfig:
        return cls.from_dict(read_config_json(path))


def is_joint(config: dict[str, Any]) -> bool:
    """Whether a saved config (config.json as a dict) is a joint run's."""
    return config.get("kind") == "joint"


def joint_config(
    members: dict[str, RunConfig],
    *,
    encoder: EncoderConfig | None = None,
    ratios: dict[str, float] | None = None,
    teacher: TeacherConfig | None = None,
    optim: OptimConfig | None = None,
    train: TrainConfig | None = None,
    preset: str = "",
) -> JointConfig:
    """A `JointConfig` from single-modality configs: every member gets `encoder` (default: the
    first member's, position bias removed); the shared settings default to the first member's."""
    if not members:
        raise ConfigError("joint: no modality configured")
    first = members[next(iter(members))]
    enc = encoder or replace(first.model.encoder, position_bias="none")
    fixed: dict[str, RunConfig] = {}
    for m, cfg in members.items():
        model = replace(cfg.model, encoder=enc)
        if m == "audio":
            model = replace(model, audio=replace(model.audio, alibi=False))
        fixed[m] = replace(cfg, model=model, targets=replace(cfg.targets, top_k=min(cfg.targets.top_k, enc.depth)))
    return JointConfig(
        image=fixed.get("image"),
        audio=fixed.get("audio"),
        text=fixed.get("text"),
        ratios=Ratios(**(ratios or {})),
        teacher=teacher or first.teacher,
        optim=optim or first.optim,
        train=train or first.train,
        preset=preset,
    )


def prepare_joint(cfg: JointConfig, run_dir: Path) -> JointConfig:
    """Each member's pipeline `prepare` (e.g. the text tokenizer into `run_dir`)."""
    changes: dict[str, Any] = {}
    for m in cfg.modalities:
        section = cfg.section(m)
        changes[m] = pipeline_for(section).prepare(section, run_dir)
    return replace(cfg, **changes)


def check_joint_data(cfg: JointConfig) -> None:
    """Fail early, naming the path, when a modality's data cannot be used."""
    for m in cfg.modalities:
        member = cfg.member(m)
        pipeline_for(member).check(member)
