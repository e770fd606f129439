"""Starting a run: `train` (one modality), `train_joint` (several modalities, one encoder) and
`resume` (either, from its run directory). Each sets the run up (config, processes, model,
optimizer, resume or --init, the objective and the hooks) and hands it to the one `Engine`.

A run directory holds config.json, train.log, metrics.jsonl, loss.png, summary.json,
checkpoints/ (see checkpoint.py), init.json when it was started with --init, and tensorboard/
with train.loggers=[tensorboard].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from data2vec.checkpoint import (
    ResumeChoice,
    ResumeOptions,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    select_resume,
    set_aside,
)
from data2vec.config import ConfigError, RunConfig, read_config_json
from data2vec.data.pipeline import pipeline_for
from data2vec.data.tables import write_dataset
from data2vec.distributed import Dist, check_fsdp
from data2vec.distributed import setup as setup_distributed
from data2vec.joint import JointConfig, JointData2Vec, is_joint, prepare_joint, steps_per_modality
from data2vec.model import Data2Vec
from data2vec.pretrained import Pretrained
from data2vec.training.devices import precision_warning, resolve_device, resolve_precision
from data2vec.training.engine import Engine
from data2vec.training.hooks import RunContext, build_hooks, truncate_metrics
from data2vec.training.init import apply_init, recorded_init
from data2vec.training.lock import RunLock
from data2vec.training.log import RunLog, silent
from data2vec.training.objectives import JointObjective, Objective, SingleObjective
from data2vec.training.optim import build_optimizer
from data2vec.training.state import Learner, RunState
from data2vec.training.tensorboard import logger_hooks, require_loggers

Config = TypeVar("Config", RunConfig, JointConfig)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    model: Data2Vec
    history: list[dict[str, Any]] = field(default_factory=list)
    """This invocation's metrics.jsonl rows (the newest `hooks.HISTORY_LIMIT`; none a rewind abandoned)."""
    skipped_inputs: list[str] = field(default_factory=list)
    data_notes: list[str] = field(default_factory=list)
    """What the data pipeline reported about the data (e.g. audio clips dropped as too short)."""


@dataclass
class JointTrainResult:
    run_dir: Path
    step: int
    model: JointData2Vec
    history: list[dict[str, Any]] = field(default_factory=list)
    steps_per_modality: dict[str, int] = field(default_factory=dict)
    """Optimizer steps each modality got over the whole run so far."""
    skipped_inputs: list[str] = field(default_factory=list)


@dataclass
class Session:
    """A run set up and ready for the engine."""

    cfg: RunConfig | JointConfig
    ctx: RunContext
    learner: Learner
    step_model: torch.nn.Module
    start: int


def open_run_dir(run_dir: Path, cfg: Config | None, resume: bool, kind: type[Config]) -> Config:
    """The config to run: the one saved in `run_dir` (resume) or `cfg` (a new run, refused where
    `run_dir` already holds checkpoints). Its loggers' packages must be installed."""
    if resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"{saved}: not a run directory (no config.json) - nothing to resume")
        cfg = kind.load(saved)
    elif cfg is None:
        raise ConfigError("no config given (and not resuming)")
    elif list_checkpoints(run_dir):
        raise FileExistsError(f"{run_dir}: already holds checkpoints; pass --resume to continue it")
    require_loggers(cfg.train.loggers, "train.loggers")
    return cfg


