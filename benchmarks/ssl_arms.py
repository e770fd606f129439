"""Shared pieces of `vs_ssl.py`: snapshots, schedules, our arms through the public training API,
the calibrated training loop every transformers peer runs in, and the frozen-feature probe.

A modality module (`vs_ssl_image.py`, `vs_ssl_audio.py`, `vs_ssl_text.py`) provides:

- `PRESET` (our tiny preset), `PEER` (the peer arm's key) and `PEER_NAME`;
- `ours_overrides(work)`: the config overrides that point our arms at the pretraining data;
- `run_peer(budget_s, points, work, seed, args)`: the peer's calibrated run (`calibrated_run`);
- `peer_features(path, data)`: mean-pooled last-layer features of a peer snapshot;
- `probe_sets(args)`: (labelled training set, full test set, the curve's test subset);
- `add_arguments(parser)`: its own command-line options (may add none);
- optionally `prepare(work, args)`: its pretraining data, made once under `work` before any arm
  runs (vs_ssl.py holds a file lock around it, so arms started in parallel wait for one copy).

and, for fine-tuning (`vs_ssl_finetune.py`):

- `peer_to_ours(path, out_dir)`: the peer's snapshot converted into our pretrained-model folder;
- `finetune_sets(args)`: (labelled training set, test set); `finetune_config(epochs)`: the recipe.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data2vec.checkpoint import list_checkpoints
from data2vec.config import RunConfig, apply_overrides
from data2vec.data.eval_inputs import labelled_items
from data2vec.extract import extract_items
from data2vec.finetune import LabelledSet
from data2vec.interop import save_pretrained
from data2vec.model import Data2Vec
from data2vec.presets import preset
from data2vec.pretrained import build_model, load_pretrained, load_student_weights
from data2vec.training import train
from data2vec.training.devices import resolve_precision


class Snapshot(dict[str, Any]):
    """{'minutes', 'step', 'path'}: an arm's state at one moment of its budget."""


def precision() -> str:
    """The precision every arm uses: bf16 where this CPU multiplies bf16 in hardware, else fp32."""
    return resolve_precision(torch.device("cpu"), "auto")


def autocast() -> Any:
    if precision() == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up for `warmup` steps to `peak`, then cosine to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def linear_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then linear decay to zero at `total` (wav2vec 2.0's and RoBERTa's)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def points_of(total: int, points: int) -> list[int]:
    """The steps at which to snapshot: `points` evenly spaced, the last = `total`."""
    return sorted({max(1, round(total * k / points)) for k in range(1, points + 1)})


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with weight decay on matrices only (biases, norms and scalars excluded)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


# ---------------------------------------------------------------------- ours


def ours_config(preset_name: str, version: int, overrides: list[str]) -> RunConfig:
    return apply_overrides(
        preset(preset_name, version),
        ["data.num_workers=0", "train.log_every=50", "train.ckpt_every=1000000", *overrides],
    )


def run_ours(
    preset_name: str, version: int, budget_s: float, points: int, work: Path, overrides: list[str], tag: str = ""
) -> dict[str, Any]:
    """Pretrain with this library for `budget_s` seconds (steps calibrated on a short run), stopping
    at each snapshot step (a checkpoint) and resuming: the calls' wall time is the arm's clock,
    start-up and data indexing included. The run goes to WORK/ours{version}{tag}."""
    cfg = ours_config(preset_name, version, overrides)
    times = []
    # the difference of a 2-step and a 12-step run: ten steps, start-up cancelled; a first 2-step run
    # takes the process's one-off costs (lazy imports and initialisation), which would shrink the difference
    for n in (2, 2, 12):
        calib = work / f"ours{version}{tag}-calib"
        shutil.rmtree(calib, ignore_errors=True)
        t0 = time.perf_counter()
        train(replace(cfg, train=replace(cfg.train, steps=n)), calib, progress=False, quiet=True)
        times.append(time.perf_counter() - t0)
        shutil.rmtree(calib, ignore_errors=True)
    per_step = max(1e-3, (times[2] - times[1]) / 10)
    total = max(points, int(budget_s / per_step))
    cfg = replace(cfg, train=replace(cfg.train, steps=total, keep_last=points + 1))
    run = work / f"ours{version}{tag}"
    shutil.rmtree(run, ignore_errors=True)
    clock, snaps = 0.0, []
    for k, stop in enumerate(points_of(total, points)):
        t0 = time.perf_counter()
        train(cfg, run, resume=k > 0, stop_after=stop, progress=False, quiet=True)
        clock += time.perf_counter() - t0
        path = next(c for c in list_checkpoints(run) if c.name == f"step_{stop:08d}")
        snaps.append(Snapshot(minutes=clock / 60, step=stop, path=str(path)))
        print(f"ours {version}.0: step {stop}/{total} at {clock / 60:.2f} min", flush=True)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    a = cfg.data.audio
    batch = (
        f"{a.batch_seconds:g} s (at most {a.max_batch_size} clips)"
        if cfg.model.modality == "audio"
        else cfg.data.batch_size
    )
    recipe = (
        f"preset {preset_name} v{version}: batch {batch} x {cfg.masking.num_masks} mask(s), "
        f"lr {cfg.optim.lr}, {total} steps ({per_step:.3f} s/step calibrated)"
    )
    return {
        "snapshots": snaps,
        "steps": total,
        "recipe": recipe,
        "config": str(run / "config.json"),
        "final_loss": last[-1]["loss"] if last else None,
    }


