"""Teacher targets and the regression losses (docs/design.md, 'Targets' and 'Loss').

Targets are built in fp32 whatever precision the teacher ran in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from data2vec.config import NormKind

EPS = 1e-5


def instance_norm(x: Tensor, padding_mask: Tensor | None = None, eps: float = EPS) -> Tensor:
    """Normalise each channel of each sample over time: x (B, T, D).

    Padded positions (padding_mask True) are left out of the statistics, so a padded
    batch gives each sample the same targets it would get alone.
    """
    if padding_mask is None:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=False)
    else:
        keep = (~padding_mask).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        n = keep.sum(dim=1, keepdim=True).clamp_min(1.0)
        mean = (x * keep).sum(dim=1, keepdim=True) / n
        var = (((x - mean) * keep) ** 2).sum(dim=1, keepdim=True) / n
    out = (x - mean) / torch.sqrt(var + eps)
    if padding_mask is not None:
        out = out.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    return out


def normalize(x: Tensor, kind: NormKind, padding_mask: Tensor | None = None) -> Tensor:
    if kind == "instance":
        return instance_norm(x, padding_mask)
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:], eps=EPS)
    return x


def build_targets(
    layers: Sequence[Tensor],
    top_k: int,
    layer_norm: NormKind,
    final_norm: NormKind,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """Average of the top-K layer outputs, each normalised first (docs/design.md, 'Targets').

    Normalising each layer before the average stops the layers with the largest
    activations from dominating the target.

    Args:
        layers: per-block features, each (B, T, D), lowest block first; prefix tokens removed.
        top_k: K, how many of the last layers to average.
    Returns:
        (B, T, D) float32 targets.
    """
    if not 1 <= top_k <= len(layers):
        raise ValueError(f"top_k={top_k} but {len(layers)} layers were given")
    acc: Tensor | None = None
    for layer in layers[-top_k:]:
        y = normalize(layer.float(), layer_norm, padding_mask)
        acc = y if acc is None else acc + y
    assert acc is not None
    return normalize(acc / top_k, final_norm, padding_mask)


def loss_scale(kind: str, dim: int) -> float:
    return {"rsqrt_dim": 1.0 / math.sqrt(dim), "inv_dim": 1.0 / dim, "one": 1.0}[kind]


def regression_loss(pred: Tensor, target: Tensor, beta: float, scale: float) -> Tensor:
    """Per-token loss: (N, D) x (N, D) -> (N,), summed over D and multiplied by `scale`.

    beta = 0 gives the squared error (no 1/2); beta > 0 gives Smooth-L1 with that beta.
    Average the result over masked tokens to get data2vec's objective.
    """
    pred, target = pred.float(), target.float()
    elem = (pred - target) ** 2 if beta == 0 else F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    return elem.sum(dim=-1) * scale


def feature_std(x: Tensor) -> Tensor:
    """Collapse monitor: per-dimension std across tokens (N, D), averaged over D."""
    x = x.detach().float()
    if x.shape[0] < 2:
        return x.new_zeros(())
    return x.std(dim=0).mean()


def relative_std(x: Tensor) -> Tensor:
    """`feature_std` of (..., D) features over their root mean square: about 1 when tokens differ
    as much as random features do, near 0 when every token is the same vector (a collapsed local
    encoder: the CNN of speech models can learn to emit one frame everywhere)."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    rms = x.pow(2).mean().sqrt()
    return feature_std(x) / rms.clamp_min(1e-12)
