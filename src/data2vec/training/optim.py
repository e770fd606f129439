"""The optimizer: AdamW with weight-decay groups, each group carrying its own learning-rate scale."""

from __future__ import annotations

import torch
from torch import nn

from data2vec.config import OptimConfig
from data2vec.model import no_weight_decay


def fused_ok(params: list[nn.Parameter]) -> bool:
    """PyTorch's fused AdamW takes these: plain (not sharded) floating tensors on a CPU or CUDA.
    On the CPU its step is 3.75x faster than the per-parameter loop AdamW picks by default for
    CPU tensors, and it updates the same weights (benchmarks/levers.py, `adamw`)."""
    return all(
        type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (fused where `fused_ok`); no weight decay on 1-D parameters, biases, tokens and
    position tables. Each group carries an `lr_scale` (the local encoder's is
    `cfg.local_lr_scale`; at 0 it is left out)."""
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
        fused=fused_ok([p for params in groups.values() for p in params]) or None,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """This step's learning rate, times each group's `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
