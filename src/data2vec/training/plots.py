"""loss.png: the loss and the collapse monitor against step, from metrics.jsonl (and reading it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data2vec.writes import save_figure


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
