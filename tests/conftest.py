"""Shared tiny configurations, model builders and reference helpers for the test-suite.

Everything here is deliberately small (32x32 images, 8-pixel patches -> a 4x4 grid of
16 tokens, width 32, depth 3) so the whole suite runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from data2vec.config import RunConfig, from_dict, to_dict
from data2vec.model import Data2Vec

IMAGE_SIZE = 32
PATCH = 8
GRID = (IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH)
NUM_TOKENS = GRID[0] * GRID[1]
DIM = 32
DEPTH = 3
HEADS = 4


def _base_dict(version: int) -> dict[str, Any]:
    encoder: dict[str, Any] = {
        "dim": DIM,
        "depth": DEPTH,
        "prenet_depth": 0,
        "num_heads": HEADS,
        "mlp_ratio": 2.0,
        "dropout": 0.0,
        "attn_dropout": 0.0,
        "activation_dropout": 0.0,
        "drop_path": 0.0,
        "layerdrop": 0.0,
    }
    image: dict[str, Any] = {"image_size": [IMAGE_SIZE, IMAGE_SIZE], "patch_size": PATCH, "channels": 3}
    decoder = {"dim": 32, "layers": 2, "groups": 4, "kernel_size": 3, "input_dropout": 0.0}
    if version == 1:
        encoder.update(
            norm_order="pre",
            layer_scale_init=0.1,
            qkv_bias="qv",
            position_bias="shared",
            final_norm=True,
            input_norm=False,
        )
        image.update(positions="none", cls_token=True)
        masking = {"kind": "beit_block", "mask_prob": 0.5, "min_block_patches": 2, "num_masks": 1}
        targets = {"top_k": 2, "layer_source": "block", "layer_norm": "layer", "final_norm": "layer"}
        loss = {"beta": 2.0, "scale": "inv_dim", "cls_weight": 0.0}
    elif version == 2:
        encoder.update(
            norm_order="post",
            layer_scale_init=0.0,
            qkv_bias="all",
            position_bias="none",
            final_norm=False,
            input_norm=True,
        )
        image.update(positions="sincos", cls_token=True)
        masking = {
            "kind": "inverse_block",
            "mask_prob": 0.75,
            "mask_length": 2,
            "mask_prob_adjust": 0.05,
            "num_masks": 2,
        }
        targets = {"top_k": 2, "layer_source": "ffn", "layer_norm": "instance", "final_norm": "layer"}
        loss = {"beta": 0.0, "scale": "rsqrt_dim", "cls_weight": 0.5}
    else:
        raise ValueError(version)
    return {
        "model": {
            "modality": "image",
            "version": version,
            "encoder": encoder,
            "image": image,
            "decoder": decoder,
            "head_layers": 1,
        },
        "masking": masking,
        "teacher": {"ema_scope": "local", "decay": 0.999, "end_decay": 0.9999, "anneal_steps": 100},
        "targets": targets,
        "loss": loss,
        "data": {"batch_size": 2, "num_workers": 0},
        "train": {"steps": 10, "precision": "fp32", "device": "cpu"},
    }


def make_tiny_config(version: int, **overrides: Any) -> RunConfig:
    """Tiny image RunConfig for data2vec `version` (1 or 2).

    Overrides use `__` for the dotted path, e.g. ``masking__num_masks=1`` sets
    ``masking.num_masks``; values are plain Python objects (lists/tuples for tuples).
    """
    data = _base_dict(version)
    for key, value in overrides.items():
        path = key.split("__")
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = to_dict(value) if isinstance(value, tuple) else value
    cfg: RunConfig = from_dict(RunConfig, data)
    return cfg


def make_model(cfg: RunConfig, seed: int = 0) -> Data2Vec:
    torch.manual_seed(seed)
    return Data2Vec.from_config(cfg)


def make_images(batch: int = 2, seed: int = 0, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)


# ------------------------------------------------------------------ reference maths (numpy, loops)


def ref_instance_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Per sample and per channel, over time; population variance; no affine."""
    x = x.astype(np.float64)
    B, T, D = x.shape
    out = np.empty_like(x)
    for b in range(B):
        for d in range(D):
            col = x[b, :, d]
            mean = col.sum() / T
            var = ((col - mean) ** 2).sum() / T
            out[b, :, d] = (col - mean) / np.sqrt(var + eps)
    return out


def ref_layer_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Per token over channels; population variance; no affine."""
    x = x.astype(np.float64)
    B, T, D = x.shape
    out = np.empty_like(x)
    for b in range(B):
        for t in range(T):
            row = x[b, t]
            mean = row.sum() / D
            var = ((row - mean) ** 2).sum() / D
            out[b, t] = (row - mean) / np.sqrt(var + eps)
    return out


def ref_norm(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "instance":
        return ref_instance_norm(x)
    if kind == "layer":
        return ref_layer_norm(x)
    assert kind == "none"
    return x.astype(np.float64)


def ref_targets(layers: list[np.ndarray], top_k: int, layer_norm: str, final_norm: str) -> np.ndarray:
    chosen = layers[len(layers) - top_k :]
    acc = np.zeros_like(chosen[0], dtype=np.float64)
    for layer in chosen:
        acc = acc + ref_norm(layer, layer_norm)
    return ref_norm(acc / top_k, final_norm)


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def tiny_config() -> Callable[..., RunConfig]:
    return make_tiny_config


@pytest.fixture
def build_model() -> Callable[..., Data2Vec]:
    return make_model


@pytest.fixture(name="ref_targets")
def ref_targets_fixture() -> Callable[..., np.ndarray]:
    """Reference (numpy, explicit loops) top-K target construction."""
    return ref_targets


@pytest.fixture
def images() -> Callable[..., torch.Tensor]:
    return make_images


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets one core's worth of threads (itself and the processes it
    starts): two workers of two threads each on a 2-core machine would stall one another."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
