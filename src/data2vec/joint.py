"""Joint multimodal pretraining: one Transformer for images, speech and text (data2vec 2.0's
`data2vec_multi` layout, SPEC 6.1).

`JointData2Vec` holds one front-end and one decoder (or 1.0 head) per modality around ONE
shared encoder, and ONE EMA teacher that tracks the shared encoder plus, per modality,
whatever that modality's `teacher.ema_scope` names (the image front-end, the speech
positional stage, nothing for text). Each modality's objective is exactly the
single-modality `Data2Vec` objective: `member(m)` is a `Data2Vec` made of the shared parts
(`Data2Vec.from_parts`), and `forward(batch, m)` calls it.

Training (`train_joint`) has two step kinds (`JointConfig.step`). "one": one modality per
optimizer step, drawn with the configured ratios by a pure function of (seed, step), as fairseq
does; every step is a plain single-modality step and the optimizer and EMA see the mixture over
steps. "mixed": every step takes one batch of EVERY modality and backpropagates the
ratio-weighted mean of their losses, then one optimizer step and one EMA update. Either way a
resumed run replays the same plan and each modality's data loader restarts at the batch it had
reached.

A checkpoint holds every front-end, decoder and the shared encoder (keys `encoder.*`,
`frontends.<m>.*`, `heads.<m>.*`); `member_pretrained` turns it into an ordinary
single-modality model for `extract`, `finetune`, probes and `pretrain --init`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from tqdm import tqdm

from data2vec.checkpoint import list_checkpoints, load_latest, remove_stale_temporaries, save_checkpoint
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
from data2vec.data.pipeline import PretrainBatch, build_pretrain_loader, pipeline_for
from data2vec.modalities import build_frontend
from data2vec.model import Batch, Data2Vec, StepOutput, build_head
from data2vec.nn.transformer import Encoder, compile_blocks
from data2vec.schedules import cosine_lr, ema_decay
from data2vec.teacher import EMATeacher
from data2vec.train import (
    LOCAL_STD_WARN,
    TrainingStopped,
    _Log,
    _next_batch,
    _truncate_metrics,
    _write_summary,
    autocast,
    build_optimizer,
    local_std_warning,
    low_local_std,
    plot_loss_curve,
    resolve_device,
)

# =========================================================================== configuration

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
            ratio = getattr(self.ratios, m)
            if not (ratio > 0 and math.isfinite(ratio)):
                raise ConfigError(f"ratios.{m}: must be positive (got {ratio})")
            if cfg.probe.every:
                raise ConfigError(f"{m}.probe.every: the online probe is not available in joint runs (set it to 0)")
        enc = self.section(first).model.encoder
        if enc.position_bias != "none":
            raise ConfigError(
                f"{first}.model.encoder.position_bias: {enc.position_bias!r}; a shared encoder cannot hold one "
                "modality's attention bias (for speech, set model.audio.alibi=false and position_bias='none')"
            )
        if self.train.fsdp:
            raise ConfigError("train.fsdp: joint pretraining runs in one process")
        if self.train.on_collapse != "stop":
            raise ConfigError("train.on_collapse: joint runs support 'stop' only")

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


# =========================================================================== the model


class JointData2Vec(nn.Module):
    """Per-modality front-ends and decoders around one encoder, with one EMA teacher."""

    def __init__(self, cfg: JointConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.frontends = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        views: dict[str, Data2Vec] = {}
        placeholder = EMATeacher.wrap({})
        for i, m in enumerate(cfg.modalities):
            member = cfg.member(m)
            # Built and initialised in Data2Vec's order, so that a one-modality joint model starts
            # from exactly the weights `Data2Vec.from_config(member)` does (same seed).
            frontend = build_frontend(member.model)
            self.frontends[m] = frontend
            if i == 0:
                self.encoder = Encoder(cfg.encoder)
            self.heads[m] = build_head(member.model, frontend)
            views[m] = Data2Vec.from_parts(member, frontend, self.encoder, self.heads[m], placeholder)
            views[m]._init_weights(encoder=i == 0)
        self._views = views  # plain dict: views are not submodules (no duplicate state_dict keys)
        self.teacher = EMATeacher(self.student_parts())
        for m, view in views.items():
            own = {"encoder": self.teacher["encoder"]}
            if m in self.teacher:
                own.update(dict(self.teacher[m].named_children()))
            view.teacher = EMATeacher.wrap(own)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._views)

    def member(self, modality: str) -> Data2Vec:
        """One modality as a `Data2Vec` (shared encoder, that modality's front-end, decoder and
        teacher parts): probes, `encode` and feature extraction work on it unchanged."""
        if modality not in self._views:
            raise ConfigError(f"modality: {modality!r} is not in this joint model (it has {', '.join(self._views)})")
        return self._views[modality]

    def train(self, mode: bool = True) -> JointData2Vec:
        super().train(mode)
        for view in self._views.values():
            view.training = mode  # the shared children already follow
        return self

    def student_parts(self) -> dict[str, nn.Module]:
        """The shared encoder, plus per modality a ModuleDict of the front-end stages its
        `teacher.ema_scope` puts in the teacher."""
        parts: dict[str, nn.Module] = {"encoder": self.encoder}
        for m, view in self._views.items():
            own = {k: v for k, v in view.student_parts().items() if k != "encoder"}
            if own:
                parts[m] = nn.ModuleDict(own)
        return parts

    def student_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def teacher_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("teacher.")}

    def compile_blocks(self) -> None:
        """`train.compile`: torch.compile the shared encoder's blocks, in the student and the teacher."""
        compile_blocks(self.encoder, self.teacher["encoder"])

    @torch.no_grad()
    def update_teacher(self, decay: float) -> None:
        """One EMA step over the whole teacher (every modality's parts), after each optimizer step."""
        self.teacher.update(self.student_parts(), decay)

    def forward(self, batch: Batch, modality: str, generator: torch.Generator | None = None) -> StepOutput:
        """That modality's data2vec objective on `batch`."""
        out: StepOutput = self.member(modality)(batch, generator)
        return out


