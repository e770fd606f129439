"""Never lose a run: kills anywhere, disk full, non-finite numbers, collapse rewind, safe loading."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.test_train import TINY, tiny_run_config

import data2vec.checkpoint as checkpoint_module
import data2vec.model as model_module
from data2vec.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_latest, safe_torch_load
from data2vec.training import TrainingStopped, train
from data2vec.writes import WriteFailed


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


# ---------------------------------------------------------------- disk full


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def failing_save(tensors: dict[str, torch.Tensor], filename: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's first file (student, teacher per checkpoint)
            real_save(tensors, filename)
            with open(filename, "r+b") as f:  # half a file has been written when the disk fills up
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, filename)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save)
    cfg = tiny_run_config(2, "train.steps=6", "train.ckpt_every=2", "train.keep_last=3")
    with pytest.raises(
        WriteFailed, match=r"step_00000004: no space left on device \(writing a checkpoint\); the previous"
    ):
        train(cfg, tmp_path / "run", progress=False, quiet=True)
    ckpts = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step_00000002"]
    assert load_checkpoint(ckpts[0]).step == 2
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))  # nothing half-written left behind
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    resumed = train(cfg, tmp_path / "run", resume=True, progress=False, quiet=True)
    assert resumed.step == 6


# ---------------------------------------------------------------- non-finite numbers


def _poison_loss_at(monkeypatch: pytest.MonkeyPatch, call: int, kind: str) -> None:
    real = model_module.regression_loss
    calls = {"n": 0}

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return g * float("nan")

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            return out * float("inf") if kind == "loss" else NanGrad.apply(out)
        return out

    monkeypatch.setattr(model_module, "regression_loss", poisoned)


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_non_finite_stops_with_last_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    _poison_loss_at(monkeypatch, call=3, kind=kind)  # 1.0 mode: one regression_loss call per step
    cfg = tiny_run_config(1, "train.steps=6", "train.ckpt_every=2")
    with pytest.raises(TrainingStopped, match=f"non-finite {kind} at step 3"):
        train(cfg, tmp_path / "run", progress=False, quiet=True)
    ck = load_latest(tmp_path / "run")
    assert ck is not None and ck.step == 2
    assert all(torch.isfinite(v).all() for v in ck.student.values())


def test_non_finite_skip_counts_and_leaves_weights_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _poison_loss_at(monkeypatch, call=3, kind="gradient")
    cfg = tiny_run_config(1, "train.steps=4", "train.ckpt_every=2", "train.on_nan=skip", "train.keep_last=3")
    result = train(cfg, tmp_path / "run", progress=False, quiet=True, stop_after=3)
    assert result.step == 3 and _summary(tmp_path / "run")["nan_skipped_steps"] == 1
    before = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000002" / "student.safetensors"))
    after = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000003" / "student.safetensors"))
    for k in before:  # the skipped step 3 changed nothing
        assert torch.equal(before[k], after[k]), k
    final = train(cfg, tmp_path / "run", resume=True, progress=False, quiet=True)
    assert final.step == 4 and _summary(tmp_path / "run")["nan_skipped_steps"] == 1  # survives a resume


# ---------------------------------------------------------------- collapse


def _collapse_at_calls(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int]) -> None:
    real = model_module.feature_std
    calls = {"n": 0}

    def fake(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1  # two calls per step: target std, prediction std
        out = real(x)
        return out * 0 if (calls["n"] + 1) // 2 in bad_calls and calls["n"] % 2 == 1 else out

    monkeypatch.setattr(model_module, "feature_std", fake)


def test_collapse_rewind_lowers_lr_and_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _collapse_at_calls(monkeypatch, {4})  # the 4th forward pass collapses, once
    cfg = tiny_run_config(
        2,
        "train.steps=6",
        "train.ckpt_every=2",
        "train.collapse_after=1",
        "train.on_collapse=rewind",
        "train.rewind_lr_factor=0.5",
        "train.min_target_std=0.1",
    )
    result = train(cfg, tmp_path / "run", progress=False, quiet=True)
    assert result.step == 6
    s = _summary(tmp_path / "run")
    assert s["rewinds"] == 1 and s["lr_scale"] == 0.5
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Rewound to step 2" in log
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the abandoned steps are not in the log


def test_collapse_rewinds_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _collapse_at_calls(monkeypatch, set(range(3, 100)))  # collapses every step from the third on
    cfg = tiny_run_config(
        2,
        "train.steps=8",
        "train.ckpt_every=2",
        "train.collapse_after=1",
        "train.on_collapse=rewind",
        "train.max_rewinds=2",
        "train.min_target_std=0.1",
    )
    with pytest.raises(TrainingStopped, match="collapse"):
        train(cfg, tmp_path / "run", progress=False, quiet=True)
    assert _summary(tmp_path / "run")["rewinds"] == 2
    ck = load_latest(tmp_path / "run")
    assert ck is not None and ck.step == 2


def _local_collapse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local encoder emits one vector everywhere (what a speech CNN learns on small data)."""
    monkeypatch.setattr(model_module, "relative_std", lambda x: torch.zeros(()))