def ours_features(path: str, data: LabelledSet) -> np.ndarray:
    """Mean-pooled last-layer features of one of our checkpoints."""
    pre = load_pretrained(path)
    return model_features(build_model(pre), pre.config, data)


def model_features(model: Data2Vec, cfg: RunConfig, data: LabelledSet) -> np.ndarray:
    feats = extract_items(model.eval(), labelled_items(cfg, data), batch_size=64)
    return feats[max(feats)]


def save_as_ours(cfg: RunConfig, state: dict[str, torch.Tensor], out_dir: Path, what: str) -> Path:
    """A peer's encoder, already in our key names (`state`), as our pretrained-model folder for
    the model `cfg` describes (what `load_pretrained` and `finetune` read); `what` names it in
    errors. The parts the encoder lacks (2.0 decoder, heads) start from seed 0 and are unused."""
    torch.manual_seed(0)
    model = Data2Vec.from_config(cfg)
    load_student_weights(model, state, what, what=f"{what} conversion")
    return save_pretrained(model.eval(), out_dir, config=cfg)


def init_model(cfg: RunConfig) -> Data2Vec:
    """The architecture at its seeded random initialisation: its features are the level a
    pretrained encoder has to beat to have learned anything a linear probe can use."""
    torch.manual_seed(cfg.train.seed)
    return Data2Vec.from_config(cfg)


# ---------------------------------------------------------------------- peers


def calibrated_run(
    name: str,
    build: Callable[[], Any],
    step: Callable[[Any, int, int], float],
    save: Callable[[Any, Path], None],
    budget_s: float,
    points: int,
    work: Path,
) -> dict[str, Any]:
    """A peer's pretraining for `budget_s` seconds: `build()` -> state (seeded), `step(state, k, total)`
    -> loss. Ten steps after two warm-ups, outside the budget as our calibration run is, give the
    seconds per step; then a fresh `build()` trains for the calibrated number of steps, its schedule
    ending there, `save(state, path)` at each of the `points` snapshots."""
    state = build()
    t_calib = time.perf_counter()
    for k in range(12):
        if k == 2:
            t_calib = time.perf_counter()
        step(state, k, 10_000)
    per_step = (time.perf_counter() - t_calib) / 10
    total = max(points, int(budget_s / per_step))
    state = build()  # start over from the same initialisation, with the calibrated schedule
    t0 = time.perf_counter()
    snaps, marks, loss = [], points_of(total, points), float("nan")
    for k in range(total):
        loss = step(state, k, total)
        if k + 1 in marks:
            path = work / f"{name}-step{k + 1}.pt"
            save(state, path)
            minutes = (time.perf_counter() - t0) / 60
            snaps.append(Snapshot(minutes=minutes, step=k + 1, path=str(path)))
            print(f"{name}: step {k + 1}/{total} at {minutes:.2f} min, loss {loss:.4f}", flush=True)
    return {"snapshots": snaps, "steps": total, "per_step": per_step, "final_loss": loss}
