"""The pretraining loop.

Each optimizer step (data2vec 1.0 section 3, 2.0 section 3.3 of SPEC):
    teacher targets on the unmasked input (no grad)  ->  student on the masked input
    ->  regression loss at masked positions  ->  backward (x grad_accum)  ->  clip
    ->  AdamW step  ->  EMA update of the teacher.
Schedules are pure functions of the step and the data position is a pure function of
the micro-batch counter, so `resume` continues exactly where a run stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from data2vec.checkpoint import Checkpoint, list_checkpoints, load_latest, remove_stale_temporaries, save_checkpoint
from data2vec.config import ConfigError, OptimConfig, RunConfig
from data2vec.data.images import BadInputError
from data2vec.data.pipeline import PretrainBatch, build_pretrain_loader, pipeline_for
from data2vec.distributed import check_fsdp
from data2vec.distributed import setup as setup_distributed
from data2vec.model import Batch, Data2Vec, no_weight_decay
from data2vec.schedules import cosine_lr, ema_decay

if TYPE_CHECKING:
    from data2vec.extract import Pretrained


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (collapse, non-finite loss); the last checkpoint is intact."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    model: Data2Vec
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_inputs: list[str] = field(default_factory=list)
    data_notes: list[str] = field(default_factory=list)
    """What the data pipeline reported about the data (e.g. audio clips dropped as too short)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CPU (AMX) and CUDA; fp32 is a no-op."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on 1-D parameters, biases, tokens and position tables. Each group
    carries an `lr_scale` (the local encoder's is `cfg.local_lr_scale`; at 0 it is left out)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        local = cfg.local_lr_scale != 1 and ".local." in f".{name}"
        if local and cfg.local_lr_scale == 0:
            continue
        groups.setdefault((no_weight_decay(name, p), local), []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                "lr_scale": cfg.local_lr_scale if local else 1.0,
            }
            for (no_decay, local), params in sorted(groups.items())
        ],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
    )


LOCAL_STD_WARN = 0.05
"""Below this `local_std` (after `train.collapse_after`) train.log gets one warning."""
LOCAL_STD_REMEDY = "keep the local encoder at its initial weights with optim.local_lr_scale=0, or slow it down"


def low_local_std(metrics: dict[str, float], threshold: float) -> bool:
    """The local-encoder collapse check: `local_std` (when the step logged one) under a positive
    threshold."""
    return threshold > 0 and metrics.get("local_std", math.inf) < threshold


def local_std_warning(step: int, value: float) -> str:
    return (
        f"warning: local_std {value:.4f} at step {step} (0.5-1 at init): the local encoder "
        f"(CNN / patch or token embedding) emits nearly one vector for every token, a shortcut the "
        f"instance-normed targets hide from target_std; {LOCAL_STD_REMEDY} (train.min_local_std > 0 stops on it)"
    )


def anneal_steps(cfg: RunConfig) -> int:
    return cfg.train.steps if cfg.teacher.anneal_steps is None else cfg.teacher.anneal_steps


def _next_batch(it: Iterator[PretrainBatch], skipped: list[str], on_bad_input: str) -> PretrainBatch:
    while True:
        b = next(it)
        if b.skipped and on_bad_input == "fail":
            raise BadInputError(b.skipped[0] + " (set data.on_bad_input=skip to skip bad files)")
        skipped.extend(b.skipped)
        if b.inputs.numel():
            return b


def _no_log(msg: str) -> None:
    """Ranks other than 0 log nothing."""


class _Log:
    def __init__(self, run_dir: Path, quiet: bool) -> None:
        self.path = run_dir / "train.log"
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        with open(self.path, "a") as f:
            f.write(msg + "\n")
        if not self.quiet:
            tqdm.write(msg)