def start_session(
    cfg: RunConfig | JointConfig,
    model: Data2Vec | JointData2Vec,
    run_dir: Path,
    dist: Dist,
    device: torch.device,
    log: Callable[[str], None],
    *,
    resume: bool,
    init: str | Path | Pretrained | None,
    options: ResumeOptions | None = None,
) -> Session:
    """Processes, optimizer, then the newest checkpoint that verifies (resume) or --init (a fresh
    run). Checkpoints newer than the one resumed that do not verify are set aside, never deleted."""
    tc = cfg.train
    if tc.compile:
        model.compile_blocks()
    dist.seed(tc.seed)
    unused = isinstance(model, JointData2Vec) or (isinstance(cfg, RunConfig) and cfg.model.encoder.layerdrop > 0)
    step_model = dist.wrap(model, device, find_unused_parameters=unused)  # DDP/FSDP, or the model itself
    learner = Learner(model, build_optimizer(model, cfg.optim), dist, device)
    if dist.is_main:
        remove_stale_temporaries(run_dir)
    ctx = RunContext(run_dir, tc, RunState(), log, dist)
    choice = select_resume(run_dir, options or ResumeOptions()) if resume else ResumeChoice(None, False, [])
    ckpt = load_checkpoint(choice.path, device, verify=choice.verified) if choice.path is not None else None
    dist.barrier()  # every rank has read it before anything is moved
    if dist.is_main:
        for path, problem in choice.rejected:
            log(f"warning: checkpoint {path} set aside ({problem}); moved to {set_aside(path)}")
    if ckpt is not None:
        learner.restore(ckpt, ctx.state, counters=True)
        unchecked = "" if choice.verified else " (checksums not checked: --ignore-checksums)"
        log(f"resumed from {ckpt.path} at step {ckpt.step}{unchecked}")
    elif resume:
        log(f"starting {run_dir} from step 0 (no checkpoint to resume from: --force-fresh)")
    if ckpt is None:
        init = init if init is not None or not resume else recorded_init(run_dir)
        if init is not None:
            log(apply_init(model, cfg, init, run_dir))
    if not resume and dist.is_main:
        cfg.save(run_dir / "config.json")
    start = ckpt.step if ckpt is not None else 0
    if dist.is_main:
        note = truncate_metrics(ctx.metrics_path, start)
        if note:
            log(note)
    return Session(cfg, ctx, learner, step_model, start)


def run_engine(
    s: Session,
    objective: Objective,
    members: dict[str, tuple[RunConfig, Data2Vec]],
    *,
    progress: bool,
    stop_after: int | None,
) -> int:
    """The hooks, and the engine from `s.start`; returns the steps completed."""
    hooks, checkpointer = build_hooks(
        s.ctx,
        s.learner,
        s.cfg.to_dict(),
        members,
        start=s.start,
        progress=progress,
        stop_after=stop_after,
        loggers=logger_hooks(s.ctx, members, s.start),
    )
    s.learner.model.train()
    engine = Engine(s.learner, objective, hooks, checkpointer, s.ctx, s.cfg.optim, s.cfg.teacher)
    try:
        return engine.run(s.start)
    finally:
        objective.close()


@contextmanager
def _locked(run_dir: Path, dist: Dist) -> Iterator[None]:
    """Rank 0 holds the run directory's lock for the whole run (lock.py)."""
    if not dist.is_main:
        yield
        return
    with RunLock(run_dir):
        yield


def _batch_desc(cfg: RunConfig) -> str:
    """The micro-batch as the log header states it: audio batches are by duration, not by count."""
    d, masks = cfg.data, cfg.masking.num_masks if cfg.model.version == 2 else 1
    size = f"<={d.audio.batch_seconds:g} s of audio" if cfg.model.modality == "audio" else str(d.batch_size)
    return f"{size} x {masks} mask(s) x {cfg.train.grad_accum} accum"


