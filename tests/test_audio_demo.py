"""The speech demo end to end on a shrunken synthesis set and model (the full demo runs by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("espeakng_loader")

from data2vec.cli import main  # noqa: E402
from data2vec.demo import DEMOS  # noqa: E402
from data2vec.demo_audio import COMMANDS, SynthSpec, cache_root, log_mel, mel_filterbank, probe_set, synthesize  # noqa: E402

SMALL_SET = SynthSpec(sentences=6, train_voices=2, test_voices=1)

SHRINK = [
    "model.encoder.dim=32",
    "model.encoder.depth=2",
    "model.encoder.num_heads=2",
    "model.decoder.dim=32",
    "model.decoder.groups=4",
    "model.decoder.layers=1",
    "model.audio.pos_conv_groups=4",
    "model.audio.conv_layers=[[16,10,5],[16,3,2],[16,3,2],[16,3,2],[16,3,2],[16,2,2],[16,2,2]]",
    "targets.top_k=2",
    "data.audio.batch_seconds=4.0",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(SMALL_SET, tmp_path_factory.mktemp("cache"), quiet=True)


def test_synthesis_is_cached_and_deterministic(corpus: Path, tmp_path: Path) -> None:
    plan = json.loads((corpus / "plan.json").read_text())
    assert len(plan["voices"]) == 3 and plan["words"] == COMMANDS
    sentences = sorted((corpus / "pretrain").glob("*.wav"))
    assert len(sentences) == 6
    words = sorted((corpus / "words").glob("*.wav"))
    assert len(words) == 3 * len(COMMANDS)
    for p in sentences[:2] + words[:3]:
        info = sf.info(p)
        assert info.samplerate == 16_000 and info.frames > 1000
    # a second synthesis of a small spec, in another fresh process, gives the same bytes
    small = SynthSpec(sentences=2, train_voices=1, test_voices=0)
    a = synthesize(small, tmp_path / "a", quiet=True)
    b = synthesize(small, tmp_path / "b", quiet=True)
    for f in ["pretrain/s00000.wav", "pretrain/s00001.wav", "words/v000_w00.wav", "words/v000_w34.wav"]:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    assert synthesize(small, tmp_path / "a", quiet=True) == a  # cached: no new synthesis


def test_cache_location_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "data2vec" / "speech-demo-v1"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "data2vec" / "speech-demo-v1"


def test_probe_clips(corpus: Path) -> None:
    wav, labels, is_train = probe_set(corpus)
    assert wav.shape == (3 * len(COMMANDS), 16_000)
    assert sorted(set(labels.tolist())) == list(range(len(COMMANDS)))
    assert int(is_train.sum()) == 2 * len(COMMANDS)  # the third voice is held out
    assert np.allclose(wav.mean(1), 0, atol=1e-4) and np.allclose(wav.std(1), 1, atol=1e-2)
    again, _, _ = probe_set(corpus)
    assert np.array_equal(wav, again)


def test_log_mel() -> None:
    fb = mel_filterbank(80, 400, 16_000)
    assert fb.shape == (80, 201) and (fb >= 0).all() and (fb.sum(1) > 0).all()
    t = np.arange(16_000) / 16_000
    low, high = log_mel(np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 4000 * t)]).astype(np.float32))
    assert low.shape == (101, 80)
    assert low.mean(0).argmax() < high.mean(0).argmax()


def test_audio_demo_runs_and_reports(
    corpus: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import data2vec.demo_audio as demo_audio

    assert DEMOS["audio"] == "data2vec.demo_audio:run_demo"
    # The CLI path, with the small synthesis set swapped in for the default one.
    monkeypatch.setattr(demo_audio, "SynthSpec", lambda: SMALL_SET)
    monkeypatch.setattr(demo_audio, "cache_root", lambda: corpus.parent)
    sets = [a for s in SHRINK for a in ("--set", s)]
    out = tmp_path / "demo"
    code = main(["demo", "--modality", "audio", "--out", str(out), "--steps", "2", "--no-progress", *sets])
    assert code == 0
    printed = capsys.readouterr().out
    assert "data2vec 2.0 pretrained encoder" in printed and "log-mel" in printed and "35 spoken words" in printed
    probe = json.loads((out / "probe.json").read_text())
    assert probe["steps"] == 2 and probe["probe_test_clips"] == len(COMMANDS)
    for key in ("pretrained", "random_init", "log_mel"):
        assert 0.0 <= probe[key] <= 1.0
    for name in ("loss.png", "metrics.jsonl", "config.json", "train.log"):
        assert (out / name).stat().st_size > 0