def _batch_desc(cfg: RunConfig) -> str:
    """The micro-batch as the log header states it: audio batches are by duration, not by count."""
    d, masks = cfg.data, cfg.masking.num_masks if cfg.model.version == 2 else 1
    size = f"<={d.audio.batch_seconds:g} s of audio" if cfg.model.modality == "audio" else str(d.batch_size)
    return f"{size} x {masks} mask(s) x {cfg.train.grad_accum} accum"


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    quiet: bool = False,
    stop_after: int | None = None,
    init: str | Path | Pretrained | None = None,
) -> TrainResult:
    """Pretrain per `cfg`, writing checkpoints, metrics.jsonl and loss.png into `run_dir`.

    With `resume=True`, continue from the newest valid checkpoint in `run_dir` using the
    config saved there (`cfg` is ignored except when no checkpoint exists yet).
    `stop_after` ends this invocation after that step (with a checkpoint), e.g. to split a
    run into time-limited jobs; schedules still follow `train.steps`.
    `init` starts the student from a pretrained model (`init_from`); a run resumed before its
    first checkpoint starts from it again.
    """
    run_dir = Path(run_dir)
    if resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"{saved}: not a run directory (no config.json) - nothing to resume")
        cfg = RunConfig.load(saved)
    elif list_checkpoints(run_dir):
        raise FileExistsError(f"{run_dir}: already holds checkpoints; pass --resume to continue it")
    run_dir.mkdir(parents=True, exist_ok=True)
    # Under torchrun: one process per rank; rank 0 alone writes files (distributed.py).
    dist = setup_distributed(resolve_device(cfg.train.device), cfg.train.fsdp)
    check_fsdp(cfg, dist, has_init=init is not None)
    log: Callable[[str], None] = _Log(run_dir, quiet) if dist.is_main else _no_log
    if not resume:  # e.g. train a tokenizer; the saved config.json holds the result
        prepared = cfg
        cfg = dist.on_main(lambda: pipeline_for(prepared).prepare(prepared, run_dir))
    tc = cfg.train
    device = dist.device(resolve_device(tc.device))
    torch.manual_seed(tc.seed)
    model = Data2Vec.from_config(cfg).to(device)
    if tc.compile:
        model.compile_blocks()
    dist.seed(tc.seed)
    step_model = dist.wrap(model, cfg, device)  # what the step calls: DDP/FSDP or the model itself
    optimizer = build_optimizer(model, cfg.optim)
    if dist.is_main:
        remove_stale_temporaries(run_dir)
    # Counters that survive resumes and rewinds (saved in state.pt).
    run_state: dict[str, Any] = {"lr_scale": 1.0, "nan_skipped": 0, "rewinds": 0, "skipped_inputs": []}

    def restore(ck: Checkpoint, counters: bool = True) -> None:
        """Load weights, optimizer and RNG; with `counters`, also the run counters (a resume,
        not a rewind: a rewind keeps counting)."""
        dist.load_checkpoint(model, optimizer, {**ck.student, **ck.teacher}, ck.state["optimizer"])
        torch.set_rng_state(ck.state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in ck.state:
            torch.cuda.set_rng_state(ck.state["rng_cuda"], device)
        dist.restore_rng(ck.state)
        if counters:
            for key in ("lr_scale", "nan_skipped", "rewinds"):
                run_state[key] = ck.state.get(key, run_state[key])
            run_state["skipped_inputs"][:] = ck.state.get("skipped_inputs", [])

    start = 0
    ckpt = load_latest(run_dir, map_location=device) if resume else None
    if ckpt is not None:
        restore(ckpt)
        start = ckpt.step
        log(f"resumed from {ckpt.path} at step {start}")
    elif resume:
        log(f"no checkpoint in {run_dir} yet: starting from step 0")
    if ckpt is None:
        init = init if init is not None or not resume else _recorded_init(run_dir)
        if init is not None:
            log(_apply_init(model, init, run_dir))
    if not resume and dist.is_main:
        cfg.save(run_dir / "config.json")

    history: list[dict[str, float]] = []
    skipped: list[str] = run_state["skipped_inputs"]
    metrics_path = run_dir / "metrics.jsonl"
    if dist.is_main:
        _truncate_metrics(metrics_path, start)

    if start >= tc.steps:
        log(f"run already finished ({start} of {tc.steps} steps)")
        return TrainResult(run_dir, start, model, history, skipped)

    data, n_samples = build_pretrain_loader(cfg, start * tc.grad_accum, dist.rank, dist.world_size)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        f"data2vec {cfg.model.version}.0 {cfg.model.modality} | {n_params / 1e6:.2f}M trainable params | "
        f"{n_samples} samples | batch {_batch_desc(cfg)} | {tc.precision} on {device}"
        + (f" x {dist.world_size} processes{' (FSDP)' if dist.fsdp else ''}" if dist.enabled else "")
    )
    data_notes = [str(note) for note in getattr(data, "notes", ())]  # optional, per pipeline
    for note in data_notes:
        log(note)

    def save(step: int) -> None:
        student, teacher, optim_state = dist.checkpoint_parts(model, optimizer)  # collective (FSDP)
        state: dict[str, Any] = {
            "optimizer": optim_state,
            "step": step,
            "rng_cpu": torch.get_rng_state(),
            **run_state,
            **dist.rng_states(),  # collective
        }
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        if dist.is_main:
            path = save_checkpoint(run_dir, step, student, teacher, cfg.to_dict(), state, keep_last=tc.keep_last)
            log(f"saved checkpoint {path}")
        dist.barrier()  # nobody reads or rewinds to a checkpoint before it is complete

    model.train()
    bar = tqdm(total=tc.steps, initial=start, disable=not progress or not dist.is_main, dynamic_ncols=True, unit="step")
    t_last, samples_since = time.perf_counter(), 0
    last_saved = start
    warned_local = False
    step = start
    try:
        while step < tc.steps:
            lr = run_state["lr_scale"] * cosine_lr(
                step, tc.steps, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps
            )
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            sums: dict[str, float] = {}
            for micro in range(tc.grad_accum):
                b = _next_batch(data, skipped, cfg.data.on_bad_input)
                batch = Batch(
                    b.inputs.to(device, non_blocking=True),
                    b.mask.to(device, non_blocking=True),
                    None if b.padding_mask is None else b.padding_mask.to(device, non_blocking=True),
                    None if b.student_inputs is None else b.student_inputs.to(device, non_blocking=True),
                )
                with dist.accumulating(step_model, last=micro == tc.grad_accum - 1):
                    with autocast(device, tc.precision):
                        out = step_model(batch)
                    (out.loss / tc.grad_accum).backward()
                samples_since += batch.inputs.shape[0] * dist.world_size
                sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach()) / tc.grad_accum
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / tc.grad_accum
            sums = dist.mean_metrics(sums)  # the same numbers, hence the same decisions, on every rank
            max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
            grad_norm = dist.grad_norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

            # Step 1: numbers. A non-finite loss or gradient never reaches the weights.
            if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
                what = f"non-finite {'loss' if not math.isfinite(sums['loss']) else 'gradient'} at step {step + 1}"
                if tc.on_nan == "stop":
                    raise TrainingStopped(
                        f"{what} (loss {sums['loss']}, grad norm {grad_norm}); stopped. "
                        f"The last good checkpoint is step {last_saved} in {run_dir}."
                    )
                optimizer.zero_grad(set_to_none=True)
                run_state["nan_skipped"] += 1
                log(f"{what}: step skipped ({run_state['nan_skipped']} so far, train.on_nan=skip)")
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                decay = ema_decay(step + 1, cfg.teacher.decay, cfg.teacher.end_decay, anneal_steps(cfg))
                model.update_teacher(decay)

            now = time.perf_counter()
            record = {
                "step": step + 1,
                **sums,
                "lr": lr,
                "grad_norm": grad_norm,
                "ema_decay": ema_decay(step + 1, cfg.teacher.decay, cfg.teacher.end_decay, anneal_steps(cfg)),
            }
            if cfg.probe.every and (step + 1) % cfg.probe.every == 0:  # online probe (probe.py)
                from data2vec.probe import online_probe

                record.update(online_probe(cfg, run_dir, model, step + 1))
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                record["samples_per_sec"] = samples_since / max(now - t_last, 1e-9)
                t_last, samples_since = now, 0
                if dist.is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                bar.set_postfix(
                    loss=f"{sums['loss']:.4f}",
                    lr=f"{lr:.2e}",
                    sps=f"{record['samples_per_sec']:.0f}",
                    tgt_std=f"{sums['target_std']:.3f}",
                )
            history.append(record)
            bar.update(1)
            step += 1

            # Step 2: the collapse monitor (SPEC 1.3), after its warm-up.
            if step > tc.collapse_after and not warned_local and low_local_std(sums, LOCAL_STD_WARN):
                log(local_std_warning(step, sums["local_std"]))
                warned_local = True
            local_low = low_local_std(sums, tc.min_local_std)
            collapsed = step > tc.collapse_after and (
                sums["target_std"] < tc.min_target_std or sums["pred_std"] < tc.min_pred_std or local_low
            )
            if collapsed:
                what = (
                    f"representation collapse at step {step}: target std {sums['target_std']:.4f} "
                    f"(min {tc.min_target_std}), prediction std {sums['pred_std']:.4f} (min {tc.min_pred_std})"
                )
                if local_low:
                    what += f", local std {sums['local_std']:.4f} (min {tc.min_local_std}; {LOCAL_STD_REMEDY})"
                good = load_latest(run_dir, map_location=device)
                if tc.on_collapse == "rewind" and good is not None and run_state["rewinds"] < tc.max_rewinds:
                    restore(good, counters=False)
                    run_state["rewinds"] += 1
                    run_state["lr_scale"] *= tc.rewind_lr_factor
                    step = last_saved = good.step
                    if dist.is_main:
                        _truncate_metrics(metrics_path, step)
                    data, _ = build_pretrain_loader(cfg, step * tc.grad_accum, dist.rank, dist.world_size)
                    bar.reset(total=tc.steps)
                    bar.update(step)
                    log(
                        f"{what}. Rewound to step {step} (rewind {run_state['rewinds']} of {tc.max_rewinds}); "
                        f"learning rate now x{run_state['lr_scale']:g}"
                    )
                    continue
                raise TrainingStopped(
                    f"{what}. Stopped without saving; the last good checkpoint is step {last_saved} in {run_dir}. "
                    "Try a lower optim.lr, a slower teacher (teacher.decay closer to 1), or train.on_collapse=rewind."
                )
            stopping = stop_after is not None and step >= stop_after
            if step % tc.ckpt_every == 0 or step == tc.steps or stopping:
                save(step)
                last_saved = step
                if dist.is_main:
                    plot_loss_curve(metrics_path, run_dir / "loss.png")
            if stopping and step < tc.steps:
                log(f"stopping after step {step} as asked (--stop-after); resume with --resume {run_dir}")
                break
    except TrainingStopped as e:
        log(str(e))
        raise
    except BadInputError as e:
        # Keep what was done: checkpoint the last completed step before stopping.
        optimizer.zero_grad(set_to_none=True)
        if step > last_saved and not dist.enabled:  # saving is collective: other ranks may be elsewhere
            save(step)
        log(f"stopped on bad input at step {step}: {e}")
        raise
    finally:
        bar.close()
        if dist.is_main:
            _write_summary(run_dir, step, run_state)
        if skipped:
            unique = sorted(set(skipped))
            log(f"skipped {len(unique)} bad input(s):\n  " + "\n  ".join(unique))
        if run_state["nan_skipped"]:
            log(f"skipped {run_state['nan_skipped']} step(s) with a non-finite loss or gradient")
    return TrainResult(run_dir, step, model, history, sorted(set(skipped)), data_notes)


