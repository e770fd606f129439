"""train.loggers=[tensorboard]: the event files, read back with TensorBoard's own reader (which
honours the purges), hold every metrics.jsonl number at each logged step exactly once, after a
stop and resume, a crash past the last checkpoint and a rewind; the masked-inputs picture at each
checkpoint; joint runs and fine-tuning too; rank 0 alone writes."""

from __future__ import annotations

import io
import json
import shutil
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator
from tests.test_finetune import image_config, write_images
from tests.test_joint import tiny_joint

from data2vec.checkpoint import list_checkpoints
from data2vec.config import ConfigError, RunConfig, apply_overrides, parse_override
from data2vec.distributed import Dist
from data2vec.finetune import FinetuneConfig, finetune
from data2vec.model import Data2Vec
from data2vec.presets import preset
from data2vec.tiny import IMAGE_SHAPE
from data2vec.training import TrainingStopped, resume, train, train_joint
from data2vec.training.hooks import RunContext, StepInfo
from data2vec.training.plots import masked_grid
from data2vec.training.state import RunState
from data2vec.training.tensorboard import TENSORBOARD_DIR, TensorBoardLog, picture_images

TINY = [
    "data.path=builtin:digits:train",
    *IMAGE_SHAPE,
    "data.batch_size=8",
    "data.num_workers=0",
    "train.log_every=1",
    "train.precision=fp32",
    "optim.warmup_steps=2",
]


def tiny(*extra: str, loggers: str = "train.loggers=[tensorboard]") -> RunConfig:
    return apply_overrides(preset("digits-tiny", 2), [*TINY, loggers, *extra])


def events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, IMAGES: 0})
    acc.Reload()
    return acc


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def assert_events_match(acc: EventAccumulator, rows: list[dict[str, Any]], skip: Collection[str] = ("step",)) -> None:
    """One scalar tag per number in the rows (no other tags), each with the steps of the rows that
    have it, each step once, and the rows' values."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool):
                expected.setdefault(k, []).append((r["step"], float(v)))
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag


def picture(acc: EventAccumulator, tag: str) -> dict[int, np.ndarray]:
    """The tag's grey pictures by step (TensorBoard stores them as RGB)."""
    out = {}
    for e in acc.Images(tag):
        rgb = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))
        assert rgb.ndim == 3 and (rgb == rgb[..., :1]).all()
        out[e.step] = rgb[..., 0]
    return out


# ----------------------------------------------------------------------------- configuration


def test_loggers_setting_is_parsed_and_checked() -> None:
    assert parse_override("train.loggers=[tensorboard]") == (["train", "loggers"], ["tensorboard"])
    assert parse_override("train.loggers=[]") == (["train", "loggers"], [])
    assert parse_override('a.b=[x, 1, "y"]') == (["a", "b"], ["x", 1, "y"])  # items as JSON or plain text
    assert parse_override("data.path=[x") == (["data", "path"], "[x")
    assert tiny().train.loggers == ("tensorboard",)
    assert tiny(loggers="train.loggers=[]").train.loggers == ()
    assert RunConfig().train.loggers == () and FinetuneConfig().loggers == ()
    with pytest.raises(ConfigError) as info:
        tiny(loggers="train.loggers=[wandb]")
    assert str(info.value) == "train.loggers: 'wandb' is not a logger (known: tensorboard)"
    with pytest.raises(ConfigError, match=r"^train\.loggers: names a logger twice$"):
        tiny(loggers="train.loggers=[tensorboard, tensorboard]")
    with pytest.raises(ConfigError, match=r"^train\.loggers: expected a list"):
        tiny(loggers="train.loggers=tensorboard")
    assert apply_overrides(FinetuneConfig(), ["loggers=[tensorboard]"]).loggers == ("tensorboard",)
    with pytest.raises(ConfigError, match=r"^loggers: 'csv' is not a logger"):
        apply_overrides(FinetuneConfig(), ["loggers=[csv]"])