def _header(s: Session, what: str, details: str) -> str:
    """The log line that opens a run."""
    dist, tc = s.ctx.dist, s.cfg.train
    n_params = sum(p.numel() for p in s.learner.model.parameters() if p.requires_grad)
    procs = f" x {dist.world_size} processes{' (FSDP)' if dist.fsdp else ''}" if dist.enabled else ""
    precision = resolve_precision(s.learner.device, tc.precision)
    line = f"{what} | {n_params / 1e6:.2f}M trainable params | {details} | {precision} on {s.learner.device}{procs}"
    warning = precision_warning(s.learner.device, tc.precision)
    return line if warning is None else f"{line}\n{warning}"


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    quiet: bool = False,
    stop_after: int | None = None,
    init: str | Path | Pretrained | None = None,
    resume_from: str | Path | None = None,
    ignore_checksums: bool = False,
    force_fresh: bool = False,
    data: Any = None,
) -> TrainResult:
    """Pretrain per `cfg`, writing checkpoints, metrics.jsonl and loss.png into `run_dir`.

    `data`: a `datasets.Dataset` or `IterableDataset` to pretrain on instead of `cfg.data.path`
    (duck-typed); it is written once to `run_dir/data/data.parquet` and read from there
    (data/tables.py), so a resume needs only the run directory.

    With `resume=True`, continue from the newest valid checkpoint in `run_dir` using the
    config saved there (`cfg` is ignored except when no checkpoint exists yet).
    `stop_after` ends this invocation after that step (with a checkpoint), e.g. to split a
    run into time-limited jobs; schedules still follow `train.steps`.
    `init` starts the student from a pretrained model (training/init.py); a run resumed before its
    first checkpoint starts from it again.

    A resume never discards a checkpoint. When no checkpoint verifies it is refused (CheckpointError)
    unless one of: `resume_from` (a checkpoint folder to continue from; implies `resume`),
    `ignore_checksums` (the newest checkpoint as it is), `force_fresh` (step 0; checkpoints that do not
    verify are moved to checkpoints/set-aside/).
    """
    run_dir = Path(run_dir)
    options = _resume_options(resume_from, ignore_checksums, force_fresh)
    resume = resume or options.resume_from is not None
    cfg = open_run_dir(run_dir, cfg, resume, RunConfig)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Under torchrun: one process per rank; rank 0 alone writes files (distributed.py).
    dist = setup_distributed(resolve_device(cfg.train.device), cfg.train.fsdp)
    check_fsdp(cfg, dist, has_init=init is not None)
    log = RunLog(run_dir, quiet) if dist.is_main else silent
    with _locked(run_dir, dist):
        if not resume:  # e.g. train a tokenizer; the saved config.json holds the result
            given = cfg
            cfg = dist.on_main(lambda: pipeline_for(given).prepare(_with_data(given, data, run_dir), run_dir))
        device = dist.device(resolve_device(cfg.train.device))
        torch.manual_seed(cfg.train.seed)
        model = Data2Vec.from_config(cfg).to(device)
        s = start_session(cfg, model, run_dir, dist, device, log, resume=resume, init=init, options=options)
        if s.start >= cfg.train.steps:
            log(f"run already finished ({s.start} of {cfg.train.steps} steps)")
            return TrainResult(run_dir, s.start, model, [], sorted(set(s.ctx.state.skipped_inputs)))
        objective = SingleObjective(cfg, s.step_model, dist, device, s.ctx.state.skipped_inputs)
        notes = objective.seek(s.start, s.ctx.state.rewinds)
        what = f"data2vec {cfg.model.version}.0 {cfg.model.modality}"
        log(_header(s, what, f"{objective.samples} samples | batch {_batch_desc(cfg)}"))
        for note in notes:
            log(note)
        step = run_engine(s, objective, {"": (cfg, model)}, progress=progress, stop_after=stop_after)
        return TrainResult(run_dir, step, model, s.ctx.history, sorted(set(s.ctx.state.skipped_inputs)), notes)


def _with_data(cfg: RunConfig, data: Any, run_dir: Path) -> RunConfig:
    """`cfg` reading `data` (a datasets object, written to the run directory) when one is given."""
    if data is None:
        return cfg
    return replace(cfg, data=replace(cfg.data, path=write_dataset(data, run_dir / "data")))


