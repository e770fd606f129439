"""Never lose a run, part 2: resume refuses instead of discarding (item 1), scheduler signals end a
run with a checkpoint (2), one writer per run directory (3), a torn metrics line (5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.test_train import TINY, tiny_run_config

from data2vec.checkpoint import SET_ASIDE, CheckpointError, list_checkpoints, verify_checkpoint
from data2vec.cli import main as cli_main
from data2vec.training import train


def _flip_a_hex_digit(manifest: Path) -> None:
    data = json.loads(manifest.read_text())
    digest = data["sha256"]["student.safetensors"]
    data["sha256"]["student.safetensors"] = ("1" if digest[0] != "1" else "2") + digest[1:]
    manifest.write_text(json.dumps(data, indent=2) + "\n")


def _one_checkpoint_run(tmp_path: Path, steps: int = 2) -> Path:
    run = tmp_path / "run"
    cfg = tiny_run_config(2, f"train.steps={steps}", "train.ckpt_every=2", "train.keep_last=1")
    train(cfg, run, progress=False, quiet=True, stop_after=2)
    return run


# ---------------------------------------------------------------- 1. resume never destroys good work


def test_resume_refuses_when_the_only_checkpoint_fails_verification(tmp_path: Path) -> None:
    run = _one_checkpoint_run(tmp_path, steps=6)
    (ck,) = list_checkpoints(run)
    _flip_a_hex_digit(ck / "manifest.json")
    weights = (ck / "student.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="no checkpoint verifies") as e:
        train(None, run, resume=True, progress=False, quiet=True)  # type: ignore[arg-type]
    assert "step_00000002" in str(e.value) and "student.safetensors" in str(e.value)
    assert "--resume-from" in str(e.value) and "--force-fresh" in str(e.value)
    assert list_checkpoints(run) == [ck] and (ck / "student.safetensors").read_bytes() == weights
    # the CLI: one line, exit 2, nothing changed
    assert cli_main(["pretrain", "--resume", str(run), "--no-progress"]) == 2
    assert list_checkpoints(run) == [ck]


def test_ignore_checksums_resumes_and_never_deletes_the_unverified_checkpoint(tmp_path: Path) -> None:
    run = _one_checkpoint_run(tmp_path, steps=6)
    (ck,) = list_checkpoints(run)
    _flip_a_hex_digit(ck / "manifest.json")
    result = train(None, run, resume=True, progress=False, quiet=True, ignore_checksums=True)  # type: ignore[arg-type]
    assert result.step == 6
    log = (run / "train.log").read_text()
    assert "checksums not checked" in log
    kept = list((run / "checkpoints" / SET_ASIDE).iterdir())  # keep_last=1 rotated it: set aside, not deleted
    assert [p.name for p in kept] == ["step_00000002"] and verify_checkpoint(kept[0]) is not None
    assert (kept[0] / "student.safetensors").is_file()


def test_resume_from_a_named_checkpoint_sets_newer_ones_aside(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_run_config(2, "train.steps=6", "train.ckpt_every=2", "train.keep_last=3")
    train(cfg, run, progress=False, quiet=True, stop_after=4)
    first, second = list_checkpoints(run)
    assert cli_main(["pretrain", "--resume-from", str(first), "--no-progress"]) == 0
    assert "resumed from" in (run / "train.log").read_text() and "at step 2" in (run / "train.log").read_text()
    aside = run / "checkpoints" / SET_ASIDE / second.name
    assert aside.is_dir() and verify_checkpoint(aside) is None  # the user's step-4 checkpoint is still there
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004", "step_00000006"]


def test_newest_checkpoint_corrupt_falls_back_and_keeps_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_run_config(2, "train.steps=6", "train.ckpt_every=2", "train.keep_last=2")
    train(cfg, run, progress=False, quiet=True, stop_after=4)
    newest = list_checkpoints(run)[-1]
    data = (newest / "student.safetensors").read_bytes()
    (newest / "student.safetensors").write_bytes(data[: len(data) // 2])
    result = train(None, run, resume=True, progress=False, quiet=True)  # type: ignore[arg-type]
    assert result.step == 6
    aside = run / "checkpoints" / SET_ASIDE / newest.name
    assert (aside / "student.safetensors").read_bytes() == data[: len(data) // 2]
    assert "set aside" in (run / "train.log").read_text()


def test_resume_without_any_checkpoint_needs_force_fresh(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_run_config(2, "train.steps=4", "train.ckpt_every=4")
    train(cfg, run, progress=False, quiet=True, stop_after=1)  # stop_after checkpoints: remove it
    for ck in list_checkpoints(run):
        import shutil

        shutil.rmtree(ck)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from yet.*--force-fresh"):
        train(None, run, resume=True, progress=False, quiet=True)  # type: ignore[arg-type]
    result = train(None, run, resume=True, progress=False, quiet=True, force_fresh=True)  # type: ignore[arg-type]
    assert result.step == 4
    assert "from step 0" in (run / "train.log").read_text()


def test_force_fresh_sets_unverified_checkpoints_aside(tmp_path: Path) -> None:
    run = _one_checkpoint_run(tmp_path, steps=4)
    (ck,) = list_checkpoints(run)
    _flip_a_hex_digit(ck / "manifest.json")
    assert cli_main(["pretrain", "--resume", str(run), "--force-fresh", "--no-progress"]) == 0
    assert (run / "checkpoints" / SET_ASIDE / "step_00000002" / "student.safetensors").is_file()
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004"]


# ---------------------------------------------------------------- 3. one writer per run directory

from data2vec.training.lock import RunDirLocked, RunLock  # noqa: E402


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunDirLocked, match=f"PID {os.getpid()} on host"):
            RunLock(run).acquire()
        cfg = tiny_run_config(2, "train.steps=2", "train.ckpt_every=2")
        with pytest.raises(RunDirLocked, match="another run is writing"):
            train(cfg, run, progress=False, quiet=True)
        assert not (run / "metrics.jsonl").exists() and not (run / "train.log").exists()
    assert train(cfg, run, progress=False, quiet=True).step == 2  # released: the next run goes ahead


def test_the_lock_of_a_killed_process_is_not_stale(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = (
        f"from data2vec.training.lock import RunLock; import time; RunLock({str(run)!r}).acquire(); "
        "print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    with pytest.raises(RunDirLocked, match=f"PID {proc.pid}"):
        RunLock(run).acquire()
    proc.kill()
    proc.wait()
    RunLock(run).acquire().release()


@pytest.mark.slow
def test_resume_while_the_run_is_running_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [f"--set={s}" for s in [*TINY, "train.steps=400", "train.ckpt_every=2"]]
    cmd = [sys.executable, "-m", "data2vec", "pretrain", "--preset", "digits-tiny", "--no-progress", *sets]
    first = subprocess.Popen([*cmd, "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(run) and time.time() < deadline:
            time.sleep(0.1)
        second = subprocess.run(
            [sys.executable, "-m", "data2vec", "pretrain", "--resume", str(run), "--no-progress"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert f"PID {first.pid}" in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None  # the first run goes on, undisturbed
    finally:
        first.kill()
        first.wait()


# ---------------------------------------------------------------- 2. SIGTERM / SIGINT


def _busy_core() -> subprocess.Popen[bytes]:
    """Load: a process spinning on a core, as a busy node has."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "workers"),
    [(signal.SIGINT, 0), (signal.SIGTERM, 2)],
    ids=["sigint-to-the-process", "sigterm-to-the-group-with-loader-workers"],
)
def test_stop_signal_checkpoints_logs_and_exits_75(tmp_path: Path, sig: signal.Signals, workers: int) -> None:
    """SIGINT to the main process; SIGTERM as SLURM sends it: to every process of the job, the
    data-loader workers included."""
    run = tmp_path / "run"
    extra = ["train.steps=5000", "train.ckpt_every=10000", "train.log_every=1", f"data.num_workers={workers}"]
    sets = [f"--set={s}" for s in [*TINY, *extra]]
    cmd = [sys.executable, "-m", "data2vec", "pretrain", "--preset", "digits-tiny", "--no-progress", *sets]
    load = _busy_core()
    try:
        proc = subprocess.Popen(
            [*cmd, "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        deadline = time.time() + 120
        metrics = run / "metrics.jsonl"
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.05)
        if workers:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        load.kill()
        load.wait()
    assert proc.returncode == 75, err
    log = (run / "train.log").read_text()
    assert f"received {sig.name}" in log and f"stopped by {sig.name} after step" in log
    (ck,) = list_checkpoints(run)
    assert verify_checkpoint(ck) is None
    step = int(ck.name.removeprefix("step_"))
    assert step >= 3 and f"after step {step}" in log and f"saved checkpoint {ck}" in log
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert err.strip().count("\n") == 0 and "--resume" in err  # one line on stderr
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == step
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "data2vec",
            "pretrain",
            "--resume",
            str(run),
            "--no-progress",
            "--stop-after",
            str(step + 2),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {ck} at step {step}" in (run / "train.log").read_text()


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    code = f"""
import os, signal, time
from pathlib import Path
from data2vec.config import TrainConfig
from data2vec.training.hooks import Checkpointer, RunContext, SignalStop
from data2vec.training.state import RunState
ctx = RunContext(Path({str(tmp_path)!r}), TrainConfig(), RunState(), print)
hook = SignalStop(ctx, None)
signal.raise_signal(signal.SIGTERM)
print("noted", hook.received == signal.SIGTERM, flush=True)
signal.raise_signal(signal.SIGTERM)
time.sleep(5)
print("still alive", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "noted True" in proc.stdout and "still alive" not in proc.stdout
    assert proc.returncode == -signal.SIGTERM


# ---------------------------------------------------------------- 5. a torn metrics.jsonl line


def test_a_torn_last_metrics_line_is_dropped_and_logged_on_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_run_config(2, "train.steps=4", "train.ckpt_every=2")
    train(cfg, run, progress=False, quiet=True, stop_after=2)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.51, "lr": 0.0001, "target_std"')  # killed mid-write
    result = train(None, run, resume=True, progress=False, quiet=True)  # type: ignore[arg-type]
    assert result.step == 4
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    log = (run / "train.log").read_text()
    assert "metrics.jsonl: dropped 1 line(s) that are not a whole record (line 3" in log