def test_a_missing_tensorboard_package_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an import without the package does
    hint = "tensorboard needs the tensorboard package: pip install 'data2vec[tensorboard]'"
    with pytest.raises(ConfigError) as info:
        train(tiny("train.steps=1"), tmp_path / "run", progress=False, quiet=True)
    assert str(info.value) == f"train.loggers: {hint}"
    assert not (tmp_path / "run").exists()  # refused before anything is written
    ft = FinetuneConfig(loggers=("tensorboard",))
    with pytest.raises(ConfigError, match=r"^loggers: tensorboard needs .*data2vec\[tensorboard\]"):
        finetune(image_config(), ft, tmp_path / "none", tmp_path / "none", tmp_path / "ft")
    train(tiny("train.steps=1", loggers="train.loggers=[]"), tmp_path / "plain", progress=False, quiet=True)


# ----------------------------------------------------------------------------- pretraining


def test_stop_and_resume_write_every_step_once_and_a_picture_per_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny("train.steps=6", "train.ckpt_every=2")
    train(cfg, run, progress=False, quiet=True, stop_after=3)
    resume(run, progress=False, quiet=True)
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    acc = events(run / TENSORBOARD_DIR)
    assert_events_match(acc, rows)
    assert {"loss", "lr", "ema_decay", "samples_per_sec", "target_std"} <= set(acc.Tags()["scalars"])
    assert len(list((run / TENSORBOARD_DIR).iterdir())) == 2  # one event file per invocation
    # the picture at each checkpoint (2, 4, 6, and 3 for --stop-after): originals, then each mask
    pictures = picture(acc, "masked_inputs")
    assert sorted(pictures) == [2, 3, 4, 6]
    images = picture_images(cfg)
    assert images is not None and images.shape == (8, 1, 32, 32)
    model = Data2Vec.from_config(cfg)
    for step, pic in pictures.items():
        assert np.array_equal(pic, masked_grid(model, images, cfg.data.mean, cfg.data.std, seed=step))
    assert pictures[2].shape == (32 * (1 + cfg.masking.num_masks), 32 * 8)
    assert not np.array_equal(pictures[2], pictures[4])  # masks drawn anew at each checkpoint
    # logging changes nothing in the run (no random draws, no other batches)
    plain = train(tiny("train.steps=6", loggers="train.loggers=[]"), tmp_path / "plain", progress=False, quiet=True)
    assert [r["loss"] for r in plain.history] == [r["loss"] for r in rows]
    assert not (tmp_path / "plain" / TENSORBOARD_DIR).exists()


def test_a_resume_after_a_crash_drops_the_events_past_the_last_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny("train.steps=6", "train.ckpt_every=2"), run, progress=False, quiet=True, stop_after=5)
    first = {e.step: e.value for e in events(run / TENSORBOARD_DIR).Scalars("samples_per_sec")}
    assert sorted(first) == [1, 2, 3, 4, 5]
    # as if the process died after writing step 5's events, before its checkpoint
    newest = list_checkpoints(run)[-1]
    assert newest.name == "step_00000005"
    shutil.rmtree(newest)
    resume(run, progress=False, quiet=True)
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    acc = events(run / TENSORBOARD_DIR)
    assert_events_match(acc, rows)  # step 5 once: the resumed run's
    assert rows[4]["samples_per_sec"] != first[5]  # (a timing: the two step-5 rows tell apart)
    assert sorted(picture(acc, "masked_inputs")) == [2, 4, 6]  # the lost checkpoint's picture dropped


def test_a_rewind_drops_the_abandoned_steps(tmp_path: Path) -> None:
    """Collapse at step 4, rewind to checkpoint 2, steps 3 and 4 again at half the learning rate,
    collapse again and stop (no rewinds left): each step once, the replayed values."""
    run = tmp_path / "run"
    cfg = tiny(
        "train.steps=6",
        "train.ckpt_every=2",
        "train.collapse_after=3",
        "train.min_target_std=100",
        "train.on_collapse=rewind",
        "train.max_rewinds=1",
    )
    with pytest.raises(TrainingStopped, match="collapse at step 4"):
        train(cfg, run, progress=False, quiet=True)
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    acc = events(run / TENSORBOARD_DIR)
    assert_events_match(acc, rows)  # the step-4 row of the stopped run too: closed on the way out
    lr = {e.step: e.value for e in acc.Scalars("lr")}
    assert lr[3] == pytest.approx(0.5 * 1e-3, rel=1e-6)  # the replayed step: lr halved by the rewind
    assert sorted(picture(acc, "masked_inputs")) == [2]


