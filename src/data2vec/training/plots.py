"""loss.png: the loss and the collapse monitor against step, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


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
