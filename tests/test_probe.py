"""Probes: kNN and per-layer linear probes on frozen features, and the online probe in pretraining."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data2vec.config import ConfigError, RunConfig, apply_overrides
from data2vec.probe import OnlineProbe, knn_accuracy, layer_probes, plot_probes
from data2vec.training import train
from test_finetune import image_config, write_images


def test_knn_on_hand_made_points() -> None:
    train_x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    train_y = np.array([0, 0, 1, 1, 1])
    test_x = np.array([[1.0, 0.05], [0.05, 1.0]])
    assert knn_accuracy(train_x, train_y, test_x, np.array([0, 1]), k=1) == 1.0
    assert knn_accuracy(train_x, train_y, test_x, np.array([1, 0]), k=1) == 0.0
    # k = all points: the similarity weighting (temperature 0.07) still favours the near class.
    assert knn_accuracy(train_x, train_y, test_x, np.array([0, 1]), k=5) == 1.0
    # String labels work too; k larger than the training set is clipped.
    assert knn_accuracy(train_x, np.array(list("aabbb")), test_x, np.array(["a", "b"]), k=50) == 1.0


def test_layer_probes_per_layer_and_averaged() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    informative = rng.normal(0, 1, (40, 8)) + y[:, None] * 4.0
    noise = rng.normal(0, 1, (40, 8))
    tr = {1: noise[::2], 2: informative[::2]}
    te = {1: noise[1::2], 2: informative[1::2]}
    out = layer_probes(tr, y[::2], te, y[1::2], average=True, knn_k=3)
    assert set(out) == {f"{m}_{n}" for m in ("linear", "knn") for n in ("layer1", "layer2", "avg")}
    assert out["linear_layer2"] == 1.0 and out["knn_layer2"] == 1.0
    assert out["knn_layer1"] < 0.9


def test_probe_config_is_validated() -> None:
    cfg = image_config()
    with pytest.raises(ConfigError, match="probe.train_data"):
        apply_overrides(cfg, ["probe.every=2"])
    with pytest.raises(ConfigError, match="probe.every"):
        apply_overrides(cfg, ["probe.every=3", "train.log_every=2", "probe.train_data=a", "probe.eval_data=b"])
    with pytest.raises(ConfigError, match="probe.knn_k"):
        apply_overrides(cfg, ["probe.knn_k=0"])
    # Old config.json files without a probe section still load.
    data = cfg.to_dict()
    del data["probe"]
    assert type(cfg).from_dict(data).probe.every == 0


def test_online_probe_during_pretraining(tmp_path: Path) -> None:
    write_images(tmp_path / "train", n=6)
    write_images(tmp_path / "eval", n=3)
    cfg = apply_overrides(
        image_config(),
        [
            "train.steps=4",
            "train.log_every=1",
            "probe.every=2",
            f"probe.train_data={tmp_path / 'train'}",
            f"probe.eval_data={tmp_path / 'eval'}",
            "probe.layers=[1,2]",
            "probe.average_layers=true",
            "probe.knn_k=3",
        ],
    )
    train(cfg, tmp_path / "run", progress=False, quiet=True)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    probed = [r for r in rows if "probe_knn_layer2" in r]
    assert [r["step"] for r in probed] == [2, 4]
    for r in probed:
        for name in ("linear_layer1", "linear_layer2", "knn_layer1", "linear_avg", "knn_avg"):
            assert 0.0 <= r[f"probe_{name}"] <= 1.0
        assert "loss" in r  # the same line as the step's training metrics
    assert (tmp_path / "run" / "probe.png").stat().st_size > 0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_plot_probes_without_probe_rows(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    plot_probes(tmp_path / "metrics.jsonl", tmp_path / "probe.png")
    assert not (tmp_path / "probe.png").exists()


class _FakeProbe(OnlineProbe):
    """An OnlineProbe that reads no labelled data and returns fixed metrics."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.data = bytearray(1024)

    def __call__(self, model: Any, step: int) -> dict[str, float]:
        return {"probe_knn_layer1": 0.5}


def _probe_config() -> RunConfig:
    return apply_overrides(
        image_config(), ["train.log_every=1", "probe.every=1", "probe.train_data=a", "probe.eval_data=b"]
    )


def test_probe_hook_reads_the_sets_once_and_drops_them_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc
    import weakref

    import data2vec.training.hooks as hooks

    made: list[weakref.ref[_FakeProbe]] = []
    real_init = _FakeProbe.__init__

    def tracking_init(self: _FakeProbe, cfg: RunConfig, run_dir: Path) -> None:
        real_init(self, cfg, run_dir)
        made.append(weakref.ref(self))

    monkeypatch.setattr(_FakeProbe, "__init__", tracking_init)
    monkeypatch.setattr(hooks, "OnlineProbe", _FakeProbe)
    cfg = _probe_config()
    ctx = hooks.RunContext(tmp_path, cfg.train, hooks.RunState(), lambda _: None)
    hook = hooks.ProbeHook(ctx, {"": (cfg, None)})  # type: ignore[dict-item]
    for step in (1, 2):
        info = hooks.StepInfo(step, {"step": step}, {}, 1)
        hook.after_step(info)
        assert info.record["probe_knn_layer1"] == 0.5
    assert len(made) == 1  # the labelled sets are read once per run
    hook.on_end(2)
    gc.collect()
    assert made[0]() is None  # the run's probe (and its data) is gone with the run


def test_online_probe_plots_on_the_main_process_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _probe_config()
    probe = _FakeProbe(cfg, tmp_path)
    monkeypatch.setenv("RANK", "1")  # a torchrun worker other than rank 0 (no process group here)
    assert probe.update(None, 1) == {"probe_knn_layer1": 0.5}  # type: ignore[arg-type]
    assert not (tmp_path / "probe.png").exists()
    monkeypatch.setenv("RANK", "0")
    probe.update(None, 2)  # type: ignore[arg-type]
    assert (tmp_path / "probe.png").stat().st_size > 0
    # a joint run's member: suffixed keys, its own plot
    assert probe.update(None, 3, "text") == {"probe_knn_layer1_text": 0.5}  # type: ignore[arg-type]
    assert (tmp_path / "probe_text.png").stat().st_size > 0
