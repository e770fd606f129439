"""Speech data: reading, resampling, manifests, bad files, short clips, batching, resume, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data2vec.cli import main
from data2vec.config import AudioDataConfig, RunConfig, apply_overrides
from data2vec.data.audio import (
    AudioBatchSampler,
    AudioPipeline,
    load_audio,
    normalize_waveform,
    plan_batches,
    read_manifest,
    scan_audio,
)
from data2vec.data.errors import BadInputError
from data2vec.data.pipeline import PIPELINES
from data2vec.modalities.audio import conv_output_length
from data2vec.presets import preset

SR = 16_000


def tone(n: int, freq: float = 220.0, rate: int = SR, seed: int = 0) -> np.ndarray:
    t = np.arange(n) / rate
    noise = np.random.default_rng(seed).standard_normal(n) * 0.05
    return (0.5 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write_clips(folder: Path, lengths: list[int], rate: int = SR, ext: str = "wav") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, n in enumerate(lengths):
        p = folder / f"clip{i:03d}.{ext}"
        sf.write(p, tone(n, 110.0 + 20 * i, rate, seed=i), rate)
        paths.append(p)
    return paths


def tiny_cfg(data: Path, version: int = 2, *extra: str) -> RunConfig:
    cfg = apply_overrides(
        preset("audio-tiny", version),
        [
            f"data.path={data}",
            "data.num_workers=0",
            "data.audio.min_sample_size=4000",
            "data.audio.max_sample_size=12000",
            "data.audio.batch_seconds=2.0",
            "data.audio.max_batch_size=0",
            "train.precision=fp32",
            *extra,
        ],
    )
    return cfg


# ---------------------------------------------------------------------- reading


def test_resampling_8k_to_16k_doubles_the_length(tmp_path: Path) -> None:
    p = tmp_path / "a.wav"
    sf.write(p, tone(8001, rate=8000), 8000)
    wav = load_audio(p, 16_000)
    assert wav.dtype == np.float32 and wav.shape == (16_002,)
    # a 220 Hz tone stays a 220 Hz tone
    spectrum = np.abs(np.fft.rfft(wav))
    assert abs(np.argmax(spectrum) * 16_000 / len(wav) - 220) < 2
    assert load_audio(p, 8000).shape == (8001,)


def test_stereo_is_mixed_to_mono(tmp_path: Path) -> None:
    left, right = tone(1000, 300.0), tone(1000, 500.0, seed=1)
    p = tmp_path / "s.flac"
    sf.write(p, np.stack([left, right], axis=1), SR)
    wav = load_audio(p, SR)
    assert wav.shape == (1000,)
    np.testing.assert_allclose(wav, (left + right) / 2, atol=2e-4)  # FLAC is 16-bit


def test_ogg_is_read(tmp_path: Path) -> None:
    p = tmp_path / "o.ogg"
    sf.write(p, tone(SR), SR)
    assert abs(len(load_audio(p, SR)) - SR) < 100


def test_normalisation() -> None:
    w = normalize_waveform(tone(5000) * 7 + 3)
    assert abs(float(w.mean())) < 1e-4 and abs(float(w.std()) - 1) < 1e-3


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty audio"), (b"RIFF\x00\x01junk that is not audio" * 20, "not a readable audio file")],
)
def test_bad_files_are_named(tmp_path: Path, content: bytes, reason: str) -> None:
    write_clips(tmp_path, [8000, 8000])
    bad = tmp_path / "zz_bad.wav"
    if content:
        bad.write_bytes(content)
    else:
        sf.write(bad, np.zeros(0, dtype=np.float32), SR)
    cfg = AudioDataConfig(min_sample_size=4000)
    with pytest.raises(BadInputError, match=reason) as info:
        scan_audio(str(tmp_path), cfg, "fail")
    assert str(bad) in str(info.value)
    source = scan_audio(str(tmp_path), cfg, "skip")
    assert len(source) == 2 and len(source.skipped) == 1 and str(bad) in source.skipped[0]
    with pytest.raises(BadInputError, match=str(bad)):
        load_audio(bad, SR)


def test_unsupported_format_in_a_manifest_is_named(tmp_path: Path) -> None:
    write_clips(tmp_path, [8000])
    odd = tmp_path / "notes.txt"
    odd.write_text("not audio at all\n")
    manifest = tmp_path / "train.tsv"
    manifest.write_text("clip000.wav\t8000\nnotes.txt\n")
    with pytest.raises(BadInputError, match="notes.txt"):
        scan_audio(str(manifest), AudioDataConfig(min_sample_size=4000), "fail")


def test_short_clips_are_dropped_and_counted(tmp_path: Path) -> None:
    write_clips(tmp_path, [8000, 3000, 9000, 3999, 4000])
    source = scan_audio(str(tmp_path), AudioDataConfig(min_sample_size=4000), "fail")
    assert len(source) == 3 and source.too_short == 2
    assert any("dropped 2 clip(s) shorter" in n for n in source.notes())


def test_manifest_forms(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    write_clips(audio / "sub", [8000, 6000], rate=8000)
    # fairseq: the first line is the root folder, then relative paths and sample counts
    fairseq = tmp_path / "fairseq.tsv"
    fairseq.write_text(f"{audio}\nsub/clip000.wav\t16000\nsub/clip001.wav\t12000\n")
    entries = read_manifest(fairseq)
    assert entries == [(audio / "sub/clip000.wav", 16000), (audio / "sub/clip001.wav", 12000)]
    # plain: paths relative to the manifest, counts optional (read from the header, at 16 kHz)
    plain = audio / "list.tsv"
    plain.write_text("sub/clip000.wav\nsub/clip001.wav\n")
    source = scan_audio(str(plain), AudioDataConfig(min_sample_size=4000), "fail")
    assert [c.samples for c in source.clips] == [16000, 12000]


def test_folder_scan_is_recursive_and_sorted(tmp_path: Path) -> None:
    write_clips(tmp_path / "b", [8000], ext="flac")
    write_clips(tmp_path / "a", [8000, 8000])
    (tmp_path / "readme.txt").write_text("ignored")
    source = scan_audio(str(tmp_path), AudioDataConfig(min_sample_size=4000), "fail")
    assert [Path(c.path).relative_to(tmp_path).as_posix() for c in source.clips] == [
        "a/clip000.wav",
        "a/clip001.wav",
        "b/clip000.flac",
    ]


# ---------------------------------------------------------------------- batching


def test_batches_are_formed_by_duration() -> None:
    sizes = np.array([16_000, 8_000, 12_000, 4_000, 16_000, 9_000, 10_000, 5_000] * 3)
    budget = 40_000
    plan = plan_batches(sizes, budget, seed=0, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(len(sizes)))  # every clip once
    for b in plan:
        assert len(b) == 1 or len(b) * int(sizes[b].max()) <= budget
    assert len({len(b) for b in plan}) > 1  # short clips share batches, long ones do not
    again = plan_batches(sizes, budget, seed=0, epoch=0)
    assert again == plan and plan_batches(sizes, budget, seed=0, epoch=1) != plan
    assert len(plan_batches(sizes, budget, seed=0, epoch=5)) == len(plan)
    capped = plan_batches(sizes, budget, seed=0, epoch=0, max_batch_size=2)
    assert max(len(b) for b in capped) == 2


def test_sampler_batch_k_is_a_pure_function_of_seed_and_k() -> None:
    sizes = [8000 + 100 * i for i in range(30)]
    s = AudioBatchSampler(sizes, budget=30_000, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(2 * s.batches_per_epoch + 3)]
    resumed = iter(AudioBatchSampler(sizes, budget=30_000, seed=3, start_batch=s.batches_per_epoch + 1))
    assert [next(resumed) for _ in range(5)] == first[s.batches_per_epoch + 1 : s.batches_per_epoch + 6]
    assert s.batch(7) == first[7]
    ranks = [AudioBatchSampler(sizes, budget=30_000, seed=3, rank=r, world_size=2).batch(0) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])


def test_loader_crops_to_the_shortest_and_resumes_exactly(tmp_path: Path) -> None:
    write_clips(tmp_path, [5000, 7000, 9001, 11000, 16000, 6000, 8500, 13000, 4500, 10000])
    cfg = tiny_cfg(tmp_path, 2)
    pipe = PIPELINES["audio"]
    assert isinstance(pipe, AudioPipeline)
    it, n = pipe.loader(cfg, 0, 0, 1)
    assert n == 10
    batches = [next(it) for _ in range(8)]
    for b in batches:
        assert b.padding_mask is None and b.inputs.ndim == 2
        assert b.inputs.shape[1] <= 12_000  # max_sample_size crop
        assert b.inputs.shape[0] * b.inputs.shape[1] <= 2.0 * SR or b.inputs.shape[0] == 1
        frames = conv_output_length(b.inputs.shape[1], cfg.model.audio.conv_layers)
        assert b.mask.shape == (b.inputs.shape[0] * cfg.masking.num_masks, frames)
        assert len(set(b.mask.sum(1).tolist())) == 1  # masks drawn for the cropped length
    it2, _ = pipe.loader(cfg, 5, 0, 1)
    for want in batches[5:]:
        got = next(it2)
        assert torch.equal(got.inputs, want.inputs) and torch.equal(got.mask, want.mask)


def test_loader_can_pad_instead(tmp_path: Path) -> None:
    write_clips(tmp_path, [5000, 9000, 6000, 7000])
    cfg = tiny_cfg(tmp_path, 2, "data.audio.crop_to_shortest=false", "data.audio.batch_seconds=10.0")
    b = next(PIPELINES["audio"].loader(cfg, 0, 0, 1)[0])
    assert b.padding_mask is not None and b.inputs.shape == (4, 9000)
    lengths = (~b.padding_mask).sum(1)
    assert sorted(lengths.tolist()) == [5000, 6000, 7000, 9000]
    conv = cfg.model.audio.conv_layers
    valid = [conv_output_length(int(n), conv) for n in lengths.repeat_interleave(cfg.masking.num_masks)]
    for row, n in zip(b.mask, valid, strict=True):
        assert not bool(row[n:].any())
    assert len(set(b.mask.sum(1).tolist())) == 1


def test_undecodable_file_at_load_time(tmp_path: Path) -> None:
    """A file whose header lied (listed with a size in a manifest) fails with its name, or is skipped."""
    write_clips(tmp_path, [8000, 8000, 8000])
    (tmp_path / "broken.wav").write_bytes(b"garbage" * 100)
    manifest = tmp_path / "m.tsv"
    manifest.write_text("clip000.wav\t8000\nclip001.wav\t8000\nclip002.wav\t8000\nbroken.wav\t8000\n")
    cfg = tiny_cfg(manifest, 2, "data.audio.batch_seconds=4.0")
    it, _ = PIPELINES["audio"].loader(cfg, 0, 0, 1)
    with pytest.raises(BadInputError, match="broken.wav"):
        next(it)
    cfg = apply_overrides(cfg, ["data.on_bad_input=skip"])
    b = next(PIPELINES["audio"].loader(cfg, 0, 0, 1)[0])
    assert b.inputs.shape[0] == 3 and len(b.skipped) == 1 and "broken.wav" in b.skipped[0]


# ---------------------------------------------------------------------- CLI


@pytest.mark.parametrize("version", [1, 2])
def test_cli_pretrains_two_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str], version: int) -> None:
    data = tmp_path / "wavs"
    write_clips(data, [6000, 7000, 8000, 9000, 10000, 1500], rate=8000)  # 8 kHz: resampled
    (data / "bad.wav").write_bytes(b"not a wav")
    out = tmp_path / "run"
    code = main(
        [
            "pretrain",
            "--modality",
            "audio",
            "--data",
            str(data),
            "--preset",
            "audio-tiny",
            "--version",
            str(version),
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "train.steps=2",
            "--set",
            "data.audio.batch_seconds=2.0",
            "--set",
            "data.on_bad_input=skip",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "finished at step 2" in printed
    assert "dropped 1 clip(s) shorter" in printed  # 1500 samples at 8 kHz = 3000 at 16 kHz < 4000
    assert "skipped 1 bad input file(s)" in printed
    log = (out / "train.log").read_text()
    assert "dropped 1 clip(s)" in log and "bad.wav" in log
    assert (out / "config.json").is_file() and (out / "metrics.jsonl").read_text().count("\n") == 2
