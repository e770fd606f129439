"""Continue pretraining: `pretrain --init CHECKPOINT` starts from a pretrained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.test_train import TINY

from data2vec.checkpoint import load_latest
from data2vec.cli import main
from data2vec.config import ConfigError, RunConfig, apply_overrides
from data2vec.model import Data2Vec
from data2vec.training import check_init_config, init_from


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def pretrain_source(tmp_path: Path, version: int = 2) -> Path:
    run = tmp_path / "source"
    args = ["pretrain", "--preset", "digits-tiny", "--version", str(version), "--out", str(run), "--no-progress"]
    assert main([*args, *sets(*TINY, "train.steps=2", "train.ckpt_every=2")]) == 0
    return run


def encoder_keys(sd: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in sd if k.startswith(("frontend.", "encoder."))]


@pytest.mark.parametrize("version", [1, 2])
def test_init_loads_the_encoder_copies_the_teacher_and_keeps_a_fresh_head(tmp_path: Path, version: int) -> None:
    src_run = pretrain_source(tmp_path, version)
    src = load_latest(src_run)
    assert src is not None
    cfg = RunConfig.from_dict(src.config)
    torch.manual_seed(123)
    model = Data2Vec.from_config(cfg)
    fresh_head = {k: v.clone() for k, v in model.student_state_dict().items() if k.startswith("head.")}
    pre, fresh = init_from(model, src_run)
    assert fresh == sorted(fresh_head) and fresh  # exactly the head / decoder
    sd = model.student_state_dict()
    for k in encoder_keys(src.student):
        assert torch.equal(sd[k], src.student[k]), k
    for k, v in fresh_head.items():
        assert torch.equal(sd[k], v) and not torch.equal(v, src.student[k]), k  # re-initialised, not loaded
    for name, part in model.student_parts().items():
        for k, v in part.state_dict().items():
            assert torch.equal(model.teacher[name].state_dict()[k], v.float()), (name, k)
    assert pre.path == str(src_run)


def test_pretrain_init_end_to_end(tmp_path: Path) -> None:
    src_run = pretrain_source(tmp_path)
    src = load_latest(src_run)
    assert src is not None
    run = tmp_path / "continued"
    # lr ~ 0: after one step the weights still equal what training started from
    args = ["pretrain", "--init", str(src_run), "--data", "builtin:digits:train", "--out", str(run), "--no-progress"]
    extra = sets("train.steps=1", "optim.lr=1e-12", "optim.min_lr=0", "optim.warmup_steps=0", "train.seed=7")
    assert main([*args, *extra]) == 0
    log = (run / "train.log").read_text()
    line = next(ln for ln in log.splitlines() if ln.startswith("initialised from"))
    assert str(src_run) in line and "teacher starts as a copy" in line
    head_keys = sorted(k for k in src.student if k.startswith("head."))
    assert f"fresh: {', '.join(head_keys)}" in line
    cfg = RunConfig.load(run / "config.json")
    assert cfg.model == RunConfig.from_dict(src.config).model and cfg.preset == RunConfig.from_dict(src.config).preset
    assert cfg.train.steps == 1 and cfg.train.seed == 7
    out = load_latest(run)
    assert out is not None
    for k in encoder_keys(src.student):
        torch.testing.assert_close(out.student[k], src.student[k], atol=1e-6, rtol=0)
    for k in head_keys:  # the decoder started fresh
        assert not torch.allclose(out.student[k], src.student[k], atol=1e-3), k
    for k, v in out.teacher.items():  # EMA of two equal things: still the source encoder
        name = k.removeprefix("teacher.parts.")
        part, rest = name.split(".", 1)
        student_key = {"encoder": "encoder.", "context": "frontend.context.", "local": "frontend.local."}[part] + rest
        torch.testing.assert_close(v, src.student[student_key].float(), atol=1e-6, rtol=0)


def test_init_refuses_architecture_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src_run = pretrain_source(tmp_path)
    capsys.readouterr()
    base = ["pretrain", "--init", str(src_run), "--data", "builtin:digits:train", "--out", str(tmp_path / "r")]
    assert main([*base, *sets("model.encoder.depth=3")]) == 2
    err = capsys.readouterr().err
    assert "model.encoder.depth" in err and "--init" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--preset", "image-tiny"]) == 2
    assert "--init takes the preset" in capsys.readouterr().err
    assert main([*base, "--modality", "audio"]) == 2
    assert "image model" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_check_init_config_allows_training_settings() -> None:
    from data2vec.presets import preset

    src = preset("image-tiny", 2)
    ok = apply_overrides(src, ["model.encoder.drop_path=0.1", "model.decoder.layers=2", "optim.lr=1e-4"])
    check_init_config(src, ok)
    for bad in ("model.encoder.num_heads=4", "model.image.patch_size=8", "model.version=1"):
        try:
            changed = apply_overrides(src, [bad])
        except ConfigError:
            continue  # not even a valid config
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            check_init_config(src, changed)


def test_init_from_an_imported_fairseq_model(tmp_path: Path) -> None:
    from tests.test_fairseq import image_v2_checkpoint

    _, src, path = image_v2_checkpoint(tmp_path)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    args = ["pretrain", "--init", str(path), "--data", str(folder), "--out", str(run), "--no-progress"]
    extra = sets("train.steps=1", "data.batch_size=4", "data.num_workers=0", "train.precision=fp32")
    assert main([*args, *extra]) == 0
    line = next(ln for ln in (run / "train.log").read_text().splitlines() if ln.startswith("initialised from"))
    assert "fairseq" in line and "fresh: head." in line