def member_weights(student: dict[str, Tensor], modality: str) -> dict[str, Tensor]:
    """A joint checkpoint's student weights -> one modality's `Data2Vec` key names."""
    out: dict[str, Tensor] = {}
    for k, v in student.items():
        if k.startswith("encoder."):
            out[k] = v
        elif k.startswith(f"frontends.{modality}."):
            out["frontend." + k[len(f"frontends.{modality}.") :]] = v
        elif k.startswith(f"heads.{modality}."):
            out["head." + k[len(f"heads.{modality}.") :]] = v
    return out


# =========================================================================== the step plan


_MASK64 = (1 << 64) - 1


def _uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step) (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def modality_for_step(seed: int, step: int, modalities: Sequence[str], probabilities: Sequence[float]) -> str:
    """The modality trained at optimizer step `step` (0-based): a pure function of its arguments."""
    u, acc = _uniform(seed, step), 0.0
    for m, p in zip(modalities, probabilities, strict=True):
        acc += p
        if u < acc:
            return m
    return modalities[-1]


def step_weights(cfg: JointConfig, step: int) -> dict[str, float]:
    """The modalities trained at optimizer step `step`, each with the weight of its loss: the one
    `modality_for_step` draws, weight 1 (`step="one"`); or every modality, weighted by its share of
    the ratios (`step="mixed"`; the weights sum to 1)."""
    if cfg.step == "mixed":
        return dict(zip(cfg.modalities, cfg.probabilities(), strict=True))
    return {modality_for_step(cfg.train.seed, step, cfg.modalities, cfg.probabilities()): 1.0}


def step_plan(cfg: JointConfig, start: int, stop: int) -> list[str]:
    """Modalities of steps start..stop-1, as metrics.jsonl names them ("image+audio+text" for a mixed step)."""
    return ["+".join(step_weights(cfg, s)) for s in range(start, stop)]


def steps_per_modality(cfg: JointConfig, stop: int) -> dict[str, int]:
    """How many of the optimizer steps 0..stop-1 train each modality."""
    counts = dict.fromkeys(cfg.modalities, 0)
    for s in range(stop):
        for m in step_weights(cfg, s):
            counts[m] += 1
    return counts


PER_MODALITY_METRICS = ("loss", "target_std", "pred_std")
"""Logged per modality in every step record as `<name>_<modality>`."""


def backward_step(
    model: JointData2Vec,
    weights: dict[str, float],
    next_batch: Callable[[str], Batch],
    train: TrainConfig,
    device: torch.device,
) -> tuple[dict[str, dict[str, float]], int]:
    """Forward and backward of one optimizer step (no optimizer update): for each modality in
    `weights`, `train.grad_accum` batches from `next_batch(modality)`, each loss scaled by the
    modality's weight, gradients accumulating. Backpropagating modality by modality gives the
    gradient of the weighted sum while holding one modality's graph at a time. Returns each
    modality's metrics (loss and `StepOutput.metrics`, means over the micro-batches) and the
    number of samples seen."""
    metrics: dict[str, dict[str, float]] = {}
    samples = 0
    for m, weight in weights.items():
        sums: dict[str, float] = {}
        for _ in range(train.grad_accum):
            batch = next_batch(m)
            with autocast(device, train.precision):
                out = model(batch, m)
            (out.loss * weight / train.grad_accum).backward()
            samples += batch.inputs.shape[0]
            for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / train.grad_accum
        metrics[m] = sums
    return metrics, samples


def step_record(metrics: dict[str, dict[str, float]], weights: dict[str, float]) -> dict[str, Any]:
    """A step's metrics.jsonl fields: `modality`, the weighted mean of every metric (`loss` is the
    objective that was backpropagated), and `PER_MODALITY_METRICS` per modality."""
    record: dict[str, Any] = {"modality": "+".join(metrics)}
    for k in metrics[next(iter(metrics))]:
        record[k] = sum(weights[m] * ms[k] for m, ms in metrics.items())
    for m, ms in metrics.items():
        record.update({f"{k}_{m}": ms[k] for k in PER_MODALITY_METRICS})
    return record


def _collapsed(metrics: dict[str, dict[str, float]], train: TrainConfig) -> str | None:
    """The first modality whose target, prediction or local-encoder std fell below the collapse
    thresholds."""
    for m, ms in metrics.items():
        low = ms["target_std"] < train.min_target_std or ms["pred_std"] < train.min_pred_std
        if low or low_local_std(ms, train.min_local_std):
            return m
    return None


# =========================================================================== training


@dataclass
class JointTrainResult:
    run_dir: Path
    step: int
    model: JointData2Vec
    history: list[dict[str, Any]] = field(default_factory=list)
    steps_per_modality: dict[str, int] = field(default_factory=dict)
    """Optimizer steps each modality got over the whole run so far."""
    skipped_inputs: list[str] = field(default_factory=list)


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


def initial_joint_model(cfg: JointConfig) -> JointData2Vec:
    """The exact weights a joint run with `cfg` starts from (the random-init baseline)."""
    torch.manual_seed(cfg.train.seed)
    return JointData2Vec(cfg)


def train_joint(
    cfg: JointConfig | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    quiet: bool = False,
    stop_after: int | None = None,
) -> JointTrainResult:
    """Pretrain a joint model, writing checkpoints, metrics.jsonl and loss.png into `run_dir`
    (the layout of `train.train`). Each step trains the modalities `step_weights` gives (one
    drawn modality, or all of them: `cfg.step`); metrics.jsonl records them per step. `resume`
    continues bit-exactly from the newest checkpoint with the config saved in `run_dir` (`cfg` may
    be None then); `stop_after` checkpoints and returns after that step."""
    run_dir = Path(run_dir)
    if resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"{saved}: not a run directory (no config.json) - nothing to resume")
        cfg = JointConfig.load(saved)
    elif cfg is None:
        raise ConfigError("joint: no config given")
    elif list_checkpoints(run_dir):
        raise FileExistsError(f"{run_dir}: already holds checkpoints; pass --resume to continue it")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("joint pretraining runs in one process (not under torchrun)")
    run_dir.mkdir(parents=True, exist_ok=True)
    log: Callable[[str], None] = _Log(run_dir, quiet)
    if not resume:
        cfg = prepare_joint(cfg, run_dir)
    tc = cfg.train
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    model = JointData2Vec(cfg).to(device)
    if tc.compile:
        model.compile_blocks()
    optimizer = build_optimizer(model, cfg.optim)
    remove_stale_temporaries(run_dir)
    run_state: dict[str, Any] = {"lr_scale": 1.0, "nan_skipped": 0, "rewinds": 0, "skipped_inputs": []}

    start = 0
    ckpt = load_latest(run_dir, map_location=device) if resume else None
    if ckpt is not None:
        model.load_state_dict({**ckpt.student, **ckpt.teacher})
        optimizer.load_state_dict(ckpt.state["optimizer"])
        torch.set_rng_state(ckpt.state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in ckpt.state:
            torch.cuda.set_rng_state(ckpt.state["rng_cuda"], device)
        run_state["nan_skipped"] = ckpt.state.get("nan_skipped", 0)
        run_state["skipped_inputs"][:] = ckpt.state.get("skipped_inputs", [])
        start = ckpt.step
        log(f"resumed from {ckpt.path} at step {start}")
    if not resume:
        cfg.save(run_dir / "config.json")
    metrics_path = run_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, start)
    mods = cfg.modalities
    counts = steps_per_modality(cfg, start)
    history: list[dict[str, Any]] = []
    skipped: list[str] = run_state["skipped_inputs"]
    if start >= tc.steps:
        log(f"run already finished ({start} of {tc.steps} steps)")
        return JointTrainResult(run_dir, start, model, history, counts, skipped)

    # One endless loader per modality, each resumed at the micro-batch it had reached.
    loaders = {}
    for m in mods:
        loaders[m], n = build_pretrain_loader(cfg.member(m), counts[m] * tc.grad_accum)
        log(f"{m}: {n} samples, batch {cfg.section(m).data.batch_size}x{tc.grad_accum}")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    probs = ", ".join(f"{m} {p:.2f}" for m, p in zip(mods, cfg.probabilities(), strict=True))
    mix = f"every modality per step, loss weights {probs}" if cfg.step == "mixed" else f"modality mix {probs}"
    log(f"joint data2vec | {n_params / 1e6:.2f}M trainable params | {mix} | {tc.precision} on {device}")

    def next_batch(m: str) -> Batch:
        return _to_device(_next_batch(loaders[m], skipped, cfg.section(m).data.on_bad_input), device)

    def save(step: int) -> None:
        state: dict[str, Any] = {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng_cpu": torch.get_rng_state(),
            **run_state,
        }
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        student, teacher = model.student_state_dict(), model.teacher_state_dict()
        path = save_checkpoint(run_dir, step, student, teacher, cfg.to_dict(), state, keep_last=tc.keep_last)
        log(f"saved checkpoint {path}")

    model.train()
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, dynamic_ncols=True, unit="step")
    t_last, samples_since = time.perf_counter(), 0
    step, last_saved = start, start
    warned_local: set[str] = set()
    try:
        while step < tc.steps:
            weights = step_weights(cfg, step)
            lr = cosine_lr(step, tc.steps, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            per_modality, n = backward_step(model, weights, next_batch, tc, device)
            samples_since += n
            for m in weights:
                counts[m] += 1
            record: dict[str, Any] = {"step": step + 1, **step_record(per_modality, weights)}
            loss, label = record["loss"], record["modality"]
            max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            decay = ema_decay(step + 1, cfg.teacher.decay, cfg.teacher.end_decay, _anneal_steps(cfg))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step + 1} ({label})"
                if tc.on_nan == "stop":
                    raise TrainingStopped(
                        f"{what}; stopped. The last good checkpoint is step {last_saved} in {run_dir}."
                    )
                optimizer.zero_grad(set_to_none=True)
                run_state["nan_skipped"] += 1
                log(f"{what}: step skipped ({run_state['nan_skipped']} so far, train.on_nan=skip)")
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                model.update_teacher(decay)

            record.update(lr=lr, grad_norm=grad_norm, ema_decay=decay)
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                now = time.perf_counter()
                record["samples_per_sec"] = samples_since / max(now - t_last, 1e-9)
                t_last, samples_since = now, 0
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(modality=label, loss=f"{loss:.4f}", tgt_std=f"{record['target_std']:.3f}")
            history.append(record)
            bar.update(1)
            step += 1

            for m, ms in per_modality.items() if step > tc.collapse_after else ():
                if m not in warned_local and low_local_std(ms, LOCAL_STD_WARN):
                    log(f"{m}: {local_std_warning(step, ms['local_std'])}")
                    warned_local.add(m)
            collapsed = _collapsed(per_modality, tc) if step > tc.collapse_after else None
            if collapsed is not None:
                ms = per_modality[collapsed]
                local = f", local std {ms['local_std']:.4f}" if "local_std" in ms else ""
                raise TrainingStopped(
                    f"representation collapse at step {step} ({collapsed}): target std {ms['target_std']:.4f}, "
                    f"prediction std {ms['pred_std']:.4f}{local}. The last good checkpoint is step {last_saved} "
                    f"in {run_dir}."
                )
            stopping = stop_after is not None and step >= stop_after
            if step % tc.ckpt_every == 0 or step == tc.steps or stopping:
                save(step)
                last_saved = step
                plot_loss_curve(metrics_path, run_dir / "loss.png")
            if stopping and step < tc.steps:
                log(f"stopping after step {step} as asked; resume with --resume {run_dir}")
                break
    except TrainingStopped as e:
        log(str(e))
        raise
    finally:
        bar.close()
        _write_summary(run_dir, step, run_state)
        if run_state["nan_skipped"]:
            log(f"skipped {run_state['nan_skipped']} step(s) with a non-finite loss or gradient")
    log("steps per modality: " + ", ".join(f"{m} {c}" for m, c in counts.items()))
    return JointTrainResult(run_dir, step, model, history, counts, sorted(set(skipped)))


