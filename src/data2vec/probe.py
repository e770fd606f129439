"""Frozen-feature evaluation: pooled encoder features and a logistic-regression probe."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from data2vec.config import RunConfig
from data2vec.model import Data2Vec


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