# ----------------------------------------------------------------------------- continue pretraining

INIT_RECORD = "init.json"

INIT_TRAINING_KEYS = (
    "model.encoder.dropout",
    "model.encoder.attn_dropout",
    "model.encoder.activation_dropout",
    "model.encoder.drop_path",
    "model.encoder.layerdrop",
    "model.text.embed_dropout",
    "model.audio.pos_conv_zero_padding",
    "model.head_layers",
    "model.decoder",
)
"""Model settings an override may change under `--init`: regularisation, and the head/decoder (fresh anyway)."""


def check_init_config(source: RunConfig, cfg: RunConfig) -> None:
    """Refuse a config whose architecture differs from the pretrained model's, naming the key."""
    from data2vec.config import to_dict

    def diff(a: Any, b: Any, key: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [k for name in a for k in diff(a[name], b.get(name), f"{key}.{name}")]
        return [] if a == b else [key]

    changed = [
        k
        for k in diff(to_dict(source.model), to_dict(cfg.model), "model")
        if not any(k == t or k.startswith(t + ".") for t in INIT_TRAINING_KEYS)
    ]
    if changed:
        raise ConfigError(
            f"{changed[0]}: --init takes the architecture from the checkpoint; this override would change it "
            f"(changed: {', '.join(changed)})"
        )


def init_from(model: Data2Vec, source: str | Path | Pretrained) -> tuple[Pretrained, list[str]]:
    """Load a pretrained model's front-end and encoder into the student; the pretraining head or
    decoder stays freshly initialised and the teacher becomes a copy of the loaded student.

    Returns (the pretrained model read, the student keys that were not loaded: the fresh ones)."""
    from data2vec.extract import Pretrained, load_pretrained_state

    pre = source if isinstance(source, Pretrained) else load_pretrained_state(source)
    own = model.student_state_dict()
    weights = {k: v for k, v in pre.student.items() if not k.startswith(("head.", "teacher."))}
    unexpected = sorted(set(weights) - set(own))
    wrong = [k for k in weights if k in own and weights[k].shape != own[k].shape]
    fresh = sorted(k for k in own if k not in weights)
    missing = [k for k in fresh if not k.startswith("head.") and k != "frontend.context.mask_emb"]
    if wrong:
        k = wrong[0]
        raise ConfigError(
            f"{k}: shape {tuple(weights[k].shape)} in {pre.source}, {tuple(own[k].shape)} in the model built "
            "from the config (for text, set data.text.tokenizer to the tokenizer the model was trained with)"
        )
    if missing or unexpected:
        what = f"lacks {', '.join(missing[:5])}" if missing else f"has no place for {', '.join(unexpected[:5])}"
        raise ConfigError(f"init: the model built from the config {what} ({pre.source})")
    model.load_state_dict(weights, strict=False)
    with torch.no_grad():
        for name, part in model.student_parts().items():
            model.teacher[name].load_state_dict(part.state_dict())
    return pre, fresh


def _apply_init(model: Data2Vec, init: str | Path | Pretrained, run_dir: Path) -> str:
    """`init_from`, recorded in RUN_DIR/init.json; returns the log line."""
    pre, fresh = init_from(model, init)
    record = {"init": pre.path, "source": pre.source, "fresh": fresh}
    (run_dir / INIT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return (
        f"initialised from {pre.source}: the student's front-end and encoder loaded, the teacher starts as "
        f"a copy of them; fresh: {', '.join(fresh) if fresh else 'nothing'}"
    )


def _recorded_init(run_dir: Path) -> str | None:
    """The --init source of a run resumed before its first checkpoint."""
    record = run_dir / INIT_RECORD
    if not record.is_file():
        return None
    value = json.loads(record.read_text()).get("init")
    return str(value) if value else None


def _truncate_metrics(metrics_path: Path, step: int) -> None:
    """Drop metrics logged after `step` (we are resuming or rewinding to it)."""
    if not metrics_path.exists():
        return
    if step == 0:
        metrics_path.unlink()
        return
    lines = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    metrics_path.write_text("".join(ln + "\n" for ln in lines))


def _write_summary(run_dir: Path, step: int, run_state: dict[str, Any]) -> None:
    summary = {
        "step": step,
        "skipped_inputs": len(set(run_state["skipped_inputs"])),
        "skipped_input_files": sorted(set(run_state["skipped_inputs"])),
        "nan_skipped_steps": run_state["nan_skipped"],
        "rewinds": run_state["rewinds"],
        "lr_scale": run_state["lr_scale"],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def plot_loss_curve(metrics_path: Path, out: Path) -> None:
    """loss and target/prediction std against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(steps, [r["loss"] for r in rows], lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.set_title("data2vec loss")
    ax2.plot(steps, [r["target_std"] for r in rows], label="target std")
    ax2.plot(steps, [r["pred_std"] for r in rows], label="prediction std")
    ax2.set_xlabel("step")
    ax2.set_title("collapse monitor")
    ax2.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
