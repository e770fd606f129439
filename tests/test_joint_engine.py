"""Joint runs on the one training engine: what single-modality runs do, joint runs do too
(local_lr_scale, a checkpoint and a report on bad input, rewinds, the online probe per modality,
--init from a joint or a single-modality model, torchrun), and FSDP is refused in one place.
Each of these failed (or was refused) when joint runs had their own copy of the loop."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tests.test_distributed import _torchrun
from tests.test_finetune import write_images
from tests.test_joint import ENC, SR, members, tiny_joint

import data2vec
from data2vec.checkpoint import list_checkpoints, load_checkpoint
from data2vec.cli import main
from data2vec.config import ConfigError, apply_overrides
from data2vec.data.errors import BadInputError
from data2vec.joint import JOINT_FSDP_REFUSAL, JointConfig, JointData2Vec, member_weights
from data2vec.training import TrainingStopped, resume, train, train_joint
from data2vec.training.init import init_joint


def _quiet(cfg: object, run: Path, **kw: object) -> data2vec.JointTrainResult:
    return train_joint(cfg, run, progress=False, quiet=True, **kw)  # type: ignore[arg-type]


def _rows(run: Path) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_joint_runs_honour_local_lr_scale(tmp_path: Path) -> None:
    """One step at local_lr_scale 0.5 moves the local encoders half as far as at 1 (AdamW's first
    step is lr x sign-like), and everything else the same."""
    base = tiny_joint(tmp_path, ("image", "text"), step="mixed", steps=1, ckpt_every=1)
    base = apply_overrides(base, ["optim.weight_decay=0.0", "optim.warmup_steps=0"])
    moved = {}
    for scale in (1.0, 0.5):
        cfg = apply_overrides(base, [f"optim.local_lr_scale={scale}"])
        run = _quiet(cfg, tmp_path / f"lr{scale}")
        torch.manual_seed(base.train.seed)  # the initial weights, as train_joint made them
        start = JointData2Vec(JointConfig.load(run.run_dir / "config.json")).state_dict()
        end = load_checkpoint(list_checkpoints(run.run_dir)[-1]).student
        moved[scale] = {k: end[k] - start[k] for k in end if k in start and start[k].is_floating_point()}
    local = [k for k in moved[1.0] if ".local." in f".{k}" and moved[1.0][k].abs().max() > 1e-6]
    assert local, "no local-encoder weight moved"
    for k in local:
        torch.testing.assert_close(moved[0.5][k], 0.5 * moved[1.0][k], rtol=1e-3, atol=1e-7, msg=k)
    encoder = [k for k in moved[1.0] if k.startswith("encoder.") and moved[1.0][k].abs().max() > 1e-6]
    assert encoder and all(torch.equal(moved[0.5][k], moved[1.0][k]) for k in encoder)


def _nan_clip(folder: Path) -> Path:
    t = np.arange(9000) / SR
    wav = (0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    wav[4000] = np.nan  # the header is fine: found when the clip is read
    sf.write(folder / "nan.wav", wav, SR, subtype="FLOAT")
    return folder / "nan.wav"


def test_joint_bad_input_checkpoints_the_completed_steps_and_reports_skips(tmp_path: Path) -> None:
    cfg = tiny_joint(tmp_path, ("audio", "text"), step="mixed", steps=6, ckpt_every=100)
    bad = _nan_clip(Path(cfg.section("audio").data.path))
    # data.on_bad_input=skip: the run finishes and reports the file, in train.log and summary.json
    skip = apply_overrides(cfg, ["audio.data.on_bad_input=skip"])
    result = _quiet(skip, tmp_path / "skip")
    assert result.step == 6 and result.skipped_inputs and all(str(bad) in s for s in result.skipped_inputs)
    log = (tmp_path / "skip" / "train.log").read_text()
    assert f"skipped 1 bad input(s):\n  {bad}" in log
    assert json.loads((tmp_path / "skip" / "summary.json").read_text())["skipped_inputs"] == 1
    # data.on_bad_input=fail: the steps done before the bad clip are kept in a checkpoint
    fail = apply_overrides(cfg, ["audio.data.on_bad_input=fail"])
    with pytest.raises(BadInputError, match="nan.wav"):
        _quiet(fail, tmp_path / "fail")
    (ck,) = list_checkpoints(tmp_path / "fail")
    done = load_checkpoint(ck).step
    assert done >= 1, "the bad clip came first: reorder the data for this test"
    assert f"stopped on bad input at step {done}" in (tmp_path / "fail" / "train.log").read_text()
    assert [r["step"] for r in _rows(tmp_path / "fail")] == list(range(1, done + 1))


def test_joint_collapse_rewinds_then_stops(tmp_path: Path) -> None:
    cfg = tiny_joint(
        tmp_path,
        ("image", "text"),
        step="mixed",
        steps=6,
        ckpt_every=2,
        collapse_after=2,
        min_target_std=100.0,  # every step after the warm-up counts as collapsed
        on_collapse="rewind",
        max_rewinds=2,
    )
    with pytest.raises(TrainingStopped, match=r"collapse at step 3 \(image\)"):
        _quiet(cfg, tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Rewound to step 2 (rewind 1 of 2); learning rate now x0.5" in log
    assert "Rewound to step 2 (rewind 2 of 2); learning rate now x0.25" in log
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rewinds"] == 2 and summary["lr_scale"] == 0.25
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3]  # the collapsed step 3, once
    assert [load_checkpoint(p).step for p in list_checkpoints(tmp_path / "run")] == [2]


def test_joint_online_probe_per_modality(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs" / "train", n=4)
    write_images(tmp_path / "imgs" / "eval", n=2)
    tsv = tmp_path / "labels.tsv"
    words = ("good", "bad", "great", "awful")
    tsv.write_text(
        "sentence\tlabel\n" + "".join(f"line {i} is {w}\t{int(w[0] == 'g')}\n" for i, w in enumerate(words * 2))
    )
    cfg = tiny_joint(tmp_path, ("image", "text"), steps=4, ckpt_every=4)
    probe = ["probe.every=2", "probe.knn_k=3"]
    cfg = apply_overrides(
        cfg,
        [
            *(f"image.{p}" for p in probe),
            f"image.probe.train_data={tmp_path / 'imgs' / 'train'}",
            f"image.probe.eval_data={tmp_path / 'imgs' / 'eval'}",
            "text.probe.every=4",
            "text.probe.knn_k=3",
            f"text.probe.train_data={tsv}",
            f"text.probe.eval_data={tsv}",
        ],
    )
    _quiet(cfg, tmp_path / "run")
    rows = {r["step"]: r for r in _rows(tmp_path / "run")}
    assert [s for s, r in rows.items() if "probe_knn_layer2_image" in r] == [2, 4]
    assert [s for s, r in rows.items() if "probe_linear_layer2_text" in r] == [4]
    assert not any(k.startswith("probe_") and not k.endswith(("_image", "_text")) for r in rows.values() for k in r)
    assert 0 <= float(rows[4]["probe_knn_layer2_text"]) <= 1  # type: ignore[arg-type]
    for m in ("image", "text"):
        assert (tmp_path / "run" / f"probe_{m}.png").stat().st_size > 0


def test_joint_probe_every_must_be_a_multiple_of_log_every(tmp_path: Path) -> None:
    cfg = tiny_joint(tmp_path, ("image", "text"))
    with pytest.raises(ConfigError, match=r"^text.probe.every: 3 is not a multiple of train.log_every 2"):
        apply_overrides(
            cfg,
            ["train.log_every=2", "text.probe.every=3", "text.probe.train_data=a", "text.probe.eval_data=b"],
        )


def test_joint_init_from_a_joint_run_and_from_a_single_modality_model(tmp_path: Path) -> None:
    cfg = tiny_joint(tmp_path, ("image", "text"), step="mixed", steps=2, ckpt_every=2)
    source = _quiet(cfg, tmp_path / "source")
    src = load_checkpoint(list_checkpoints(source.run_dir)[-1]).student
    # a joint source: every member loaded, teacher = the loaded student
    prepared = JointConfig.load(source.run_dir / "config.json")  # the text vocabulary from its tokenizer
    fresh = JointData2Vec(prepared)
    done = init_joint(fresh, prepared, source.run_dir)
    assert [pre.config.model.modality for pre, _ in done] == ["image", "text"]
    for m in ("image", "text"):
        member = fresh.member(m).state_dict()
        for k, v in member_weights(src, m).items():
            if k.startswith(("frontend.", "encoder.")):
                assert torch.equal(member[k], v), k
    # end to end, resumable: the run records its source
    cont = _quiet(cfg, tmp_path / "cont", init=source.run_dir)
    record = json.loads((tmp_path / "cont" / "init.json").read_text())
    assert record["modalities"] == ["image", "text"] and cont.step == 2
    assert "initialised from" in (tmp_path / "cont" / "train.log").read_text()

    # a single-modality text model with the same encoder: its modality and the shared encoder
    text = members(tmp_path)["text"]
    single_cfg = apply_overrides(
        replace(text, model=replace(text.model, encoder=ENC)),
        ["train.precision=fp32", "train.device=cpu", "train.steps=2", "train.ckpt_every=2"],
    )
    single = train(single_cfg, tmp_path / "single", progress=False, quiet=True)
    joint = apply_overrides(cfg, [f"text.data.text.tokenizer={single.run_dir / 'tokenizer.json'}"])
    _quiet(joint, tmp_path / "from_single", init=single.run_dir)
    record = json.loads((tmp_path / "from_single" / "init.json").read_text())
    assert record["modalities"] == ["text"]


def test_joint_init_refuses_another_tokenizer(tmp_path: Path) -> None:
    """A text model trained with another vocabulary (same size, other corpus) is refused: its
    token embeddings would be read with this run's ids."""
    text = members(tmp_path)["text"]
    other = tmp_path / "other.txt"
    other.write_text(
        "".join(f"quite different words number {i} appear here, {'zebra ' * (i % 4)}\n" for i in range(120))
    )
    single_cfg = apply_overrides(
        replace(text, model=replace(text.model, encoder=ENC)),
        ["train.precision=fp32", "train.device=cpu", "train.steps=1", f"data.path={other}"],
    )
    single = train(single_cfg, tmp_path / "single", progress=False, quiet=True)
    cfg = tiny_joint(tmp_path, ("image", "text"), steps=1)
    with pytest.raises(ConfigError, match="vocabulary differs from this run's"):
        _quiet(cfg, tmp_path / "j", init=single.run_dir)