def test_local_collapse_is_warned_once_and_stops_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _local_collapse(monkeypatch)
    sets = [
        "train.steps=4",
        "train.ckpt_every=2",
        "train.collapse_after=1",
        "train.min_pred_std=0",
        "train.min_target_std=0",
    ]
    result = train(tiny_run_config(1, *sets), tmp_path / "warn", progress=False, quiet=True)
    assert result.step == 4  # off by default: the run finishes ...
    log = (tmp_path / "warn" / "train.log").read_text()
    assert log.count("warning: local_std 0.0000 at step 2") == 1 and log.count("warning: local_std") == 1  # once
    assert "optim.local_lr_scale=0" in log
    with pytest.raises(TrainingStopped, match=r"local std 0.0000 \(min 0.05; keep the local encoder"):
        train(tiny_run_config(1, *sets, "train.min_local_std=0.05"), tmp_path / "stop", progress=False, quiet=True)
    ck = load_latest(tmp_path / "stop")
    assert ck is None  # stopped at step 2, before its first checkpoint was due: nothing half-written


# ---------------------------------------------------------------- safe loading


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_crafted_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"optimizer": _Payload(marker)}, f, protocol=2)
    torch.save({"step": 1, "x": _Payload(marker)}, tmp_path / "evil2.pt")
    for path in (evil, tmp_path / "evil2.pt"):
        with pytest.raises(CheckpointError, match="refused to load"):
            safe_torch_load(path)
    assert not marker.exists()


def test_crafted_checkpoint_with_matching_manifest_is_refused(tmp_path: Path) -> None:
    cfg = tiny_run_config(2, "train.steps=2", "train.ckpt_every=2")
    train(cfg, tmp_path / "run", progress=False, quiet=True)
    ck_dir = list_checkpoints(tmp_path / "run")[-1]
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "optimizer": _Payload(marker)}, ck_dir / "state.pt")
    manifest = json.loads((ck_dir / "manifest.json").read_text())
    manifest["sha256"]["state.pt"] = checkpoint_module._sha256(ck_dir / "state.pt")
    (ck_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(ck_dir)
    assert not marker.exists()


# ---------------------------------------------------------------- kill anywhere


def _wait(cond: Any, timeout: float) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.002)
    return False


@pytest.mark.slow
def test_sigkill_at_five_random_moments_then_resume_is_bit_identical(tmp_path: Path) -> None:
    sets = [f"--set={s}" for s in [*TINY, "train.steps=16", "train.ckpt_every=2", "train.keep_last=2"]]
    cmd = [sys.executable, "-m", "data2vec", "pretrain", "--preset", "digits-tiny", "--no-progress", *sets]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills = []
    for i in range(5):
        args = (
            [*cmd, "--out", str(run)]
            if i == 0
            # as a requeueing job script: --force-fresh, since a kill may come before the first checkpoint
            else [sys.executable, "-m", "data2vec", "pretrain", "--resume", str(run), "--force-fresh", "--no-progress"]
        )
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert _wait(lambda: (run / "config.json").exists(), 60)
        if i == 2:  # one kill aimed at the middle of a save
            ckdir = run / "checkpoints"
            _wait(lambda d=ckdir: d.is_dir() and any(d.glob(".tmp-*")), 30)
            where = "during a save" if any(ckdir.glob(".tmp-*")) else "just after a save"
        else:
            time.sleep(rng.uniform(0.5, 4.0))
            where = "at a random moment"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append((where, [p.name for p in list_checkpoints(run)]))
    subprocess.run(
        [sys.executable, "-m", "data2vec", "pretrain", "--resume", str(run), "--no-progress"],
        env=env,
        check=True,
        capture_output=True,
    )
    clean = tmp_path / "clean"
    subprocess.run([*cmd, "--out", str(clean)], env=env, check=True, capture_output=True)
    for name in ("student.safetensors", "teacher.safetensors"):
        a = load_file(str(run / "checkpoints" / "step_00000016" / name))
        b = load_file(str(clean / "checkpoints" / "step_00000016" / name))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k, kills)
    a_state = load_checkpoint(run / "checkpoints" / "step_00000016").state
    b_state = load_checkpoint(clean / "checkpoints" / "step_00000016").state
    assert torch.equal(a_state["rng_cpu"], b_state["rng_cpu"])
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_replace_folder_is_all_or_nothing(tmp_path: Path) -> None:
    """A folder written with replace_folder (fine-tuned `best/`, exports) is either the old one
    or the complete new one: a failing writer leaves the old folder and no temporary behind."""
    target = tmp_path / "best"

    def write(text: str) -> Any:
        def fill(tmp: Path) -> None:
            (tmp / "a.txt").write_text(text)
            (tmp / "b.txt").write_text(text)

        return fill

    checkpoint_module.replace_folder(target, write("one"))
    assert (target / "a.txt").read_text() == "one"

    def failing(tmp: Path) -> None:
        (tmp / "a.txt").write_text("two")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteFailed, match="best: no space left on device .*best is as it was"):
        checkpoint_module.replace_folder(target, failing)
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    assert (target / "a.txt").read_text() == "one"

    checkpoint_module.replace_folder(target, write("three"))
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert (target / "b.txt").read_text() == "three"
