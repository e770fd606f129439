"""End-to-end training: checkpoints, exact resume after SIGKILL, collapse stop, precision."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data2vec.checkpoint import list_checkpoints, load_checkpoint, load_latest
from data2vec.config import RunConfig, apply_overrides
from data2vec.presets import preset
from data2vec.tiny import IMAGE_SHAPE
from data2vec.training import TrainingStopped, train

TINY = [
    "data.path=builtin:digits:train",
    *IMAGE_SHAPE,
    "data.batch_size=8",
    "data.num_workers=0",
    "train.log_every=1",
    "train.precision=fp32",
    "optim.warmup_steps=2",
]


def tiny_run_config(version: int = 2, *extra: str) -> RunConfig:
    return apply_overrides(preset("digits-tiny", version), [*TINY, *extra])


@pytest.mark.parametrize("version", [1, 2])
def test_train_writes_run_directory(tmp_path: Path, version: int) -> None:
    cfg = tiny_run_config(version, "train.steps=4", "train.ckpt_every=2", "train.keep_last=1")
    result = train(cfg, tmp_path / "run", progress=False, quiet=True)
    run = tmp_path / "run"
    assert result.step == 4
    assert RunConfig.load(run / "config.json") == cfg
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "lr", "target_std", "pred_std", "samples_per_sec", "ema_decay", "grad_norm"):
        assert key in rows[-1]
    assert (run / "loss.png").stat().st_size > 0
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["step_00000004"]  # keep_last=1 removed step 2
    ck = load_checkpoint(ckpts[0])
    assert ck.step == 4 and ck.config == cfg.to_dict()
    assert set(ck.student) == set(result.model.student_state_dict())
    assert all(k.startswith("teacher.") for k in ck.teacher)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    cfg = tiny_run_config(2, "train.steps=6", "train.ckpt_every=3", "model.encoder.dropout=0.1")
    full = train(cfg, tmp_path / "full", progress=False, quiet=True)
    # A second run stopped after step 3 (its checkpoint), then resumed to the end.
    part = train(cfg, tmp_path / "part", progress=False, quiet=True, stop_after=2)
    assert part.step == 2 and list_checkpoints(tmp_path / "part")[-1].name == "step_00000002"
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False, quiet=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _wait_for(path: Path, timeout: float) -> None:
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout:
            raise TimeoutError(path)
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    """Kill the CLI with SIGKILL after its second checkpoint; resume; compare with a clean run."""
    sets = [f"--set={s}" for s in [*TINY, "train.steps=8", "train.ckpt_every=2"]]
    base = [sys.executable, "-m", "data2vec", "pretrain", "--preset", "digits-tiny", "--no-progress", *sets]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*base, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for(killed / "checkpoints" / "step_00000004", timeout=120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    last = list_checkpoints(killed)[-1].name
    assert last < "step_00000008", "the run finished before it could be killed"
    subprocess.run(
        [sys.executable, "-m", "data2vec", "pretrain", "--resume", str(killed), "--no-progress"],
        env=env,
        check=True,
        capture_output=True,
    )
    clean = tmp_path / "clean"
    subprocess.run([*base, "--out", str(clean)], env=env, check=True, capture_output=True)
    for name in ("student.safetensors", "teacher.safetensors"):
        a = load_file(str(killed / "checkpoints" / "step_00000008" / name))
        b = load_file(str(clean / "checkpoints" / "step_00000008" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_collapse_monitor_stops_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_run_config(
        2, "train.steps=10", "train.ckpt_every=2", "train.collapse_after=3", "train.min_target_std=100.0"
    )
    with pytest.raises(TrainingStopped, match="collapse at step 4"):
        train(cfg, tmp_path / "run", progress=False, quiet=True)
    ck = load_latest(tmp_path / "run")
    assert ck is not None and ck.step == 2
    assert "collapse" in (tmp_path / "run" / "train.log").read_text()


def test_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    cfg = tiny_run_config(2, "train.steps=1", "train.ckpt_every=1")
    train(cfg, tmp_path / "run", progress=False, quiet=True)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "run", progress=False, quiet=True)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    cfg = tiny_run_config(2, "train.steps=4", "train.ckpt_every=2", "train.keep_last=3")
    train(cfg, tmp_path / "run", progress=False, quiet=True)
    newest = list_checkpoints(tmp_path / "run")[-1]
    data = (newest / "student.safetensors").read_bytes()
    (newest / "student.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="checksum mismatch"):
        ck = load_latest(tmp_path / "run")
    assert ck is not None and ck.step == 2


def test_grad_accumulation_equals_full_batch_gradient() -> None:
    """What the loop does with grad_accum=2 (loss / 2 per half, summed) gives the gradient of the
    full batch, because every row masks the same number of tokens."""
    from data2vec.model import Batch, Data2Vec

    cfg = tiny_run_config(2, "model.decoder.mask_noise_std=0.0")
    torch.manual_seed(0)
    model = Data2Vec.from_config(cfg)
    x = torch.randn(8, 1, 32, 32)
    mask = model.draw_masks(8, torch.Generator().manual_seed(1))
    M = cfg.masking.num_masks
    model(Batch(x, mask)).loss.backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for half in (slice(0, 4), slice(4, 8)):
        rows = slice(half.start * M, half.stop * M)
        (model(Batch(x[half], mask[rows])).loss / 2).backward()
    for n, p in model.named_parameters():
        if n in full:
            torch.testing.assert_close(p.grad, full[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, 0.1])
def test_local_lr_scale_slows_or_freezes_the_local_encoder(tmp_path: Path, scale: float) -> None:
    """`optim.local_lr_scale` moves the local encoder (patch embedding here) `scale` times as far
    as the default; 0 leaves it exactly at its initial weights. `local_std` is logged."""
    moved = {}
    for s in (1.0, scale):
        torch.manual_seed(0)
        cfg = tiny_run_config(2, "train.steps=3", "train.ckpt_every=3", f"optim.local_lr_scale={s}")
        model = train(cfg, tmp_path / f"run-{s}", progress=False, quiet=True).model
        torch.manual_seed(0)
        init = type(model).from_config(cfg)
        local = dict(model.frontend.local.named_parameters())
        start = dict(init.frontend.local.named_parameters())
        moved[s] = max(float((local[k] - start[k]).detach().abs().max()) for k in local)
        blocks = dict(model.encoder.named_parameters())
        assert any(not torch.equal(v, dict(init.encoder.named_parameters())[k]) for k, v in blocks.items())
    if scale == 0.0:
        assert moved[scale] == 0.0
    else:  # Adam: steps are about lr-sized, so the distance scales with the lr
        assert 0.03 * moved[1.0] < moved[scale] < 0.3 * moved[1.0]
    rows = [json.loads(ln) for ln in (tmp_path / f"run-{scale}" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 < r["local_std"] < 2.0 for r in rows)


def test_local_lr_scale_one_keeps_the_two_group_optimizer() -> None:
    """The default keeps the optimizer layout that older checkpoints were saved with."""
    from data2vec.model import Data2Vec
    from data2vec.training import build_optimizer

    cfg = tiny_run_config(2)
    opt = build_optimizer(Data2Vec.from_config(cfg), cfg.optim)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]
    assert all(g["lr_scale"] == 1.0 for g in opt.param_groups)


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_a_compiled_block_is_one_graph(modality: str) -> None:
    """`train.compile` compiles each Transformer block: in training, in bf16 autocast (the
    written-out attention path included), a block traces to one graph with no graph break."""
    import torch._dynamo

    from data2vec.model import Data2Vec
    from data2vec.tiny import tiny_config

    for version in (1, 2):
        torch.manual_seed(0)
        cfg = tiny_config(modality, version)
        block = Data2Vec.from_config(cfg).train().encoder.blocks[0]
        x = torch.randn(2, 10, cfg.model.encoder.dim)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            explained = torch._dynamo.explain(block)(x)
        torch._dynamo.reset()
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_blocks_train_like_eager(tmp_path: Path) -> None:
    """`train.compile` changes speed, not results: same losses, same weights (fp32)."""
    runs = {}
    for flag in ("false", "true"):
        cfg = tiny_run_config(2, "train.steps=3", "train.ckpt_every=3", f"train.compile={flag}")
        runs[flag] = train(cfg, tmp_path / f"run-{flag}", progress=False, quiet=True)
    eager, compiled = runs["false"], runs["true"]
    assert [r["step"] for r in compiled.history] == [1, 2, 3]
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    sd_eager, sd_compiled = eager.model.state_dict(), compiled.model.state_dict()
    assert sd_eager.keys() == sd_compiled.keys()  # in-place compile keeps parameter names
    import torch._dynamo

    assert torch._dynamo.config.recompile_limit >= 64  # every block variant compiles, none falls back to eager
    for k, v in sd_eager.items():
        torch.testing.assert_close(sd_compiled[k], v, rtol=1e-4, atol=1e-5)
