"""Pictures of a run: loss.png (the loss and the collapse monitor against step, from metrics.jsonl,
and reading it), and what the student of an image model sees under its masks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data2vec.model import Data2Vec
from data2vec.writes import save_figure

MASKED_GREY = 128
"""The value masked patches are painted with in `masked_grid`."""


def masked_grid(
    model: Data2Vec, images: torch.Tensor, mean: Sequence[float], std: Sequence[float], seed: int = 0
) -> np.ndarray:
    """What the student of an image model sees: the (n, C, H, W) normalised `images` on the top row,
    below them each under each of the M masks the model's masking config draws (seeded by `seed`,
    the global RNG untouched), masked patches grey. uint8, (rows, cols) for one channel, (rows, cols, C)
    for more."""
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    masks = model.draw_masks(n, g)  # (n*M, T)
    M = masks.shape[0] // n
    gh, gw = model.frontend.grid
    H, W = images.shape[-2:]
    ph, pw = H // gh, W // gw
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    pix = ((images.detach().cpu().float() * s + m).clamp(0, 1) * 255).to(torch.uint8)
    pix_np = pix.permute(0, 2, 3, 1).numpy()  # (n, H, W, C)
    rows = [np.concatenate(list(pix_np), axis=1)]
    for k in range(M):
        row = []
        for i in range(n):
            mk = masks[i * M + k].view(gh, gw).cpu().numpy()
            up = np.kron(mk, np.ones((ph, pw), dtype=bool))
            im = pix_np[i].copy()
            im[up] = MASKED_GREY
            row.append(im)
        rows.append(np.concatenate(row, axis=1))
    grid = np.concatenate(rows, axis=0)
    return grid[..., 0] if grid.shape[-1] == 1 else grid


def read_metrics(metrics_path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows of metrics.jsonl, and the numbers of the lines that are not a JSON object (a torn
    last line from a process killed mid-write); those are left out."""
    rows: list[dict[str, Any]] = []
    torn: list[int] = []
    for i, line in enumerate(metrics_path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            torn.append(i)
    return rows, torn


def plot_loss_curve(metrics_path: Path, out: Path) -> None:
    """loss and target/prediction std against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return
    rows = [r for r in read_metrics(metrics_path)[0] if "loss" in r and "target_std" in r and "pred_std" in r]
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
    try:
        save_figure(fig, out, "the loss curve")
    finally:
        plt.close(fig)
