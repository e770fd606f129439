"""Joint multimodal pretraining: one shared encoder, one EMA teacher, one modality or a batch of
every modality per step, exact resume, and per-modality use of a joint checkpoint (extract, finetune inputs, CLI)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from data2vec.checkpoint import list_checkpoints, load_checkpoint
from data2vec.cli import main
from data2vec.config import ConfigError, EncoderConfig, RunConfig, apply_overrides
from data2vec.extract import extract
from data2vec.joint import (
    JointConfig,
    JointData2Vec,
    joint_config,
    member_weights,
    modality_for_step,
    step_plan,
    step_weights,
)
from data2vec.model import Batch, Data2Vec
from data2vec.presets import preset
from data2vec.pretrained import ModalityRequired, load_model, load_pretrained
from data2vec.training import TrainingStopped, train_joint
from data2vec.training.objectives import backward_step

SR = 16_000
ENC = EncoderConfig(dim=32, depth=2, num_heads=2, mlp_ratio=2.0, norm_eps=1e-5, input_norm=True)
SMALL_DECODER = ["model.decoder.dim=32", "model.decoder.groups=4", "model.decoder.layers=1", "targets.top_k=2"]


def write_wavs(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        t = np.arange(8000 + 1000 * i) / SR
        wav = 0.5 * np.sin(2 * np.pi * (150 + 30 * i) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(folder / f"clip{i}.wav", wav.astype(np.float32), SR)
    return folder


def write_text(path: Path) -> Path:
    lines = [f"line {i} tells about {' '.join(['things'] * (i % 5 + 1))} and other words" for i in range(120)]
    path.write_text("\n".join(lines) + "\n")
    return path


def members(tmp_path: Path) -> dict[str, RunConfig]:
    image = apply_overrides(
        preset("digits-tiny", 2),
        [
            *SMALL_DECODER,
            "data.path=builtin:digits:train",
            "data.batch_size=4",
            "data.num_workers=0",
            "masking.num_masks=2",
        ],
    )
    conv = "[[16,10,5],[16,3,2],[16,3,2],[16,3,2],[16,3,2],[16,2,2],[16,2,2]]"
    audio = apply_overrides(
        preset("audio-tiny", 2),
        [
            *SMALL_DECODER,
            f"data.path={write_wavs(tmp_path / 'wavs')}",
            f"model.audio.conv_layers={conv}",
            "model.audio.pos_conv_depth=1",
            "model.audio.pos_conv_groups=4",
            "data.audio.batch_seconds=1.5",
            "data.audio.max_sample_size=12000",
            "masking.num_masks=2",
        ],
    )
    text = apply_overrides(
        preset("text-tiny", 2),
        [
            *SMALL_DECODER,
            "model.decoder.groups=1",
            f"data.path={write_text(tmp_path / 'corpus.txt')}",
            "data.text.vocab_size=300",
            "data.text.block_size=32",
            "data.batch_size=4",
            "masking.num_masks=2",
        ],
    )
    return {"image": image, "audio": audio, "text": text}


def tiny_joint(
    tmp_path: Path, modalities: tuple[str, ...] = ("image", "audio", "text"), step: str = "one", **train: object
) -> JointConfig:
    ms = members(tmp_path)
    first = ms[modalities[0]]
    cfg = joint_config(
        {m: ms[m] for m in modalities},
        encoder=ENC,
        ratios={"image": 1.0, "audio": 1.0, "text": 2.0},
        optim=first.optim,
        train=first.train,
    )
    overrides = [
        f"step={step}",
        "train.precision=fp32",
        "train.device=cpu",
        "train.log_every=1",
        "optim.warmup_steps=1",
    ]
    return apply_overrides(cfg, overrides + [f"train.{k}={json.dumps(v)}" for k, v in train.items()])


def test_config_round_trip_and_checks(tmp_path: Path) -> None:
    cfg = tiny_joint(tmp_path, steps=4)
    assert cfg.modalities == ("image", "audio", "text")
    assert JointConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.member("audio").model.encoder == ENC and not cfg.member("audio").model.audio.alibi
    other = apply_overrides(cfg.section("text"), ["model.encoder.depth=3"])
    with pytest.raises(ConfigError, match="text.model.encoder: differs"):
        JointConfig(image=cfg.image, text=other)
    with pytest.raises(ConfigError, match="ratios.text"):
        apply_overrides(cfg, ["ratios.text=0"])
    with pytest.raises(ConfigError, match="not in this joint model"):
        JointConfig(image=cfg.image).member("audio")


def test_step_plan_is_pure_and_follows_the_ratios() -> None:
    mods, probs = ("image", "audio", "text"), [0.25, 0.25, 0.5]
    plan = [modality_for_step(3, s, mods, probs) for s in range(4000)]
    assert plan == [modality_for_step(3, s, mods, probs) for s in range(4000)]
    share = {m: plan.count(m) / len(plan) for m in mods}
    assert abs(share["text"] - 0.5) < 0.03 and abs(share["image"] - 0.25) < 0.03
    assert plan != [modality_for_step(4, s, mods, probs) for s in range(4000)]


def test_one_encoder_one_teacher_shared_by_every_modality(tmp_path: Path) -> None:
    cfg = tiny_joint(tmp_path)
    torch.manual_seed(0)
    model = JointData2Vec(cfg)
    enc_ids = {id(p) for p in model.encoder.parameters()}
    for m in cfg.modalities:
        view = model.member(m)
        assert view.encoder is model.encoder and view.frontend is model.frontends[m]
        assert view.teacher["encoder"] is model.teacher["encoder"]
    # State dict: the encoder once, each front-end and decoder once, teacher parts per ema_scope.
    keys = model.student_state_dict().keys()
    assert not any(".encoder." in k for k in keys if not k.startswith("encoder."))
    assert set(model.teacher.parts) == {"encoder", "image", "audio"}  # text: encoder only
    # Every modality's loss sends gradient into the same encoder parameters.
    model.train()
    g = torch.Generator().manual_seed(0)
    batches = tiny_batches()
    for m, batch in batches.items():
        model.zero_grad(set_to_none=True)
        model(batch, m, g).loss.backward()
        with_grad = {id(p) for p in model.parameters() if p.grad is not None}
        assert enc_ids <= with_grad, m
        others = [f for n, f in model.frontends.items() if n != m]
        assert all(p.grad is None for f in others for p in f.parameters()), m


def tiny_batches() -> dict[str, Batch]:
    return {
        "image": Batch(torch.randn(2, 1, 32, 32)),
        "audio": Batch(torch.randn(2, 8000)),
        "text": Batch(torch.randint(5, 300, (2, 24))),
    }


def test_compiled_joint_model_computes_like_eager(tmp_path: Path) -> None:
    """`train.compile` in a joint run compiles the shared encoder's blocks (student and teacher)
    in place: same parameter names, same losses for every modality. Eval mode: compiled dropout
    draws from its own random stream, so only dropout-free passes can match."""
    cfg = tiny_joint(tmp_path, compile=True)
    torch.manual_seed(0)
    eager = JointData2Vec(cfg).eval()
    compiled = JointData2Vec(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    teacher_blocks = compiled.teacher["encoder"].blocks
    assert all(b._compiled_call_impl is not None for b in [*compiled.encoder.blocks, *teacher_blocks])
    for m, batch in tiny_batches().items():
        a = eager(batch, m, torch.Generator().manual_seed(1)).loss
        b = compiled(batch, m, torch.Generator().manual_seed(1)).loss
        assert float(b) == pytest.approx(float(a), rel=1e-3), m  # fused kernels reorder float sums


def test_local_collapse_in_joint_runs_names_the_modality(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import data2vec.model as model_module

    monkeypatch.setattr(model_module, "relative_std", lambda x: torch.zeros(()))
    cfg = tiny_joint(
        tmp_path,
        ("image", "text"),
        step="mixed",
        steps=3,
        collapse_after=1,
        ckpt_every=10,
        min_pred_std=0,
        min_target_std=0,
    )
    train_joint(cfg, tmp_path / "warn", progress=False, quiet=True)
    log = (tmp_path / "warn" / "train.log").read_text()
    assert log.count("image: warning: local_std") == 1 and log.count("text: warning: local_std") == 1
    with pytest.raises(TrainingStopped, match=r"collapse at step 2 \(image\).*local std 0.0000"):
        train_joint(apply_overrides(cfg, ["train.min_local_std=0.05"]), tmp_path / "stop", progress=False, quiet=True)


def test_step_kind_is_validated(tmp_path: Path) -> None:
    cfg = tiny_joint(tmp_path)
    assert apply_overrides(cfg, ["step=mixed"]).step == "mixed"
    with pytest.raises(ConfigError, match="step: 'both' is not one of 'one', 'mixed'"):
        apply_overrides(cfg, ["step=both"])
    with pytest.raises(ConfigError, match="step: 'both' is not one of 'one', 'mixed'"):
        replace(cfg, step="both")  # type: ignore[arg-type]


def test_mixed_step_sends_every_modality_gradient_in_one_step(tmp_path: Path) -> None:
    cfg = tiny_joint(tmp_path, step="mixed")
    weights = step_weights(cfg, 0)
    assert weights == {"image": 0.25, "audio": 0.25, "text": 0.5} and step_weights(cfg, 7) == weights
    torch.manual_seed(0)
    model = JointData2Vec(cfg).train()
    metrics, samples = backward_step(model, weights, tiny_batches().__getitem__, cfg.train, torch.device("cpu"))
    assert list(metrics) == list(weights) and samples == 6
    assert all(torch.isfinite(torch.tensor(ms["loss"])) for ms in metrics.values())
    for m in cfg.modalities:
        for part in (model.frontends[m], model.heads[m]):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), m
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_single_modality_joint_starts_like_data2vec(tmp_path: Path) -> None:
    cfg = tiny_joint(tmp_path, ("image",))
    torch.manual_seed(0)
    joint = JointData2Vec(cfg)
    torch.manual_seed(0)
    single = Data2Vec.from_config(cfg.member("image"))
    a, b = member_weights(joint.student_state_dict(), "image"), single.student_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mixed_training_logs_every_modality_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = tiny_joint(tmp_path, step="mixed", steps=3, ckpt_every=3, seed=1)
    full = train_joint(cfg, tmp_path / "full", progress=False, quiet=True)
    assert full.steps_per_modality == {"image": 3, "audio": 3, "text": 3}
    assert step_plan(cfg, 0, 3) == ["image+audio+text"] * 3
    for r in full.history:
        assert r["modality"] == "image+audio+text"
        losses = {m: r[f"loss_{m}"] for m in cfg.modalities}
        assert all(np.isfinite(v) for v in losses.values())
        expected = 0.25 * losses["image"] + 0.25 * losses["audio"] + 0.5 * losses["text"]
        assert r["loss"] == pytest.approx(expected)

    train_joint(cfg, tmp_path / "part", progress=False, quiet=True, stop_after=2)
    resumed = train_joint(None, tmp_path / "part", resume=True, progress=False, quiet=True)
    assert resumed.step == 3 and resumed.steps_per_modality == full.steps_per_modality
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(ln) for ln in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full.history]


def test_joint_training_mixes_modalities_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = tiny_joint(tmp_path, steps=6, ckpt_every=3, seed=1)
    full = train_joint(cfg, tmp_path / "full", progress=False, quiet=True)
    plan = step_plan(full.model.cfg, 0, 6)
    assert [r["modality"] for r in full.history] == plan and len(set(plan)) >= 2
    assert full.steps_per_modality == {m: plan.count(m) for m in cfg.modalities}
    rows = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(f"loss_{r['modality']}" in r for r in rows)
    # EMA: one teacher, moved every step (all of its parts, whatever the step's modality).
    torch.manual_seed(1)
    start = JointData2Vec(full.model.cfg)
    assert not torch.equal(
        start.teacher_state_dict()["teacher.parts.encoder.blocks.0.mlp.fc1.weight"],
        full.model.teacher_state_dict()["teacher.parts.encoder.blocks.0.mlp.fc1.weight"],
    )

    part = train_joint(cfg, tmp_path / "part", progress=False, quiet=True, stop_after=4)
    assert part.step == 4
    resumed = train_joint(cfg, tmp_path / "part", resume=True, progress=False, quiet=True)
    assert resumed.step == 6 and resumed.steps_per_modality == full.steps_per_modality
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [json.loads(ln)["loss"] for ln in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()] == [
        r["loss"] for r in rows
    ]

    # The checkpoint holds every front-end and decoder; each modality loads as a plain model.
    ck = load_checkpoint(list_checkpoints(tmp_path / "full")[-1])
    assert ck.config["kind"] == "joint"
    for m in cfg.modalities:
        assert any(k.startswith(f"frontends.{m}.") for k in ck.student)
        assert any(k.startswith(f"heads.{m}.") for k in ck.student)
    run = tmp_path / "full"
    with pytest.raises(ModalityRequired, match="joint checkpoint"):
        load_pretrained(run)
    inputs = {
        "image": [torch.randn(1, 32, 32), torch.randn(1, 32, 32)],
        "audio": [torch.from_numpy(np.random.default_rng(0).standard_normal(9000).astype(np.float32))],
        "text": [torch.randint(5, 100, (12,))],
    }
    for m in cfg.modalities:
        model = load_model(run, modality=m)
        assert model.cfg.modality == m
        view = full.model.member(m).eval()
        for k, v in model.student_state_dict().items():
            if not k.startswith("head."):
                assert torch.equal(v, view.state_dict()[k]), (m, k)
        feats = extract(model, inputs[m], layers=[-1], pool="mean")
        assert feats[2].shape == (len(inputs[m]), ENC.dim)


def test_cli_joint_pretrain_and_extract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ms = members(tmp_path)
    out = tmp_path / "run"
    sets = [
        "train.steps=2",
        "train.precision=fp32",
        "image.data.batch_size=4",
        "image.data.num_workers=0",
        "audio.data.audio.batch_seconds=1.5",
        "audio.data.audio.max_sample_size=12000",
        "text.data.text.vocab_size=300",
        "text.data.text.block_size=32",
        "text.data.batch_size=4",
        "ratios.text=2",
    ]
    code = main(
        [
            "pretrain",
            "--modality",
            "image,audio,text",
            "--data",
            "image=builtin:digits:train",
            f"audio={ms['audio'].data.path}",
            f"text={ms['text'].data.path}",
            "--out",
            str(out),
            "--no-progress",
            *[a for s in sets for a in ("--set", s)],
        ]
    )
    assert code == 0, capsys.readouterr().err
    saved = JointConfig.load(out / "config.json")
    assert saved.modalities == ("image", "audio", "text") and saved.ratios.text == 2.0
    wav = write_wavs(tmp_path / "more", 2)
    code = main(
        [
            "extract",
            "--checkpoint",
            str(out),
            "--modality",
            "audio",
            "--input",
            str(wav),
            "--out",
            str(tmp_path / "f.npy"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert np.load(tmp_path / "f.npy").shape == (1, 2, saved.encoder.dim)
    assert main(["extract", "--checkpoint", str(out), "--input", str(wav), "--out", str(tmp_path / "g.npy")]) == 2
    assert "--modality" in capsys.readouterr().err

    # finetune takes the task's modality from a joint checkpoint
    rng = np.random.default_rng(0)
    for cls, level in (("bright", 200), ("dark", 40)):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(4):
            arr = np.clip(level + rng.normal(0, 20, (16, 16)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, "L").save(tmp_path / "img" / cls / f"{i}.png")
    img, ft = str(tmp_path / "img"), str(tmp_path / "ft")
    args = ["--train", img, "--eval", img, "--out", ft, "--epochs", "1", "--set", "batch_size=4", "--no-progress"]
    assert main(["finetune", "--checkpoint", str(out), "--task", "image_cls", *args]) == 0
    assert "best accuracy" in capsys.readouterr().out