def test_cli_joint_init_and_single_init_from_a_joint_member(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_joint(tmp_path, ("image", "text"), step="mixed", steps=2, ckpt_every=2)
    source = _quiet(cfg, tmp_path / "source").run_dir
    saved = tmp_path / "joint.json"
    cfg.save(saved)
    args = ["pretrain", "--config", str(saved), "--no-progress", "--init", str(source)]
    assert main([*args, "--out", str(tmp_path / "cont")]) == 0
    assert json.loads((tmp_path / "cont" / "init.json").read_text())["modalities"] == ["image", "text"]
    # one member of the joint run, as a single-modality run
    single = ["pretrain", "--init", str(source), "--modality", "image", "--data", "builtin:digits:train"]
    single += ["--no-progress", "--set", "train.steps=1"]
    assert main([*single, "--out", str(tmp_path / "image")]) == 0
    record = json.loads((tmp_path / "image" / "init.json").read_text())
    assert record["modalities"] == ["image"] and "image of joint" in record["source"]
    assert (
        main(["pretrain", "--init", str(source), "--out", str(tmp_path / "x"), "--data", "builtin:digits:train"]) == 2
    )
    assert "name the modality to load" in capsys.readouterr().err


def test_joint_fsdp_is_refused_with_the_reason(tmp_path: Path) -> None:
    cfg = tiny_joint(tmp_path, ("image", "text"))
    with pytest.raises(ConfigError) as err:
        apply_overrides(cfg, ["train.fsdp=true"])
    assert str(err.value) == JOINT_FSDP_REFUSAL and "train.fsdp" in JOINT_FSDP_REFUSAL


def test_resume_picks_the_run_kind(tmp_path: Path) -> None:
    cfg = tiny_joint(tmp_path, ("image", "text"), step="mixed", steps=3, ckpt_every=1)
    _quiet(cfg, tmp_path / "joint", stop_after=2)
    done = resume(tmp_path / "joint", progress=False, quiet=True)
    assert isinstance(done, data2vec.JointTrainResult) and done.step == 3
    straight = _quiet(cfg, tmp_path / "straight")
    a = load_checkpoint(list_checkpoints(tmp_path / "joint")[-1])
    b = load_checkpoint(list_checkpoints(straight.run_dir)[-1])
    assert all(torch.equal(a.student[k], b.student[k]) for k in b.student)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        resume(tmp_path / "nothing")


def test_the_train_module_is_the_engine() -> None:
    import data2vec.training as training
    from data2vec.train import train as old_path_train
    from data2vec.train import train_joint as old_path_train_joint

    assert old_path_train is training.train and old_path_train_joint is training.train_joint
    assert data2vec.train is training.train and data2vec.resume is training.resume  # still the function


def test_joint_torchrun_two_processes(tmp_path: Path) -> None:
    """Two processes with gloo: a joint run under torchrun gives the one-process weights of the
    same global batch (batch 4 per rank = batch 4 x grad_accum 2), and rank 0 writes the files."""
    # Per-rank random streams (dropout, decoder noise) are off, as in test_distributed.
    off = ["encoder.dropout", "encoder.attn_dropout", "encoder.activation_dropout", "encoder.drop_path"]
    off += ["decoder.mask_noise_std", "decoder.input_dropout"]
    cfg = tiny_joint(tmp_path, ("image", "text"), step="mixed", steps=2, ckpt_every=2)
    cfg = apply_overrides(
        cfg, [f"{m}.model.{k}=0.0" for m in ("image", "text") for k in off] + ["text.model.text.embed_dropout=0.0"]
    )
    saved = tmp_path / "joint.json"
    cfg.save(saved)
    res = _torchrun(tmp_path, 2, ["--config", str(saved), "--out", str(tmp_path / "ddp")])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "x 2 processes" in (tmp_path / "ddp" / "train.log").read_text()
    assert len(_rows(tmp_path / "ddp")) == 2
    single = _quiet(apply_overrides(cfg, ["train.grad_accum=2"]), tmp_path / "single")
    a = load_checkpoint(list_checkpoints(tmp_path / "ddp")[-1])
    b = load_checkpoint(list_checkpoints(single.run_dir)[-1])
    for k, v in b.student.items():
        torch.testing.assert_close(a.student[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_a_finished_run_leaves_no_loader_workers(tmp_path: Path) -> None:
    """The data loaders' worker processes end with the run, not whenever the garbage collector
    finds them (which costs a 5 s timeout per loader)."""
    import gc
    import multiprocessing

    cfg = tiny_joint(tmp_path, ("image", "text"), step="mixed", steps=2, ckpt_every=2)
    cfg = apply_overrides(cfg, ["text.data.num_workers=1"])
    gc.collect()
    before = set(multiprocessing.active_children())
    gc.disable()  # what a busy process looks like: no collection between the run and the check
    try:
        _quiet(cfg, tmp_path / "run")
        assert set(multiprocessing.active_children()) == before
    finally:
        gc.enable()