def test_joint_runs_log_every_modality_and_the_probes(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", n=3)
    cfg = tiny_joint(tmp_path, ("image", "text"), steps=2, ckpt_every=2, loggers=["tensorboard"])
    probe = ["every=2", "knn_k=3", f"train_data={tmp_path / 'imgs'}", f"eval_data={tmp_path / 'imgs'}"]
    cfg = apply_overrides(cfg, [f"image.probe.{p}" for p in probe])
    train_joint(cfg, tmp_path / "run", progress=False, quiet=True)
    rows = metrics(tmp_path / "run")
    acc = events(tmp_path / "run" / TENSORBOARD_DIR)
    assert_events_match(acc, rows)
    tags = set(acc.Tags()["scalars"])
    assert {"loss_image", "loss_text", "target_std_text", "probe_knn_layer2_image", "probe_linear_layer2_image"} <= tags
    assert [e.step for e in acc.Scalars("probe_knn_layer2_image")] == [2]
    assert acc.Tags()["images"] == ["masked_inputs/image"]  # text has no picture


def test_only_rank_0_writes(tmp_path: Path) -> None:
    ctx = RunContext(tmp_path, tiny().train, RunState(), lambda _: None, Dist(rank=1, world_size=2))
    hook = TensorBoardLog(ctx, {}, 0)
    hook.after_step(StepInfo(1, {"step": 1, "loss": 1.0}, {}, 8))
    hook.on_checkpoint(1)
    hook.on_rewind(0)
    hook.on_end(1)
    assert not (tmp_path / TENSORBOARD_DIR).exists()


# ----------------------------------------------------------------------------- fine-tuning


def test_finetuning_writes_its_curves_afresh_each_run(tmp_path: Path) -> None:
    write_images(tmp_path / "img", n=4)
    out = tmp_path / "ft"
    for lr in (1e-3, 2e-3):  # the second run into the same folder replaces the first one's curves
        ft = FinetuneConfig(
            task="image_cls", epochs=2, batch_size=4, lr=lr, log_every=1, warmup_fraction=0.0, loggers=("tensorboard",)
        )
        finetune(image_config(), ft, tmp_path / "img", tmp_path / "img", out, quiet=True)
    rows = metrics(out)
    acc = events(out / TENSORBOARD_DIR)
    assert_events_match(acc, rows, skip=("step", "epoch", "seconds"))
    assert sorted(acc.Tags()["scalars"]) == ["eval_accuracy", "eval_loss", "loss", "lr", "train_loss"]
    assert [e.step for e in acc.Scalars("eval_accuracy")] == [2, 4]
    assert max(e.value for e in acc.Scalars("lr")) == pytest.approx(2e-3, rel=1e-6)


def test_a_checkpoint_flushes_and_the_end_closes(tmp_path: Path) -> None:
    """What a crash after a checkpoint leaves on disk holds every step up to it; the end of a run
    (finished, stopped or interrupted: the hooks' on_end) writes out the rest."""
    ctx = RunContext(tmp_path, tiny("train.steps=10").train, RunState(), lambda _: None)
    hook = TensorBoardLog(ctx, {}, 0)
    for step in (1, 2, 3, 4):
        hook.after_step(StepInfo(step, {"step": step, "loss": float(step)}, {}, 8))
        if step == 3:
            hook.on_checkpoint(3)
            assert [e.step for e in events(tmp_path / TENSORBOARD_DIR).Scalars("loss")] == [1, 2, 3]
    hook.on_end(4)
    assert [e.step for e in events(tmp_path / TENSORBOARD_DIR).Scalars("loss")] == [1, 2, 3, 4]
    assert hook.events is not None  # (still referenced: nothing was written out by its collection)
