"""The fine-tuning loop: losses (with mixup/cutmix), per-epoch evaluation, the best epoch kept."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data2vec.config import ConfigError, RunConfig
from data2vec.data.labelled import LabelledSet
from data2vec.finetune.config import METRIC, FinetuneConfig
from data2vec.finetune.ctc import encode_letters, error_rates, greedy_decode, letter_vocab
from data2vec.finetune.data import Batcher, index_batches, load_tokenizer, read_labelled
from data2vec.finetune.model import FinetuneModel, build_finetune_model, param_groups, save_finetuned
from data2vec.pretrained import ModalityRequired, Pretrained, load_pretrained
from data2vec.schedules import cosine_lr
from data2vec.writes import append_line, save_figure, write_text_atomic


def smooth_one_hot(targets: Tensor, num_classes: int, smoothing: float) -> Tensor:
    off = smoothing / num_classes
    return torch.full((len(targets), num_classes), off, device=targets.device).scatter_(
        1, targets[:, None], 1.0 - smoothing + off
    )


def mix_batch(
    images: Tensor, soft_targets: Tensor, cfg: FinetuneConfig, rng: random.Random
) -> tuple[Tensor, Tensor, float]:
    """Mixup or CutMix with the batch flipped: returns (images, targets, lambda); each target
    row still sums to 1. Untouched when both are off or the batch is not drawn (`mix_prob`)."""
    use_mix, use_cut = cfg.mixup > 0, cfg.cutmix > 0
    if not (use_mix or use_cut) or rng.random() >= cfg.mix_prob:
        return images, soft_targets, 1.0
    cut = use_cut and (not use_mix or rng.random() < cfg.mix_switch_prob)
    alpha = cfg.cutmix if cut else cfg.mixup
    lam = float(np.random.default_rng(rng.getrandbits(32)).beta(alpha, alpha))
    flipped = images.flip(0)
    if cut:
        H, W = images.shape[-2:]
        rh, rw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = rng.randrange(H), rng.randrange(W)
        y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, H)
        x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, W)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually pasted
    else:
        images = images * lam + flipped * (1 - lam)
    return images, soft_targets * lam + soft_targets.flip(0) * (1 - lam), lam


NOT_CURVES = ("step", "epoch", "seconds")
"""metrics.jsonl keys that TensorBoard does not plot (the curves are against the step)."""


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[Any] = field(default_factory=list)


def _better(task: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if METRIC[task] == "cer" else new > old


@torch.no_grad()
def evaluate(
    model: FinetuneModel,
    data: LabelledSet,
    cfg: FinetuneConfig,
    rcfg: RunConfig,
    vocab: Sequence[str] = (),
    batch_size: int | None = None,
) -> EvalResult:
    """Metrics of `model` on `data`: accuracy (+ loss), Pearson/Spearman (+ MSE), or CER/WER."""
    from scipy.stats import pearsonr, spearmanr

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    batcher = Batcher(cfg, rcfg, vocab)
    rng = random.Random(0)
    preds: list[Any] = []
    loss_sum = 0.0
    try:
        for idx in index_batches(len(data), batch_size or cfg.batch_size, None):
            x, pad = batcher.inputs(data, idx, False, rng)
            with _autocast(device, cfg.precision):
                out, frame_pad = model(x.to(device), None if pad is None else pad.to(device))
            out = out.float()
            if cfg.task == "audio_ctc":
                lengths = None if frame_pad is None else (~frame_pad).sum(1)
                preds.extend(greedy_decode(out, lengths, vocab))
            elif cfg.task == "text_reg":
                y = torch.tensor([float(data.targets[i]) for i in idx], device=device)
                loss_sum += float(F.mse_loss(out, y, reduction="sum"))
                preds.extend(out.cpu().tolist())
            else:
                y = torch.tensor([int(data.targets[i]) for i in idx], device=device)
                loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
                preds.extend(out.argmax(-1).cpu().tolist())
    finally:
        model.train(was)
    n = max(len(data), 1)
    if cfg.task == "audio_ctc":
        wer, cer = error_rates(preds, [str(t) for t in data.targets])
        return EvalResult({"cer": cer, "wer": wer}, preds)
    if cfg.task == "text_reg":
        t = np.asarray(data.targets, dtype=np.float64)
        p = np.asarray(preds, dtype=np.float64)
        ok = len(t) > 1 and p.std() > 0 and t.std() > 0
        pr = float(pearsonr(p, t)[0]) if ok else 0.0
        sr = float(spearmanr(p, t)[0]) if ok else 0.0
        return EvalResult({"pearson": pr, "spearman": sr, "mse": loss_sum / n}, preds)
    acc = float(np.mean(np.asarray(preds) == np.asarray(data.targets))) if len(data) else 0.0
    return EvalResult({"accuracy": acc, "loss": loss_sum / n}, preds)


@dataclass
class FinetuneResult:
    out_dir: Path
    model: FinetuneModel
    """The model after the last epoch (the best one is in `out_dir/best`)."""
    best_metric: float
    best_epoch: int
    metric: str
    history: list[dict[str, float]]
    """One row per epoch: epoch, step, train_loss, eval_<metric>..., seconds."""
    seconds: float


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _resolve_source(
    source: str | Path | RunConfig | Pretrained, modality: str
) -> tuple[RunConfig, dict[str, Tensor] | None, str]:
    """(encoder config, student weights or None for a random init, description); a joint
    checkpoint gives its `modality` member (the task's)."""
    if isinstance(source, RunConfig):
        return source, None, "random init"
    if isinstance(source, Pretrained):
        pre = source
    else:
        try:
            pre = load_pretrained(source)
        except ModalityRequired:
            pre = load_pretrained(source, modality)
    return pre.config, pre.student, pre.source


def _check_modality(cfg: FinetuneConfig, rcfg: RunConfig, described: str) -> None:
    if rcfg.model.modality != cfg.modality:
        raise ConfigError(
            f"task: {cfg.task} needs a {cfg.modality} model; {described} is a {rcfg.model.modality} model"
        )


def read_labelled_sets(
    cfg: FinetuneConfig,
    rcfg: RunConfig,
    train_data: str | Path | LabelledSet,
    eval_data: str | Path | LabelledSet,
) -> tuple[LabelledSet, LabelledSet]:
    """The training and eval sets for fine-tuning the model `rcfg` describes, read if given as
    paths (as `finetune` reads them); eval class names map to the training set's indices."""
    _check_modality(cfg, rcfg, "the pretrained model")
    paths = not (isinstance(train_data, LabelledSet) and isinstance(eval_data, LabelledSet))
    tokenizer = load_tokenizer(cfg, rcfg) if cfg.modality == "text" and paths else None
    train_set = (
        train_data if isinstance(train_data, LabelledSet) else read_labelled(train_data, cfg, rcfg, None, tokenizer)
    )
    eval_set = (
        eval_data
        if isinstance(eval_data, LabelledSet)
        else read_labelled(eval_data, cfg, rcfg, train_set.classes or None, tokenizer)
    )
    if len(train_set) == 0 or len(eval_set) == 0:
        raise ValueError("the training and eval sets must not be empty")
    return train_set, eval_set


def _num_outputs(cfg: FinetuneConfig, train: LabelledSet, vocab: Sequence[str]) -> int:
    if cfg.task == "audio_ctc":
        return len(vocab)
    if cfg.task == "text_reg":
        return 1
    return max(len(train.classes), max(int(t) for t in train.targets) + 1)


def finetune(
    source: str | Path | RunConfig | Pretrained,
    cfg: FinetuneConfig,
    train_data: str | Path | LabelledSet,
    eval_data: str | Path | LabelledSet,
    out_dir: str | Path,
    *,
    quiet: bool = False,
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune `source` (anything `data2vec.pretrained.load_pretrained` reads: a run directory,
    checkpoint, pretrained folder, transformers or fairseq checkpoint; of a joint checkpoint, the
    task's modality), a `Pretrained`, or a RunConfig (the same architecture from a random init)
    on `train_data`, evaluating on `eval_data` after every epoch."""
    from tqdm import tqdm

    from data2vec.training.tensorboard import TENSORBOARD_DIR, EventLog, require_loggers

    require_loggers(cfg.loggers, "loggers")
    t_start = time.perf_counter()
    rcfg, weights, described = _resolve_source(source, cfg.modality)
    _check_modality(cfg, rcfg, described)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "finetune.log"

    def log(msg: str) -> None:
        append_line(log_path, msg, "finetune.log")
        if not quiet:
            tqdm.write(msg)

    train_set, eval_set = read_labelled_sets(cfg, rcfg, train_data, eval_data)
    vocab = letter_vocab([str(t) for t in train_set.targets]) if cfg.task == "audio_ctc" else []
    n_out = _num_outputs(cfg, train_set, vocab)
    model, rcfg = build_finetune_model(rcfg, weights, cfg, n_out)
    from data2vec.training import resolve_device

    device = resolve_device(cfg.device)
    model.to(device)
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_fraction * total)
    encoder_params = [p for n, p in model.named_parameters() if not n.startswith("head.") and p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metric = METRIC[cfg.task]
    log(
        f"fine-tune {cfg.task} from {described} | {n_params / 1e6:.2f}M trainable | {len(train_set)} train, "
        f"{len(eval_set)} eval | {cfg.epochs} epochs x {steps_per_epoch} steps | {cfg.precision} on {device}"
    )
    meta_base: dict[str, Any] = {
        "config": cfg.to_dict(),
        "source": described,
        "classes": train_set.classes,
        "letters": vocab,
        "num_outputs": n_out,
        "metric": metric,
    }
    write_text_atomic(out / "finetune_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n", "a config")
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    rng = random.Random(cfg.seed)
    batcher = Batcher(cfg, rcfg, vocab)
    history: list[dict[str, float]] = []
    best: float | None = None
    best_epoch = 0
    step = 0
    model.train()
    # Like metrics.jsonl, the curves start afresh: what an earlier run in `out` wrote is dropped.
    events = EventLog(out / TENSORBOARD_DIR, 0) if "tensorboard" in cfg.loggers else None
    bar = tqdm(total=total, disable=not progress, dynamic_ncols=True, unit="step")
    try:
        for epoch in range(1, cfg.epochs + 1):
            loss_sum, count = 0.0, 0
            for idx in index_batches(len(train_set), cfg.batch_size, rng):
                lr = cosine_lr(step, total, cfg.lr, cfg.min_lr, warmup)
                frozen = step < cfg.freeze_encoder_steps
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                for p in encoder_params:
                    p.requires_grad_(not frozen)
                x, pad = batcher.inputs(train_set, idx, True, rng)
                x = x.to(device)
                pad = None if pad is None else pad.to(device)
                loss = _train_loss(model, cfg, train_set, idx, x, pad, vocab, n_out, rng, device)
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                if cfg.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                step += 1
                loss_v = float(loss.detach())
                loss_sum, count = loss_sum + loss_v * len(idx), count + len(idx)
                if step % cfg.log_every == 0:
                    step_row = {"step": step, "epoch": epoch, "loss": loss_v, "lr": lr}
                    append_line(metrics_path, json.dumps(step_row), "metrics")
                    if events is not None:
                        events.scalars(step_row, step, NOT_CURVES)
                bar.set_postfix(loss=f"{loss_v:.4f}")
                bar.update(1)
            for p in encoder_params:
                p.requires_grad_(True)
            ev = evaluate(model, eval_set, cfg, rcfg, vocab)
            row: dict[str, float] = {
                "epoch": epoch,
                "step": step,
                "train_loss": loss_sum / max(count, 1),
                **{f"eval_{k}": v for k, v in ev.metrics.items()},
                "seconds": time.perf_counter() - t_start,
            }
            history.append(row)
            append_line(metrics_path, json.dumps(row), "metrics")
            if events is not None:
                events.scalars(row, step, NOT_CURVES)
                events.flush()
            value = ev.metrics[metric]
            improved = _better(cfg.task, value, best)
            if improved:
                best, best_epoch = value, epoch
                save_finetuned(
                    out / "best", model, rcfg, {**meta_base, "epoch": epoch, "step": step, "eval": ev.metrics}
                )
            log(
                f"epoch {epoch}: train loss {row['train_loss']:.4f} | "
                + " ".join(f"{k} {v:.4f}" for k, v in ev.metrics.items())
                + (" (best so far, saved)" if improved else "")
            )
    finally:
        bar.close()
        if events is not None:
            events.close()
        plot_finetune(metrics_path, out / "metrics.png", metric)
    seconds = time.perf_counter() - t_start
    summary = {"metric": metric, "best": best, "best_epoch": best_epoch, "seconds": seconds, "history": history}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n", "the fine-tuning summary")
    assert best is not None
    return FinetuneResult(out, model, best, best_epoch, metric, history, seconds)


def _train_loss(
    model: FinetuneModel,
    cfg: FinetuneConfig,
    data: LabelledSet,
    idx: list[int],
    x: Tensor,
    pad: Tensor | None,
    vocab: Sequence[str],
    n_out: int,
    rng: random.Random,
    device: torch.device,
) -> Tensor:
    if cfg.task == "image_cls":
        y = torch.tensor([int(data.targets[i]) for i in idx], device=device)
        soft = smooth_one_hot(y, n_out, cfg.label_smoothing)
        x, soft, _ = mix_batch(x, soft, cfg, rng)
        with _autocast(device, cfg.precision):
            logits, _ = model(x)
        return torch.sum(-soft * logits.float().log_softmax(-1), dim=-1).mean()
    with _autocast(device, cfg.precision):
        out, frame_pad = model(x, pad)
    out = out.float()
    if cfg.task == "audio_ctc":
        targets = [torch.tensor(encode_letters(str(data.targets[i]), vocab), dtype=torch.long) for i in idx]
        T = out.shape[1]
        in_lens = torch.full((len(idx),), T, dtype=torch.long) if frame_pad is None else (~frame_pad).sum(1).cpu()
        tgt_lens = torch.tensor([len(t) for t in targets], dtype=torch.long)
        flat = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
        return F.ctc_loss(
            out.transpose(0, 1), flat.to(device), in_lens, tgt_lens, blank=0, reduction="mean", zero_infinity=True
        )
    if cfg.task == "text_reg":
        y_reg = torch.tensor([float(data.targets[i]) for i in idx], device=device)
        return F.mse_loss(out, y_reg)
    y = torch.tensor([int(data.targets[i]) for i in idx], device=device)
    return F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)


def plot_finetune(metrics_path: Path, out: Path, metric: str) -> None:
    """Training loss per logged step and the eval metric per epoch, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    steps = [r for r in rows if "loss" in r]
    epochs = [r for r in rows if f"eval_{metric}" in r]
    if not rows:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax2.plot([r["epoch"] for r in epochs], [r[f"eval_{metric}"] for r in epochs], marker="o")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(f"eval {metric}")
    fig.tight_layout()
    try:
        save_figure(fig, out, "the fine-tuning curve")
    finally:
        plt.close(fig)
