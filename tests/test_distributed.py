"""Multi-process pretraining: torchrun with gloo on CPU gives the single-process weights.

Rank r of N reads micro-batches r, r+N, ... of the single-process stream, so N processes
with batch B equal one process with batch B and grad_accum N (same samples, crops, masks,
and gradient average). Dropout and the 2.0 decoder noise are per-rank random streams, so
they are off here; LayerDrop likewise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data2vec.checkpoint import list_checkpoints, load_checkpoint
from data2vec.config import ConfigError, RunConfig, apply_overrides
from data2vec.presets import preset
from data2vec.tiny import IMAGE_SHAPE
from data2vec.training import train

TINY = [
    "data.path=builtin:digits:train",
    *IMAGE_SHAPE,
    "model.decoder.mask_noise_std=0.0",
    "data.batch_size=4",
    "data.num_workers=0",
    "train.precision=fp32",
    "train.device=cpu",
    "train.steps=3",
    "train.ckpt_every=2",
    "optim.warmup_steps=1",
    "optim.lr=1e-3",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(tmp: Path, nproc: int, program: list[str]) -> subprocess.CompletedProcess[str]:
    """torchrun `program` (a script or `-m module`, with its arguments) on `nproc` CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    rdzv = ["--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *rdzv, *program]
    return subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=240)


def _torchrun(tmp: Path, nproc: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    return _launch(tmp, nproc, ["-m", "data2vec", "pretrain", "--no-progress", *args])


def _overrides(extra: list[str]) -> list[str]:
    return [a for kv in [*TINY, *extra] for a in ("--set", kv)]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    ck = load_checkpoint(list_checkpoints(run)[-1])
    return {**ck.student, **ck.teacher}


def _compare(multi: dict[str, torch.Tensor], single: dict[str, torch.Tensor]) -> None:
    assert set(multi) == set(single)
    for k, v in single.items():
        torch.testing.assert_close(multi[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize(
    ("version", "extra"),
    [
        (2, ["masking.num_masks=2"]),
        (1, ["model.encoder.dropout=0.0", "model.encoder.drop_path=0.0"]),
    ],
    ids=["v2-multimask", "v1"],
)
def test_two_processes_match_one(tmp_path: Path, version: int, extra: list[str]) -> None:
    args = ["--preset", "digits-tiny", "--version", str(version), *_overrides(extra)]
    res = _torchrun(tmp_path, 2, [*args, "--out", str(tmp_path / "ddp")])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # One process, same global batch: batch 4 x grad_accum 2.
    cfg = apply_overrides(preset("digits-tiny", version), [*TINY, *extra, "train.grad_accum=2"])
    train(cfg, tmp_path / "single", progress=False, quiet=True)
    _compare(_final_weights(tmp_path / "ddp"), _final_weights(tmp_path / "single"))
    # Rank 0 alone wrote the run directory: one log line per step, one finished message.
    rows = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3
    assert res.stdout.count("finished at step 3") == 1
    assert "x 2 processes" in (tmp_path / "ddp" / "train.log").read_text()


def test_resume_under_torchrun(tmp_path: Path) -> None:
    """Stop after step 2 (checkpoint), resume with torchrun: the same weights as straight through."""
    args = ["--preset", "digits-tiny", "--version", "2", *_overrides([])]
    res = _torchrun(tmp_path, 2, [*args, "--out", str(tmp_path / "a"), "--stop-after", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    res = _torchrun(tmp_path, 2, ["--resume", str(tmp_path / "a")])
    assert res.returncode == 0, res.stderr[-3000:]
    ck = load_checkpoint(list_checkpoints(tmp_path / "a")[-1])
    assert ck.step == 3 and len(ck.state["rng_ranks"]) == 2
    cfg = apply_overrides(preset("digits-tiny", 2), [*TINY, "train.grad_accum=2"])
    train(cfg, tmp_path / "single", progress=False, quiet=True)
    _compare(_final_weights(tmp_path / "a"), _final_weights(tmp_path / "single"))


def test_fsdp_two_processes_match_one(tmp_path: Path) -> None:
    """FSDP2 on CPU (gloo): sharded student and teacher, gathered checkpoint, same weights."""
    args = ["--preset", "digits-tiny", "--version", "2", *_overrides(["train.fsdp=true"])]
    res = _torchrun(tmp_path, 2, [*args, "--out", str(tmp_path / "fsdp")])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "x 2 processes (FSDP)" in (tmp_path / "fsdp" / "train.log").read_text()
    cfg = apply_overrides(preset("digits-tiny", 2), [*TINY, "train.grad_accum=2"])
    train(cfg, tmp_path / "single", progress=False, quiet=True)
    _compare(_final_weights(tmp_path / "fsdp"), _final_weights(tmp_path / "single"))


def test_fsdp_needs_torchrun(tmp_path: Path) -> None:
    cfg = apply_overrides(preset("digits-tiny", 2), [*TINY, "train.fsdp=true"])
    with pytest.raises(ConfigError, match="train.fsdp"):
        train(cfg, tmp_path / "run", progress=False, quiet=True)


@pytest.mark.parametrize("version", [1, 2])
def test_activation_checkpointing_same_loss_and_grads(version: int) -> None:
    from data2vec.model import Batch, Data2Vec

    base = apply_overrides(preset("digits-tiny", version), [*TINY, "model.encoder.dropout=0.1"])
    on = apply_overrides(base, ["model.encoder.activation_checkpointing=true"])
    grads = []
    for cfg in (base, on):
        assert isinstance(cfg, RunConfig)
        torch.manual_seed(0)
        model = Data2Vec.from_config(cfg).train()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, 1, 32, 32) if cfg.model.image.channels == 1 else torch.randn(4, 3, 32, 32)
        mask = model.draw_masks(4, g)
        torch.manual_seed(2)
        out = model(Batch(x, mask))
        out.loss.backward()
        grads.append(
            (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0)
    assert set(g0) == set(g1) and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6)


def test_parquet_data_under_torchrun(tmp_path: Path) -> None:
    """Two ranks read parquet data, each its own row groups (the order, its sharding and its
    resume are tested on the sampler in test_parquet.py)."""
    from tests.test_parquet import write_images

    data = write_images(tmp_path / "train.parquet", n=48, group=8)
    args = ["--preset", "digits-tiny", "--version", "2", *_overrides([f"data.path={data}", "data.shuffle_buffer=8"])]
    res = _torchrun(tmp_path, 2, [*args, "--out", str(tmp_path / "ddp")])
    assert res.returncode == 0, res.stderr[-3000:]
    log = (tmp_path / "ddp" / "train.log").read_text()
    assert "x 2 processes" in log and "48 samples" in log
    assert len(list_checkpoints(tmp_path / "ddp")) >= 1


LEAVE_CLEAN = """
import gc, sys
from torch.nn.parallel import DistributedDataParallel
from data2vec.config import apply_overrides
from data2vec.distributed import finish
from data2vec.presets import preset
from data2vec.training import train

cfg = apply_overrides(preset("digits-tiny", 2), sys.argv[2:])
train(cfg, sys.argv[1], progress=False, quiet=True)
finish()
alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
print("DDP models alive after finish:", alive)
"""


def test_finish_frees_the_ddp_models(tmp_path: Path) -> None:
    """After `finish()` no DDP-wrapped model (and so no reference to the gloo group) is left
    for interpreter shutdown to free: one that was made ranks abort at exit now and then."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_CLEAN)
    res = _launch(tmp_path, 2, [str(script), str(tmp_path / "run"), *TINY])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("DDP models alive after finish: 0") == 2, res.stdout
