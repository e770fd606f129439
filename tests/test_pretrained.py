"""`data2vec.pretrained`: every source the one loading chain reads, and the one weight loader."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tests.conftest import make_tiny_config
from tests.helpers import tiny_text_config
from tests.test_fairseq import FAIRSEQ_TINY, needs_fairseq_tiny

from data2vec.checkpoint import CheckpointError, list_checkpoints, save_checkpoint
from data2vec.cli import main
from data2vec.config import ConfigError, RunConfig
from data2vec.interop import InteropError, save_pretrained
from data2vec.interop.conversion import convert
from data2vec.joint import JointConfig, JointData2Vec, joint_config
from data2vec.model import Data2Vec
from data2vec.pretrained import (
    MAY_STAY_FRESH,
    ModalityRequired,
    Pretrained,
    build_model,
    load_encoder_weights,
    load_model,
    load_pretrained,
    load_student_weights,
)

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def built(cfg: RunConfig, seed: int = 0) -> Data2Vec:
    torch.manual_seed(seed)
    return Data2Vec.from_config(cfg).eval()


def save_step(run: Path, step: int, model: Data2Vec | JointData2Vec, config: dict[str, object]) -> Path:
    save_checkpoint(run, step, model.student_state_dict(), model.teacher_state_dict(), config, {"step": step}, 5)
    return list_checkpoints(run)[-1]


def make_run(run: Path, cfg: RunConfig, seeds: tuple[int, ...] = (0,)) -> list[Data2Vec]:
    """A run directory with one checkpoint per seed (steps 1, 2, ...), each a different model."""
    run.mkdir(parents=True)
    cfg.save(run / "config.json")
    models = [built(cfg, seed) for seed in seeds]
    for step, model in enumerate(models, start=1):
        save_step(run, step, model, cfg.to_dict())
    return models


def same_features(a: Data2Vec, b: Data2Vec, x: torch.Tensor = IMAGES) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval().encode(x).x, b.eval().encode(x).x)


def assert_teacher_is_student(model: Data2Vec) -> None:
    for name, part in model.student_parts().items():
        for k, v in part.state_dict().items():
            assert torch.equal(model.teacher[name].state_dict()[k], v.float()), (name, k)


# ----------------------------------------------------------------------------- our runs and checkpoints


def test_run_directory_gives_its_newest_checkpoint_that_verifies(tmp_path: Path) -> None:
    cfg = make_tiny_config(2)
    first, second = make_run(tmp_path / "run", cfg, seeds=(0, 1))
    pre = load_pretrained(tmp_path / "run")
    assert pre.kind == "checkpoint" and pre.config == cfg and pre.path == str(tmp_path / "run")
    assert "step 2" in pre.source and not any(k.startswith("teacher.") for k in pre.student)
    model = build_model(pre)
    assert not model.training and same_features(model, second)
    assert_teacher_is_student(model)
    # the newest checkpoint corrupt: the one before it, with a warning
    newest = list_checkpoints(tmp_path / "run")[-1]
    (newest / "student.safetensors").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        pre = load_pretrained(tmp_path / "run")
    assert "step 1" in pre.source and same_features(build_model(pre), first)
    # none verifies
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (list_checkpoints(tmp_path / "run")[0] / "student.safetensors").write_bytes(b"broken")
        with pytest.raises(CheckpointError, match="no checkpoint that verifies"):
            load_pretrained(tmp_path / "run")


def test_checkpoint_folder(tmp_path: Path) -> None:
    cfg = make_tiny_config(1)
    first, _ = make_run(tmp_path / "run", cfg, seeds=(0, 1))
    ckpt = list_checkpoints(tmp_path / "run")[0]
    pre = load_pretrained(ckpt)
    assert pre.kind == "checkpoint" and pre.path == str(ckpt) and "step 1" in pre.source
    assert same_features(load_model(ckpt), first)
    (ckpt / "student.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match=str(ckpt)):
        load_pretrained(ckpt)


def test_a_run_without_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_pretrained(tmp_path / "run")


def test_our_converted_folder(tmp_path: Path) -> None:
    cfg = make_tiny_config(2)
    (model,) = make_run(tmp_path / "run", cfg)
    save_pretrained(build_model(load_pretrained(tmp_path / "run")), tmp_path / "ours", config=cfg)
    pre = load_pretrained(tmp_path / "ours")
    assert pre.kind == "data2vec" and pre.config == cfg and pre.head is None
    assert same_features(build_model(pre), model)
    # what `convert --to data2vec` writes reads the same
    out, read = convert(tmp_path / "run", tmp_path / "converted")
    assert read.kind == "checkpoint" and load_pretrained(out).config == cfg
    assert same_features(load_model(out), model)
    (tmp_path / "ours" / "model.safetensors").unlink()
    with pytest.raises(InteropError, match="no model.safetensors"):
        load_pretrained(tmp_path / "ours")


# ----------------------------------------------------------------------------- joint runs


def joint_run(tmp_path: Path) -> tuple[Path, JointConfig, JointData2Vec]:
    """A joint run directory (image + text, one encoder) with one checkpoint, no training."""
    cfg = joint_config({"image": make_tiny_config(2), "text": tiny_text_config(2, "model.text.vocab_size=300")})
    torch.manual_seed(0)
    model = JointData2Vec(cfg).eval()
    run = tmp_path / "joint"
    run.mkdir()
    cfg.save(run / "config.json")
    save_step(run, 3, model, cfg.to_dict())
    return run, cfg, model


def test_joint_run_and_checkpoint_need_a_modality(tmp_path: Path) -> None:
    run, cfg, joint = joint_run(tmp_path)
    for source in (run, list_checkpoints(run)[-1]):
        with pytest.raises(ModalityRequired, match=r"joint checkpoint \(image, text\).*--modality"):
            load_pretrained(source)
        pre = load_pretrained(source, modality="image")
        assert pre.kind == "joint" and pre.config == cfg.member("image") and "image of joint" in pre.source
        model = build_model(pre)
        assert same_features(model, joint.member("image"))
        view = joint.member("image").state_dict()
        for k, v in model.student_state_dict().items():
            assert torch.equal(v, view[k]), k
    text = load_model(run, "text")
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(text.encode(ids).x, joint.member("text").eval().encode(ids).x)
    with pytest.raises(ConfigError, match="'audio' is not in this joint model"):
        load_pretrained(run, "audio")


def test_convert_cli_reads_a_joint_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, cfg, joint = joint_run(tmp_path)
    assert main(["convert", str(run), str(tmp_path / "image")]) == 2
    assert "--modality" in capsys.readouterr().err
    assert not (tmp_path / "image").exists()
    assert main(["convert", str(run), str(tmp_path / "image"), "--modality", "image"]) == 0
    assert "image of joint checkpoint" in capsys.readouterr().out
    pre = load_pretrained(tmp_path / "image")
    assert pre.kind == "data2vec" and pre.config == cfg.member("image")
    assert same_features(build_model(pre), joint.member("image"))


# ----------------------------------------------------------------------------- transformers


def test_transformers_folder_and_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    T = pytest.importorskip("transformers")
    import data2vec.interop.hf.files as hf_files

    config = T.Data2VecVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    T.Data2VecVisionModel(config).eval().save_pretrained(tmp_path / "hf")
    pre = load_pretrained(tmp_path / "hf")
    assert pre.kind == "transformers" and pre.config.model.version == 1 and pre.head is not None
    assert pre.source == f"transformers {tmp_path / 'hf'}"
    model = build_model(pre)
    assert not model.training
    # a hub id: downloaded (here: the local folder stands in for the hub's copy)
    monkeypatch.setattr(hf_files, "_download", lambda repo_id: tmp_path / "hf")
    hub = load_pretrained("someone/tiny-data2vec-vision")
    assert hub.kind == "transformers" and hub.path == "someone/tiny-data2vec-vision"
    assert same_features(build_model(hub), model)
    with pytest.raises(ConfigError, match="modality: .* is a image model, not audio"):
        load_pretrained(tmp_path / "hf", modality="audio")


# ----------------------------------------------------------------------------- fairseq


def test_fairseq_checkpoint_file(tmp_path: Path) -> None:
    from tests.test_fairseq import image_v2_checkpoint

    _, src, path = image_v2_checkpoint(tmp_path)
    pre = load_pretrained(path)
    assert pre.kind == "fairseq" and pre.source == f"fairseq {path}"
    assert not any(k.startswith("teacher.") for k in pre.student)
    assert same_features(build_model(pre), src)
    # the same file in torch's legacy (non-zip) format
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(path, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    assert same_features(load_model(legacy), src)


@needs_fairseq_tiny
@pytest.mark.parametrize(
    "name", ["d2v2_image", "d2v2_image_dictconfig", "d2v1_audio", "d2v1_audio_legacy", "d2v2_audio", "d2v2_text"]
)
def test_checkpoints_written_by_fairseq(name: str) -> None:
    """Real fairseq files: read by the chain, and the model computes fairseq's last block output
    (the first input, alone where the reference has it)."""
    assert FAIRSEQ_TINY is not None
    pre = load_pretrained(FAIRSEQ_TINY / f"{name}.pt")
    assert pre.kind == "fairseq" and pre.source == f"fairseq {FAIRSEQ_TINY / f'{name}.pt'}"
    model = build_model(pre)
    ref = torch.load(
        FAIRSEQ_TINY / f"ref_{name.removesuffix('_dictconfig').removesuffix('_legacy')}.pt", weights_only=True
    )
    modality = pre.config.model.modality
    if modality == "image":
        x = ref["image"][:1]
    elif modality == "audio":
        x = ref["wav"][:1, : int((~ref["padding_mask"][0]).sum())]
    else:
        x = ref["tokens"][:1]
    last = len(model.encoder.prenet) + len(model.encoder.blocks)
    expected = ref.get(f"alone0_layer{last}", ref[f"layer{last}"][:1])
    with torch.no_grad():
        out = model.encode(x).layers[-1].x
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- what is not a model


def test_sources_that_are_not_models(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    for p in (tmp_path / "notes.txt", tmp_path / "folder"):
        with pytest.raises(InteropError, match="not a model this library reads"):
            load_pretrained(p)
    make_run(tmp_path / "run", make_tiny_config(2))
    with pytest.raises(ConfigError, match="modality: .* is a image model, not text"):
        load_pretrained(tmp_path / "run", modality="text")


# ----------------------------------------------------------------------------- the weight loader


def test_load_student_weights_exempts_only_the_head_and_the_mask_vector() -> None:
    cfg = make_tiny_config(1)
    src = built(cfg, seed=1).student_state_dict()
    assert MAY_STAY_FRESH == ("head.", "frontend.context.mask_emb")
    model = built(cfg)
    assert load_student_weights(model, src, "src") == []
    assert same_features(model, build_model(Pretrained(cfg, src, "src", "src", "checkpoint")))
    assert_teacher_is_student(model)
    # the head and the mask vector may be missing: they stay fresh and are returned
    encoder_only = {k: v for k, v in src.items() if not k.startswith(MAY_STAY_FRESH)}
    assert "frontend.context.mask_emb" in src
    fresh = load_student_weights(built(cfg), encoder_only, "src")
    assert fresh == sorted(k for k in src if k.startswith(MAY_STAY_FRESH)) and fresh
    # anything else missing, surplus or misshapen is refused by name
    lacking = {k: v for k, v in src.items() if k != "encoder.blocks.0.mlp.fc1.weight"}
    with pytest.raises(ConfigError, match=r"weights: the model built from the config lacks encoder\.blocks\.0\.mlp"):
        load_student_weights(built(cfg), lacking, "src")
    with pytest.raises(ConfigError, match=r"has no place for encoder\.extra \(src\)"):
        load_student_weights(built(cfg), {**src, "encoder.extra": torch.zeros(1)}, "src")
    bad = {**src, "encoder.blocks.1.mlp.fc2.bias": torch.zeros(5)}
    with pytest.raises(
        ConfigError, match=r"encoder\.blocks\.1\.mlp\.fc2\.bias: shape \(5,\) in src.*data\.text\.tokenizer"
    ):
        load_student_weights(built(cfg), bad, "src")


def test_load_encoder_weights_is_what_init_from_does(tmp_path: Path) -> None:
    from data2vec.training import init_from

    cfg = make_tiny_config(2)
    make_run(tmp_path / "run", cfg, seeds=(5,))
    pre = load_pretrained(tmp_path / "run")
    ours, theirs = built(cfg, seed=9), built(cfg, seed=9)
    head = {k: v.clone() for k, v in ours.student_state_dict().items() if k.startswith("head.")}
    fresh = load_encoder_weights(ours, pre)
    _, expected = init_from(theirs, pre)
    assert fresh == expected == sorted(head)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k, v in head.items():  # the head is never loaded, even though the source has one
        assert torch.equal(ours.state_dict()[k], v)
    assert_teacher_is_student(ours)


def test_load_encoder_weights_errors_match_init_from(tmp_path: Path) -> None:
    from data2vec.training import init_from

    cfg = make_tiny_config(2)
    src = built(cfg).student_state_dict()
    cases = {
        "lacks": {k: v for k, v in src.items() if k != "encoder.blocks.0.attn.qkv.weight"},
        "has no place for": {**src, "encoder.extra.weight": torch.zeros(2)},
        "shape": {**src, "frontend.local.proj.bias": torch.zeros(3)},
    }
    for word, student in cases.items():
        pre = Pretrained(cfg, student, "fairseq x.pt", "x.pt", "fairseq")
        with pytest.raises(ConfigError) as ours:
            load_encoder_weights(built(cfg), pre)
        with pytest.raises(ConfigError) as theirs:
            init_from(built(cfg), pre)
        assert str(ours.value) == str(theirs.value) and word in str(ours.value)
        assert word == "shape" or str(ours.value).startswith("init: the model built from the config")


def test_a_joint_member_continues_pretraining(tmp_path: Path) -> None:
    run, cfg, joint = joint_run(tmp_path)
    pre = load_pretrained(run, "image")
    model = built(pre.config, seed=3)
    fresh = load_encoder_weights(model, pre)
    assert fresh and all(k.startswith("head.") for k in fresh)
    assert same_features(model, joint.member("image"))


def test_text_weights_of_another_vocabulary_name_the_tokenizer(tmp_path: Path) -> None:
    cfg = tiny_text_config(2, "model.text.vocab_size=300")
    model = built(cfg)
    save_pretrained(model, tmp_path / "ours", config=cfg)
    data = json.loads((tmp_path / "ours" / "config.json").read_text())
    data["model"]["text"]["vocab_size"] = 200  # as if built for another tokenizer
    (tmp_path / "ours" / "config.json").write_text(json.dumps(data))
    pre = load_pretrained(tmp_path / "ours")
    with pytest.raises(ConfigError, match=r"shape \(300, 32\) in data2vec .*data\.text\.tokenizer"):
        build_model(pre)
    ids = torch.randint(5, 200, (2, 10))
    assert same_features(build_model(replace(pre, config=cfg)), model, ids)


def test_pretrain_init_from_a_joint_run_asks_for_the_modality(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _, _ = joint_run(tmp_path)
    out = tmp_path / "continued"
    args = ["pretrain", "--init", str(run), "--data", "builtin:digits:train", "--out", str(out), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is a joint checkpoint" in err and "name the modality to load (--modality" in err
    assert not out.exists()  # refused before anything was written (--modality M loads one member)
