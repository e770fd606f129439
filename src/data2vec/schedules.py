"""Schedules as pure functions of the optimizer step, so resuming needs only `step`."""

from __future__ import annotations

import math


def cosine_lr(step: int, total: int, peak: float, final: float = 0.0, warmup: int = 0) -> float:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to `final` at `total`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if step >= total:
        return final
    progress = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def ema_decay(step: int, start: float, end: float, anneal_steps: int) -> float:
    """Teacher EMA decay: linear from `start` to `end` over `anneal_steps` updates, then held at `end`.

    Matches fairseq's `get_annealed_rate`: decay(t) = end - (end - start) * (1 - t / T).
    """
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return end - (end - start) * (1.0 - step / anneal_steps)
