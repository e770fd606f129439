"""A full disk, for real: size-limited tmpfs mounts (when the tests run as root and may mount one)
as the run directory, the export folder and the feature file's folder. Every write path fails
with one line naming the path and "no space left on device", and what was written before stays
intact. tests/test_reliability.py injects the error where no tmpfs can be made."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from tests.test_text_cli import SHRINK, _corpus
from tests.test_train import TINY, tiny_run_config

from data2vec.checkpoint import list_checkpoints, replace_folder, verify_checkpoint
from data2vec.extract import write_features
from data2vec.training import plot_loss_curve, train
from data2vec.writes import WriteFailed, no_space

MakeDisk = Callable[[str], Path]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[MakeDisk]:
    mounts: list[Path] = []

    def make(size: str) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root); test_reliability.py injects the error instead")
        mounts.append(where)
        return where

    yield make
    for m in mounts:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """Fill `disk` up, then give back `leave` bytes."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "data2vec", *args], capture_output=True, text=True, timeout=300)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("leave", "what"),
    [(0, "a file of the run"), (100_000, "student.safetensors"), (260_000, "state.pt")],
    ids=["nothing-left", "fills-in-safetensors", "fills-in-torch-save"],
)
def test_pretrain_on_a_full_disk_stops_in_one_line_and_keeps_the_checkpoint(
    small_disk: MakeDisk, leave: int, what: str
) -> None:
    disk = small_disk("3m")
    run = disk / "run"
    sets = [f"--set={s}" for s in [*TINY, "train.steps=6", "train.ckpt_every=2", "train.keep_last=3"]]
    first = _cli("pretrain", "--preset", "digits-tiny", "--no-progress", *sets, "--out", str(run), "--stop-after", "2")
    assert first.returncode == 0, first.stderr
    (good,) = list_checkpoints(run)
    filler = _fill(disk, leave)
    full = _cli("pretrain", "--resume", str(run), "--no-progress")
    assert full.returncode == 2
    line = _one_line(full.stderr)
    assert "no space left on device" in line and str(run) in line, line
    if what != "a file of the run":
        assert (
            "step_00000004: no space left on device (writing a checkpoint); the previous checkpoint is intact" in line
        )
    assert list_checkpoints(run) == [good] and verify_checkpoint(good) is None
    assert not list((run / "checkpoints").glob(".tmp-*"))
    filler.unlink()  # space again: the run goes on from its checkpoint
    again = _cli("pretrain", "--resume", str(run), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004", "step_00000006"]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_the_token_cache_on_a_full_disk(small_disk: MakeDisk, tmp_path: Path) -> None:
    data = _corpus(tmp_path / "corpus")
    (data / "bad.txt").unlink()
    (data / "big.txt").write_text("".join(f"line {i} of a corpus that does not fit\n" for i in range(40_000)))
    disk = small_disk("192k")
    sets = [a for s in [*SHRINK, "train.steps=1"] for a in ("--set", s)]
    run = disk / "run"
    done = _cli(
        "pretrain", "--modality", "text", "--data", str(data), "--preset", "text-tiny", *sets, "--out", str(run)
    )
    assert done.returncode == 2
    line = _one_line(done.stderr)
    assert f"{run}/" in line and "no space left on device (writing the" in line, line


def test_exports_plots_and_features_on_a_full_disk(small_disk: MakeDisk, tmp_path: Path) -> None:
    disk = small_disk("256k")
    _fill(disk, 0)
    # an export folder (convert, fine-tuned best/): the old folder stays as it was
    old = disk / "best"
    with pytest.raises(WriteFailed, match=r"best: no space left on device \(writing the fine-tuned model\)"):
        replace_folder(
            old, lambda tmp: (tmp / "model.safetensors").write_bytes(b"\0" * 100_000), "the fine-tuned model"
        )
    assert not old.exists() and not list(disk.glob(".best.tmp-*"))
    # loss.png
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(json.dumps({"step": i, "loss": 1.0, "target_std": 1.0, "pred_std": 1.0}) + "\n" for i in (1, 2))
    )
    with pytest.raises(WriteFailed, match=r"loss.png: no space left on device \(writing the loss curve\)"):
        plot_loss_curve(metrics, disk / "loss.png")
    assert not list(disk.glob("*.tmp.png"))
    # extracted features
    feats = {6: np.zeros((50, 256), dtype=np.float32)}
    with pytest.raises(WriteFailed, match=r"features.npy: no space left on device \(writing features\)"):
        write_features(disk / "features.npy", [f"f{i}" for i in range(50)], feats, "mean")  # type: ignore[arg-type]


def test_every_library_way_of_saying_the_disk_is_full_is_recognised() -> None:
    from safetensors import SafetensorError

    assert no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert no_space(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from None
    except RuntimeError as e:
        assert no_space(e)  # torch.save: the OSError is its context
    assert not no_space(RuntimeError("something else"))


def test_a_training_run_whose_log_write_fails_says_so_in_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected (any machine): metrics.jsonl cannot be appended at step 3."""
    import data2vec.training.hooks as hooks

    real = hooks.append_line

    def failing(path: Path, line: str, what: str) -> None:
        if what == "metrics" and json.loads(line)["step"] == 3:
            raise WriteFailed(f"{path}: no space left on device (writing {what})")
        real(path, line, what)

    monkeypatch.setattr(hooks, "append_line", failing)
    cfg = tiny_run_config(2, "train.steps=6", "train.ckpt_every=2")
    with pytest.raises(
        WriteFailed, match=r"metrics.jsonl: no space left.*Stopped at step 2; checkpoint step 2 is intact"
    ):
        train(cfg, tmp_path / "run", progress=False, quiet=True)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]