def _anneal_steps(cfg: JointConfig) -> int:
    return cfg.train.steps if cfg.teacher.anneal_steps is None else cfg.teacher.anneal_steps


def _to_device(b: PretrainBatch, device: torch.device) -> Batch:
    def move(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    return Batch(b.inputs.to(device, non_blocking=True), move(b.mask), move(b.padding_mask), move(b.student_inputs))


# =========================================================================== presets


def joint_tiny(modalities: Sequence[str] = MODALITIES, version: int = 2) -> JointConfig:
    """The tiny presets (digits-tiny, audio-tiny, text-tiny) around one 4-block width-192
    encoder (post-LN, input LayerNorm, no dropout, no ALiBi)."""
    from data2vec.presets import preset

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
    from data2vec.presets import preset

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


__all__ = [
    "JOINT_PRESETS",
    "JointConfig",
    "JointData2Vec",
    "JointTrainResult",
    "Ratios",
    "STEP_KINDS",
    "StepKind",
    "check_joint_data",
    "initial_joint_model",
    "is_joint",
    "joint_base",
    "joint_config",
    "joint_preset",
    "joint_tiny",
    "member_weights",
    "modality_for_step",
    "backward_step",
    "step_plan",
    "step_record",
    "step_weights",
    "steps_per_modality",
    "train_joint",
    "with_data",
]