def train_joint(
    cfg: JointConfig | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    quiet: bool = False,
    stop_after: int | None = None,
    init: str | Path | None = None,
    resume_from: str | Path | None = None,
    ignore_checksums: bool = False,
    force_fresh: bool = False,
) -> JointTrainResult:
    """Pretrain a joint model, writing the run directory `train` writes. Each step trains the
    modalities the step plan gives (one drawn modality, or all of them: `cfg.step`); metrics.jsonl
    records them per step. `resume` continues bit-exactly from the newest checkpoint with the config
    saved in `run_dir` (`cfg` may be None then); `stop_after` checkpoints and returns after that step;
    `init` starts from a joint run or checkpoint, or a single-modality model (its modality only);
    `resume_from`, `ignore_checksums`, `force_fresh`: as for `train`."""
    run_dir = Path(run_dir)
    options = _resume_options(resume_from, ignore_checksums, force_fresh)
    resume = resume or options.resume_from is not None
    cfg = open_run_dir(run_dir, cfg, resume, JointConfig)
    run_dir.mkdir(parents=True, exist_ok=True)
    dist = setup_distributed(resolve_device(cfg.train.device))
    log = RunLog(run_dir, quiet) if dist.is_main else silent
    with _locked(run_dir, dist):
        if not resume:
            prepared = cfg
            cfg = dist.on_main(lambda: prepare_joint(prepared, run_dir))
        device = dist.device(resolve_device(cfg.train.device))
        torch.manual_seed(cfg.train.seed)
        model = JointData2Vec(cfg).to(device)
        s = start_session(cfg, model, run_dir, dist, device, log, resume=resume, init=init, options=options)
        skipped = s.ctx.state.skipped_inputs
        if s.start >= cfg.train.steps:
            log(f"run already finished ({s.start} of {cfg.train.steps} steps)")
            counts = steps_per_modality(cfg, s.start)
            return JointTrainResult(run_dir, s.start, model, [], counts, sorted(set(skipped)))
        objective = JointObjective(cfg, s.step_model, dist, device, skipped)
        for line in objective.seek(s.start, s.ctx.state.rewinds):
            log(line)
        probs = ", ".join(f"{m} {p:.2f}" for m, p in zip(cfg.modalities, cfg.probabilities(), strict=True))
        mix = f"every modality per step, loss weights {probs}" if cfg.step == "mixed" else f"modality mix {probs}"
        log(_header(s, "joint data2vec", mix))
        members = {m: (cfg.member(m), model.member(m)) for m in cfg.modalities}
        step = run_engine(s, objective, members, progress=progress, stop_after=stop_after)
        counts = steps_per_modality(cfg, step)
        log("steps per modality: " + ", ".join(f"{m} {c}" for m, c in counts.items()))
        return JointTrainResult(run_dir, step, model, s.ctx.history, counts, sorted(set(skipped)))


def _resume_options(resume_from: str | Path | None, ignore_checksums: bool, force_fresh: bool) -> ResumeOptions:
    return ResumeOptions(None if resume_from is None else Path(resume_from), ignore_checksums, force_fresh)


def resume(
    run_dir: str | Path,
    *,
    progress: bool = True,
    quiet: bool = False,
    stop_after: int | None = None,
    resume_from: str | Path | None = None,
    ignore_checksums: bool = False,
    force_fresh: bool = False,
) -> TrainResult | JointTrainResult:
    """Continue the run in `run_dir` (single-modality or joint, as its config.json says) from its
    newest valid checkpoint (`resume_from`, `ignore_checksums`, `force_fresh`: as for `train`)."""
    saved = Path(run_dir) / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(f"{saved}: not a run directory (no config.json) - nothing to resume")
    kw: dict[str, Any] = {
        "resume": True,
        "progress": progress,
        "quiet": quiet,
        "stop_after": stop_after,
        "resume_from": resume_from,
        "ignore_checksums": ignore_checksums,
        "force_fresh": force_fresh,
    }
    if is_joint(read_config_json(saved)):
        return train_joint(None, run_dir, **kw)
    return train(None, run_dir, **kw)  # type: ignore[arg-type]
