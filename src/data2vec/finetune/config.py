"""What a fine-tuning run is: the task, its recipe (`FinetuneConfig`), the presets (docs/design.md,
'Fine-tuning recipes') and the metric that picks the best epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from data2vec.config import ConfigError, check_loggers, from_dict, to_dict

Task = Literal["image_cls", "audio_cls", "audio_ctc", "text_cls", "text_reg"]
TASKS: tuple[str, ...] = ("image_cls", "audio_cls", "audio_ctc", "text_cls", "text_reg")
TASK_MODALITY = {
    "image_cls": "image",
    "audio_cls": "audio",
    "audio_ctc": "audio",
    "text_cls": "text",
    "text_reg": "text",
}


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run; saved in `OUT/best/finetune.json`."""

    task: Task = "image_cls"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    """Peak learning rate (of the head; blocks get lr x layer_decay^(L + 1 - layer))."""
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    """Share of all steps spent warming up linearly."""
    layer_decay: float = 1.0
    """Layer-wise lr decay; 1 = the same lr everywhere."""
    drop_path: float = 0.0
    """Stochastic depth of the encoder (max rate, linear over the blocks)."""
    layerdrop: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    """Mixup Beta(alpha, alpha); 0 = off (images)."""
    cutmix: float = 0.0
    """CutMix Beta(alpha, alpha); 0 = off (images)."""
    mix_prob: float = 1.0
    """Share of batches mixed when mixup or cutmix is on."""
    mix_switch_prob: float = 0.5
    """With both on: probability of cutmix instead of mixup for a batch."""
    crop_scale: tuple[float, float] = (0.35, 1.0)
    """Training images: RandomResizedCrop area range (1, 1 = no crop); plus a horizontal flip."""
    hflip: bool = True
    clip_grad: float = 0.0
    head_norm: Literal["layer", "batch"] = "layer"
    """Classification heads on pooled features (image_cls, audio_cls): LayerNorm, or "batch":
    BatchNorm without affine (each feature standardised over the batch, as in MAE's linear
    probe), which lets the head use small differences between clips whose pooled features
    share a large common part. CTC (audio_ctc): "layer" = the letter layer alone (fairseq),
    "batch" = the frames standardised the same way first."""
    freeze_cnn: bool = True
    """Audio: keep the CNN feature extractor frozen (feature_grad_mult 0)."""
    freeze_encoder_steps: int = 0
    """Only the head trains for this many first steps (fairseq freeze_finetune_updates)."""
    mask_prob: float = 0.0
    """Audio: share of frames that start a time-mask span while training (0 = off)."""
    mask_length: int = 10
    mask_channel_prob: float = 0.0
    """Audio: share of channels that start a channel-mask span while training (0 = off)."""
    mask_channel_length: int = 64
    max_sample_size: int = 0
    """Audio training clips are randomly cropped to this many samples; 0 = whole clips."""
    max_tokens: int = 0
    """Text: tokens per sequence including <s> and </s>; 0 = the model's maximum."""
    text_column: str = ""
    """TSV/JSONL text column; empty = `sentence` or `text`, whichever exists."""
    label_column: str = "label"
    column: str = ""
    """Parquet/arrow data: the column holding the inputs (images, audio or text); empty = the one
    column of a fitting type (text: `text_column` when set)."""
    tokenizer: str = ""
    """Text: tokenizer.json or folder; empty = the one the pretrained model was trained with."""
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    loggers: tuple[str, ...] = ()
    """Besides metrics.jsonl: "tensorboard" writes the training and eval curves to OUT/tensorboard/
    (pip install 'data2vec[tensorboard]'). On the command line: --set loggers=[tensorboard]."""

    def __post_init__(self) -> None:
        check_loggers(self.loggers, "loggers")
        _check(self.task in TASKS, "task", f"{self.task!r} is not one of {', '.join(TASKS)}")
        for name in ("epochs", "batch_size", "log_every", "mask_length", "mask_channel_length"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.lr > 0, "lr", "must be positive")
        _check(0 <= self.min_lr <= self.lr, "min_lr", "must be in [0, lr]")
        _check(all(0 <= b < 1 for b in self.betas), "betas", "must be in [0, 1)")
        _check(self.eps > 0, "eps", "must be positive")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(0 <= self.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)")
        _check(0 < self.layer_decay <= 1, "layer_decay", "must be in (0, 1]")
        for name in ("drop_path", "layerdrop", "label_smoothing", "mask_prob", "mask_channel_prob"):
            _check(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        for name in ("mixup", "cutmix", "clip_grad"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("mix_prob", "mix_switch_prob"):
            _check(0 <= getattr(self, name) <= 1, name, "must be in [0, 1]")
        lo, hi = self.crop_scale
        _check(0 < lo <= hi <= 1, "crop_scale", "must satisfy 0 < min <= max <= 1")
        for name in ("freeze_encoder_steps", "max_sample_size", "max_tokens"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(self.max_tokens == 0 or self.max_tokens >= 3, "max_tokens", "must be 0 or >= 3")
        _check(bool(self.label_column), "label_column", "must not be empty")
        _check(self.head_norm in ("layer", "batch"), "head_norm", f"{self.head_norm!r} is not 'layer' or 'batch'")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            f"{self.device!r} is not 'auto', 'cpu' or 'cuda[:N]'",
        )

    @property
    def modality(self) -> str:
        return TASK_MODALITY[self.task]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = to_dict(self)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return from_dict(cls, data)


FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    # data2vec 2.0 base recipe: layer decay 0.65, drop-path 0.1, cutmix 1.0, smoothing 0.1; mixup 0.8
    # (the official 2.0 config uses 0.7). docs/design.md, 'Fine-tuning recipes'.
    "image_cls": dict(
        lr=1e-3,
        betas=(0.9, 0.95),
        weight_decay=0.05,
        layer_decay=0.65,
        drop_path=0.1,
        label_smoothing=0.1,
        mixup=0.8,
        cutmix=1.0,
        mix_prob=0.9,
    ),
    "audio_cls": dict(lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01, layer_decay=0.75, mask_prob=0.2, mask_length=5),
    # CTC recipe: CNN frozen, time masks 0.65 x 10, channel masks 0.25 x 64, Adam (0.9, 0.98).
    # docs/design.md, 'Fine-tuning recipes'.
    "audio_ctc": dict(
        lr=5e-5,
        betas=(0.9, 0.98),
        weight_decay=0.0,
        mask_prob=0.65,
        mask_length=10,
        mask_channel_prob=0.25,
        mask_channel_length=64,
        layerdrop=0.1,
    ),
    # GLUE recipe: Adam (0.9, 0.98), eps 1e-6, weight decay 0.1, 6% warm-up, lr 2e-5, 10 epochs.
    # docs/design.md, 'Fine-tuning recipes'.
    "text_cls": dict(lr=2e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, warmup_fraction=0.06),
    "text_reg": dict(lr=4e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, warmup_fraction=0.06, batch_size=16),
}


def finetune_preset(task: str, **changes: Any) -> FinetuneConfig:
    """The recipe for `task` (docs/design.md, 'Fine-tuning recipes') with `changes` applied."""
    if task not in FINETUNE_PRESETS:
        raise ConfigError(f"task: {task!r} is not one of {', '.join(TASKS)}")
    return FinetuneConfig(task=task, **{**FINETUNE_PRESETS[task], **changes})  # type: ignore[arg-type]


METRIC = {
    "image_cls": "accuracy",
    "audio_cls": "accuracy",
    "text_cls": "accuracy",
    "text_reg": "pearson",
    "audio_ctc": "cer",
}
"""The eval metric that picks the best epoch (CER: lower is better, the others higher)."""
