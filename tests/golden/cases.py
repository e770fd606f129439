"""Golden pretraining runs: tiny CPU fp32 runs whose every logged number, final weights,
checkpoint set and summary were recorded once (`python -m tests.golden.cases record`) and are
compared bit for bit by tests/test_golden.py. They pin the training loop's behaviour so that
it can be restructured without changing a single float.

Each case writes its inputs (wav clips, a text corpus) from a fixed seed into its own folder,
so the recording depends on nothing outside this file and the package.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from tests.helpers import tiny_audio_config, tiny_text_config

import data2vec.model as model_module
from data2vec.config import EncoderConfig, RunConfig, apply_overrides
from data2vec.presets import preset

HERE = Path(__file__).parent
RECORDED = HERE / "recorded"
OLD_RUN = HERE / "old_run"
"""A run directory written by the code before the engine refactor, stopped after step 3."""
VOLATILE = ("samples_per_sec",)
"""metrics.jsonl fields that depend on the clock."""

SHORT = ["train.steps=6", "train.ckpt_every=3", "train.keep_last=3", "train.device=cpu", "train.log_every=1"]
IMAGE = [
    "data.path=builtin:digits:train",
    "model.encoder.dim=32",
    "model.encoder.depth=2",
    "model.encoder.num_heads=2",
    "model.decoder.dim=32",
    "model.decoder.groups=4",
    "model.decoder.layers=1",
    "targets.top_k=2",
    "data.batch_size=8",
    "data.num_workers=0",
    "train.precision=fp32",
    "optim.warmup_steps=2",
]


def write_wavs(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        t = np.arange(8000 + 1000 * i) / 16_000
        wav = 0.5 * np.sin(2 * np.pi * (150 + 30 * i) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(folder / f"clip{i}.wav", wav.astype(np.float32), 16_000)
    return folder


def write_corpus(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"line {i} tells about {' '.join(['things'] * (i % 5 + 1))} and other words" for i in range(120)]
    path.write_text("\n".join(lines) + "\n")
    return path


def image(version: int, *extra: str) -> RunConfig:
    return apply_overrides(preset("digits-tiny", version), [*IMAGE, *SHORT, *extra])


def audio(work: Path, version: int, *extra: str) -> RunConfig:
    return tiny_audio_config(
        version,
        f"data.path={write_wavs(work / 'wavs')}",
        "data.audio.batch_seconds=1.5",
        "data.audio.max_sample_size=12000",
        "data.num_workers=0",
        *SHORT,
        *extra,
    )


def text(work: Path, version: int, *extra: str) -> RunConfig:
    return tiny_text_config(
        version,
        f"data.path={write_corpus(work / 'corpus.txt')}",
        "data.text.vocab_size=300",
        "data.batch_size=4",
        "data.num_workers=0",
        *SHORT,
        *extra,
    )


def joint(work: Path, step: str) -> Any:
    from data2vec.joint import joint_config

    enc = EncoderConfig(dim=32, depth=2, num_heads=2, mlp_ratio=2.0, norm_eps=1e-5, input_norm=True)
    small = ["model.decoder.dim=32", "model.decoder.groups=4", "model.decoder.layers=1", "targets.top_k=2"]
    members = {
        "image": apply_overrides(
            preset("digits-tiny", 2),
            [
                *small,
                "data.path=builtin:digits:train",
                "data.batch_size=4",
                "data.num_workers=0",
                "masking.num_masks=2",
            ],
        ),
        "audio": apply_overrides(
            preset("audio-tiny", 2),
            [
                *small,
                f"data.path={write_wavs(work / 'wavs')}",
                "model.audio.conv_layers=[[16,10,5],[16,3,2],[16,3,2],[16,3,2],[16,3,2],[16,2,2],[16,2,2]]",
                "model.audio.pos_conv_depth=1",
                "model.audio.pos_conv_groups=4",
                "data.audio.batch_seconds=1.5",
                "data.audio.max_sample_size=12000",
                "data.num_workers=0",
                "masking.num_masks=2",
            ],
        ),
        "text": apply_overrides(
            preset("text-tiny", 2),
            [
                *small,
                "model.decoder.groups=1",
                f"data.path={write_corpus(work / 'corpus.txt')}",
                "data.text.vocab_size=300",
                "data.text.block_size=32",
                "data.batch_size=4",
                "data.num_workers=0",
                "masking.num_masks=2",
            ],
        ),
    }
    cfg = joint_config(members, encoder=enc, ratios={"image": 1.0, "audio": 1.0, "text": 2.0})
    return apply_overrides(
        cfg,
        [f"step={step}", "train.precision=fp32", "optim.warmup_steps=1", *SHORT],
    )


@contextlib.contextmanager
def poisoned_gradient(call: int) -> Iterator[None]:
    """The `call`-th regression loss gets a NaN gradient (one call per step in 1.0)."""
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
        return NanGrad.apply(out) if calls["n"] == call else out

    model_module.regression_loss = poisoned  # type: ignore[assignment]
    try:
        yield
    finally:
        model_module.regression_loss = real


@contextlib.contextmanager
def collapse_at_step(bad: int) -> Iterator[None]:
    """The target std of forward pass `bad` reads 0 (two feature_std calls per pass)."""
    real = model_module.feature_std
    calls = {"n": 0}

    def fake(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = real(x)
        return out * 0 if (calls["n"] + 1) // 2 == bad and calls["n"] % 2 == 1 else out

    model_module.feature_std = fake  # type: ignore[assignment]
    try:
        yield
    finally:
        model_module.feature_std = real


def _single(make: Callable[[Path], RunConfig], **kw: Any) -> Callable[[Path], None]:
    def run(work: Path) -> None:
        from data2vec.training import train

        train(make(work), work / "run", progress=False, quiet=True, **kw)

    return run


def _nan(work: Path) -> None:
    from data2vec.training import train

    with poisoned_gradient(call=3):
        train(image(1, "train.on_nan=skip"), work / "run", progress=False, quiet=True)


def _rewind(work: Path) -> None:
    from data2vec.training import train

    cfg = image(
        2,
        "train.collapse_after=1",
        "train.on_collapse=rewind",
        "train.rewind_lr_factor=0.5",
        "train.min_target_std=0.1",
    )
    with collapse_at_step(5):
        train(cfg, work / "run", progress=False, quiet=True)


def _stop_resume(work: Path) -> None:
    from data2vec.training import train

    cfg = image(2, "model.encoder.dropout=0.1")
    train(cfg, work / "run", progress=False, quiet=True, stop_after=3)
    train(cfg, work / "run", resume=True, progress=False, quiet=True)


def _joint(step: str, stop: bool = False) -> Callable[[Path], None]:
    def run(work: Path) -> None:
        from data2vec.training import train_joint

        if stop:
            train_joint(joint(work, step), work / "run", progress=False, quiet=True, stop_after=3)
            train_joint(None, work / "run", resume=True, progress=False, quiet=True)
        else:
            train_joint(joint(work, step), work / "run", progress=False, quiet=True)

    return run


CASES: dict[str, Callable[[Path], None]] = {
    "image_v1": _single(lambda w: image(1)),
    "image_v2": _single(lambda w: image(2)),
    "image_v2_accum2": _single(lambda w: image(2, "train.grad_accum=2")),
    "audio_v1": _single(lambda w: audio(w, 1)),
    "audio_v2": _single(lambda w: audio(w, 2)),
    "text_v1": _single(lambda w: text(w, 1)),
    "text_v2": _single(lambda w: text(w, 2)),
    "nan_skip": _nan,
    "rewind": _rewind,
    "stop_resume": _stop_resume,
    "joint_one": _joint("one"),
    "joint_mixed": _joint("mixed", stop=True),
}


def outcome(run: Path) -> dict[str, Any]:
    """What a golden run is compared on: metrics rows (clock fields dropped), summary.json, the
    checkpoint file set, and the final student + teacher weights."""
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    for r in rows:
        for k in VOLATILE:
            r.pop(k, None)
    ck = run / "checkpoints"
    files = sorted(str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file())
    final = sorted(p for p in ck.iterdir() if p.is_dir())[-1]
    weights = {**load_file(str(final / "student.safetensors")), **load_file(str(final / "teacher.safetensors"))}
    return {
        "metrics": rows,
        "summary": json.loads((run / "summary.json").read_text()),
        "files": files,
        "weights": weights,
    }


def record(out: Path = RECORDED, work_root: Path | None = None) -> None:
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work_root or tmp)
        for name, run in CASES.items():
            work = root / name
            run(work)
            got = outcome(work / "run")
            dest = out / name
            dest.mkdir(exist_ok=True)
            (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in got["metrics"]))
            (dest / "summary.json").write_text(json.dumps(got["summary"], indent=2) + "\n")
            (dest / "files.json").write_text(json.dumps(got["files"], indent=2) + "\n")
            save_file({k: v.contiguous() for k, v in got["weights"].items()}, str(dest / "final.safetensors"))
            print(f"recorded {name}: {len(got['metrics'])} rows, {len(got['weights'])} tensors")


def record_old_run(dest: Path = OLD_RUN) -> None:
    """The run directory of `stop_resume` after its first invocation (stopped at step 3)."""
    import tempfile

    from data2vec.training import train

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        train(image(2, "model.encoder.dropout=0.1"), run, progress=False, quiet=True, stop_after=3)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(run, dest, ignore=shutil.ignore_patterns("loss.png"))


if __name__ == "__main__":
    if sys.argv[1:] == ["record"]:
        record()
        record_old_run()
    else:
        sys.exit("usage: python -m tests.golden.cases record")
