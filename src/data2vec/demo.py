"""`data2vec demo`: pretrain a tiny image model on scikit-learn's digits, then probe it.

Everything comes from the installed dependencies: no download. The 1,797 8x8 digits are
upsampled to 32x32; the model pretrains on the 1,000 training images (labels unused),
then a logistic-regression probe on frozen mean-pooled features is trained on those
1,000 and scored on the other 797, for the pretrained encoder, the same encoder at its
random initialisation, and raw pixels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data2vec.config import RunConfig, apply_overrides
from data2vec.data.images import digits_array, digits_split, to_tensor
from data2vec.model import Data2Vec
from data2vec.presets import digits_tiny
from data2vec.probe import initial_model, pooled_features, probe_accuracies
from data2vec.training import train
from data2vec.training.plots import masked_grid


@dataclass
class DemoResult:
    """What every modality's demo reports: three probe accuracies side by side."""

    modality: str
    pretrained: float
    random_init: float
    baseline: float
    baseline_name: str
    probe_task: str
    steps: int
    out_dir: Path
    seconds: float = 0.0

    def report(self, version: int) -> str:
        return "\n".join(
            [
                f"{self.modality}: linear probe on {self.probe_task}, after {self.steps} pretraining steps "
                f"({self.seconds / 60:.1f} min):",
                f"  data2vec {version}.0 pretrained encoder : {self.pretrained:.3f}",
                f"  same encoder, random init      : {self.random_init:.3f}",
                f"  {self.baseline_name:<31}: {self.baseline:.3f}",
                f"  outputs in {self.out_dir}",
            ]
        )


def demo_config(version: int = 2, steps: int = 600, overrides: list[str] | None = None) -> RunConfig:
    cfg = digits_tiny(version)
    cfg = replace(
        cfg,
        data=replace(cfg.data, path="builtin:digits:train", num_workers=1),
        train=replace(cfg.train, steps=steps, ckpt_every=max(1, steps // 2), log_every=1),
        optim=replace(cfg.optim, warmup_steps=min(cfg.optim.warmup_steps, steps // 10)),
        preset=cfg.preset or f"digits-tiny@v{version}",
    )
    return apply_overrides(cfg, overrides or [])


def _digits_tensors(cfg: RunConfig) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    images, labels = digits_array(cfg.model.image.image_size[0])
    x = torch.stack([to_tensor(Image.fromarray(im), cfg.data.mean, cfg.data.std) for im in images])
    return x, labels, digits_split("train"), digits_split("test")


def masked_picture(model: Data2Vec, images: torch.Tensor, cfg: RunConfig, out: Path, seed: int = 0) -> None:
    """Originals on the top row; below, what the student sees under each of its masks (grey = masked)."""
    grid = masked_grid(model, images, cfg.data.mean, cfg.data.std, seed)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.Resampling.NEAREST).save(out)


def run_demo(
    out_dir: str | Path = "data2vec-demo",
    version: int = 2,
    steps: int | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    quiet: bool = False,
) -> DemoResult:
    t0 = time.perf_counter()
    out = Path(out_dir)
    cfg = demo_config(version, steps or 600, overrides)
    x, labels, tr, te = _digits_tensors(cfg)

    random_model = initial_model(cfg)
    result = train(cfg, out, progress=progress, quiet=quiet)
    model = result.model.cpu()

    layers = cfg.targets.top_k
    features = {
        "pretrained": pooled_features(model, x, layers=layers),
        "random_init": pooled_features(random_model, x, layers=layers),
        "pixels": x.flatten(1).numpy(),
    }
    acc = probe_accuracies(features, labels, tr, te)
    masked_picture(model, x[te[:8]], cfg, out / "masked_inputs.png")
    (out / "probe.json").write_text(
        "{\n" + ",\n".join(f'  "{k}": {v:.4f}' for k, v in acc.items()) + f',\n  "steps": {result.step}\n}}\n'
    )
    return DemoResult(
        "image",
        acc["pretrained"],
        acc["random_init"],
        acc["pixels"],
        "raw pixels",
        "digits (train 1000 / test 797)",
        result.step,
        out,
        time.perf_counter() - t0,
    )


# modality -> "module:function"; each function takes (out_dir, version, steps, overrides, progress)
# and returns a DemoResult. Imported lazily so one modality's extras are not needed by another.
DEMOS: dict[str, str] = {
    "image": "data2vec.demo:run_demo",
    "audio": "data2vec.demo_audio:run_demo",
    "text": "data2vec.demo_text:run_demo",
    "joint": "data2vec.demo_joint:run_demo",  # one model for all three (data2vec.joint)
}
