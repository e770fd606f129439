"""Frozen-feature evaluation: pooled encoder features and a logistic-regression probe."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from data2vec.config import RunConfig
from data2vec.data.eval_inputs import labelled_items
from data2vec.data.labelled import read_labelled
from data2vec.distributed import is_main_process
from data2vec.extract import extract_items
from data2vec.model import Data2Vec
from data2vec.writes import save_figure


def initial_model(cfg: RunConfig) -> Data2Vec:
    """The exact weights a training run with `cfg` starts from (the random-init baseline)."""
    torch.manual_seed(cfg.train.seed)
    return Data2Vec.from_config(cfg)


@torch.no_grad()
def pooled_features(
    model: Data2Vec, inputs: Tensor, batch_size: int = 256, layers: int = 1, precision: str = "fp32"
) -> np.ndarray:
    """Mean over tokens (prefix excluded) of the average of the last `layers` block outputs: (N, D)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats = []
    for i in range(0, len(inputs), batch_size):
        x = inputs[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model.encode(x, keep_layers=layers)
        P = model.frontend.num_prefix
        h = torch.stack([o.x[:, P:].float() for o in out.layers]).mean(0)
        feats.append(h.mean(dim=1).cpu())
    model.train(was_training)
    return torch.cat(feats).numpy()


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, c: float = 1.0
) -> float:
    """Accuracy of a standardised multinomial logistic regression."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def probe_accuracies(
    features: Mapping[str, np.ndarray], labels: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray
) -> dict[str, float]:
    """One linear probe per named feature set, all on the same split: {name: test accuracy}."""
    return {
        name: linear_probe(f[train_idx], labels[train_idx], f[test_idx], labels[test_idx])
        for name, f in features.items()
    }


# ============================================================================ kNN, per-layer probes, online probe


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Accuracy of a k-nearest-neighbour vote on cosine similarity, each neighbour weighted by
    exp(similarity / temperature) (the DINO/InstDisc weighted kNN)."""
    tr = torch.nn.functional.normalize(torch.from_numpy(np.asarray(train_x, np.float32)), dim=1)
    te = torch.nn.functional.normalize(torch.from_numpy(np.asarray(test_x, np.float32)), dim=1)
    classes, y = np.unique(np.asarray(train_y), return_inverse=True)
    labels = torch.from_numpy(y.astype(np.int64))
    k = min(k, len(tr))
    correct = 0
    for i in range(0, len(te), 1024):
        sim = te[i : i + 1024] @ tr.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), len(classes))
        votes.scatter_add_(1, labels[idx], (top / temperature).exp())
        pred = classes[votes.argmax(1).numpy()]
        correct += int((pred == np.asarray(test_y)[i : i + 1024]).sum())
    return correct / max(len(te), 1)


def layer_probes(
    train_feats: Mapping[int, np.ndarray],
    train_y: np.ndarray,
    test_feats: Mapping[int, np.ndarray],
    test_y: np.ndarray,
    average: bool = False,
    knn_k: int = 20,
    linear: bool = True,
) -> dict[str, float]:
    """Linear-probe and kNN accuracy per layer ({layer: (N, D)} features, as `extract` returns
    them), plus, with `average`, on the mean of the layers' features:
    {"linear_layer4": ..., "knn_layer4": ..., "linear_avg": ..., "knn_avg": ...}."""
    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {
        f"layer{n}": (np.asarray(train_feats[n]), np.asarray(test_feats[n])) for n in train_feats
    }
    if average and len(train_feats) > 1:
        sets["avg"] = (
            np.mean([np.asarray(v) for v in train_feats.values()], axis=0),
            np.mean([np.asarray(v) for v in test_feats.values()], axis=0),
        )
    out: dict[str, float] = {}
    for name, (tr, te) in sets.items():
        if linear:
            out[f"linear_{name}"] = linear_probe(tr, train_y, te, test_y)
        out[f"knn_{name}"] = knn_accuracy(tr, train_y, te, test_y, k=knn_k)
    return out


class OnlineProbe:
    """Probes of the student during pretraining (`RunConfig.probe`): the labelled sets are read
    once, when it is made; every `probe.every` steps their features are extracted (eval mode, no
    masking) and linear-probe and kNN accuracies are returned as `probe_*` metrics (`__call__`),
    which `update` also plots to RUN_DIR/probe.png. The training engine's probe hook makes one
    per run (per modality in a joint run) and drops it when the run ends: no process-wide cache."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        pc = cfg.probe
        train = read_labelled(pc.train_data, cfg, label_column=pc.label_column, column=pc.column)
        test = read_labelled(
            pc.eval_data, cfg, classes=train.classes or None, label_column=pc.label_column, column=pc.column
        )
        self.train_items = labelled_items(cfg, train, pc.max_samples, preload=True)
        self.test_items = labelled_items(cfg, test, pc.max_samples, preload=True)
        self.train_y = np.asarray(train.targets[: pc.max_samples])
        self.test_y = np.asarray(test.targets[: pc.max_samples])

    def __call__(self, model: Data2Vec, step: int) -> dict[str, float]:
        """The probe metrics at `step` ({} when this is not a probe step)."""
        pc = self.cfg.probe
        if pc.every <= 0 or step % pc.every != 0:
            return {}
        layers = list(pc.layers) or None
        tr = extract_items(model, self.train_items, layers, batch_size=64)
        te = extract_items(model, self.test_items, layers, batch_size=64)
        result = layer_probes(tr, self.train_y, te, self.test_y, average=pc.average_layers, knn_k=pc.knn_k)
        return {f"probe_{k}": v for k, v in result.items()}

    def update(self, model: Data2Vec, step: int, member: str = "") -> dict[str, float]:
        """`self(model, step)`, and probe.png redrawn from metrics.jsonl by the main process only
        (under torchrun every rank computes the metrics: the model may be sharded). `member`: a
        joint run's modality, whose keys get the suffix `_<member>` and whose plot is
        probe_<member>.png."""
        metrics = self(model, step)
        suffix = f"_{member}" if member else ""
        metrics = {k + suffix: v for k, v in metrics.items()}
        if metrics and is_main_process():
            run = self.run_dir
            out = run / f"probe{suffix}.png"
            plot_probes(run / "metrics.jsonl", out, {"step": step, **metrics}, suffix=suffix)
        return metrics


def plot_probes(metrics_path: Path, out: Path, latest: Mapping[str, float] | None = None, suffix: str = "") -> None:
    """probe_* accuracies against step, from metrics.jsonl (plus `latest`, not yet written there);
    with `suffix`, only the probe_*<suffix> ones (one member of a joint run)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    if metrics_path.exists():
        rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]

    def probed(k: str) -> bool:
        return k.startswith("probe_") and k.endswith(suffix)

    rows = [r for r in rows if any(probed(k) for k in r)]
    if latest is not None:
        rows.append(dict(latest))
    if not rows:
        return
    names = sorted({k for r in rows for k in r if probed(k)})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in names:
        pts = [(r["step"], r[name]) for r in rows if name in r]
        label = name.removeprefix("probe_").removesuffix(suffix) if suffix else name.removeprefix("probe_")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("probe accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        save_figure(fig, out, "the probe curve")
    finally:
        plt.close(fig)
