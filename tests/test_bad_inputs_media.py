"""Bad input corpus (audio and text) and the `pretrain --on-*` flags.

Each kind is either handled correctly (asserted on the decoded result) or named in a
one-line `BadInputError`; under `data.on_bad_input=skip` it is left out and counted in
the run's summary.json. Images are in test_bad_inputs.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from tests.test_audio_data import tiny_cfg, tone, write_clips
from tests.test_text_cli import SHRINK

from data2vec.cli import _parser, main, resolve_pretrain_config
from data2vec.config import AudioDataConfig, RunConfig, TextDataConfig, apply_overrides
from data2vec.data.audio import load_audio, scan_audio
from data2vec.data.errors import BadInputError
from data2vec.data.pipeline import PIPELINES
from data2vec.data.text import PIECE_CHARS, read_documents, split_long, tokenize_corpus
from data2vec.presets import preset
from data2vec.tokenizer import TextTokenizer

SR = 16_000
SCAN = AudioDataConfig(min_sample_size=4000)
AUDIO_SHRINK = [
    "model.encoder.dim=32",
    "model.encoder.depth=1",
    "model.encoder.num_heads=2",
    "model.decoder.dim=32",
    "model.decoder.groups=4",
    "model.decoder.layers=1",
    "model.audio.conv_layers=[[32,10,5],[32,3,2],[32,3,2],[32,3,2],[32,3,2],[32,2,2],[32,2,2]]",
    "model.audio.pos_conv_groups=4",
    "targets.top_k=1",
    "train.precision=fp32",
]


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _one_line_naming(err: BaseException, path: Path, reason: str) -> None:
    msg = str(err)
    assert str(path) in msg and reason in msg and len(msg.splitlines()) == 1, msg


# ---------------------------------------------------------------------- audio corpus


def write_truncated_wav(path: Path, frames: int = 16_000) -> int:
    """A 16-bit WAV cut in half: its header still promises `frames`; returns the frames left."""
    sf.write(path, tone(frames), SR, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return (len(data) // 2 - 44) // 2


def bad_audio_at_scan(d: Path) -> dict[str, tuple[Path, str]]:
    """Kinds the file header already shows: named when the folder is scanned."""
    (d / "zero_bytes.wav").write_bytes(b"")
    sf.write(d / "zero_samples.wav", np.zeros(0, dtype=np.float32), SR)
    (d / "notes.wav").write_text("this is a text file, not audio\n" * 20)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(d / "picture.flac", format="PNG")
    return {
        "zero-length file": (d / "zero_bytes.wav", "empty file (0 bytes)"),
        "zero-sample wav": (d / "zero_samples.wav", "empty audio (0 samples)"),
        "text file named .wav": (d / "notes.wav", "not a readable audio file"),
        "PNG named .flac": (d / "picture.flac", "not a readable audio file"),
    }


def bad_audio_at_load(d: Path, frames: int = 8000) -> dict[str, tuple[Path, str]]:
    """Kinds only the samples show: named when the clip is read."""
    nan, inf = tone(frames), tone(frames)
    nan[frames // 2] = np.nan
    inf[frames // 3] = np.inf
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(d / "inf.wav", inf, SR, subtype="DOUBLE")
    return {
        "NaN samples (FLOAT wav)": (d / "nan.wav", "NaN or infinite samples"),
        "Inf samples (DOUBLE wav)": (d / "inf.wav", "NaN or infinite samples"),
    }


def test_audio_bad_files_are_named_at_scan_or_load(tmp_path: Path) -> None:
    write_clips(tmp_path, [8000, 9000])
    at_scan, at_load = bad_audio_at_scan(tmp_path), bad_audio_at_load(tmp_path)
    for path, reason in at_scan.values():
        with pytest.raises(BadInputError) as err:
            scan_audio(str(path), SCAN, "fail")
        _one_line_naming(err.value, path, reason)
        with pytest.raises(BadInputError) as err:
            load_audio(path, SR)
        _one_line_naming(err.value, path, reason)
    for kind, (path, reason) in at_load.items():
        assert len(scan_audio(str(path), SCAN, "fail")) == 1, kind  # the header is fine
        with pytest.raises(BadInputError) as err:
            load_audio(path, SR)
        _one_line_naming(err.value, path, reason)
    source = scan_audio(str(tmp_path), SCAN, "skip")
    assert len(source) == 4 and len(source.skipped) == 4
    assert {s.split(": ")[0] for s in source.skipped} == {str(p) for p, _ in at_scan.values()}


def test_audio_skip_counts_every_bad_file_and_trains_on_finite_clips_only(tmp_path: Path) -> None:
    write_clips(tmp_path, [8000] * 6)
    at_scan, at_load = bad_audio_at_scan(tmp_path), bad_audio_at_load(tmp_path)
    cfg = tiny_cfg(tmp_path, 2, "data.on_bad_input=skip", "data.audio.batch_seconds=1.0")  # 2 clips a batch
    it, n = PIPELINES["audio"].loader(cfg, 0, 0, 1)
    assert n == 8  # 6 good + NaN + Inf (their headers are fine)
    skipped: set[str] = set()
    for _ in range(4):  # one epoch: 8 clips in batches of 2
        b = next(it)
        skipped.update(s.split(": ")[0] for s in b.skipped)
        assert torch.isfinite(b.inputs).all()
        assert b.inputs.shape[0] + sum(1 for s in b.skipped if "infinite" in s) == 2
    assert skipped == {str(p) for p, _ in [*at_scan.values(), *at_load.values()]}
    fail = apply_overrides(cfg, ["data.on_bad_input=fail"])
    with pytest.raises(BadInputError, match="notes.wav: not a readable audio file"):
        PIPELINES["audio"].loader(fail, 0, 0, 1)


def test_audio_every_clip_bad_stops_instead_of_looping(tmp_path: Path) -> None:
    for i in range(3):
        nan = tone(8000, seed=i)
        nan[i] = np.nan
        sf.write(tmp_path / f"n{i}.wav", nan, SR, subtype="FLOAT")
    cfg = tiny_cfg(tmp_path, 2, "data.on_bad_input=skip", "data.audio.batch_seconds=1.0")
    it, _ = PIPELINES["audio"].loader(cfg, 0, 0, 1)
    with pytest.raises(BadInputError, match="no usable clips: none of the 3 clips") as err:
        for _ in range(100):
            next(it)
    assert str(tmp_path) in str(err.value) and len(str(err.value).splitlines()) == 1


def test_truncated_wav_is_read_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "cut.wav"
    left = write_truncated_wav(path, 16_000)
    header_frames = int.from_bytes(path.read_bytes()[40:44], "little") // 2
    assert header_frames == 16_000 and left < 8_000  # the header promises more than is there
    (clip,) = scan_audio(str(path), SCAN, "fail").clips
    wav = load_audio(path, SR)
    assert clip.samples == len(wav) == left  # the true length, for batching and for training
    np.testing.assert_allclose(wav, tone(16_000)[:left], atol=1e-4)  # the samples present, unchanged


def test_mixed_sample_rates_are_resampled_to_16k(tmp_path: Path) -> None:
    specs = {"a8k.wav": (8000, 12_001), "b44k.wav": (44_100, 44_100), "c16k.wav": (16_000, 20_000)}
    for name, (rate, frames) in specs.items():
        sf.write(tmp_path / name, tone(frames, 440.0, rate), rate)
    source = scan_audio(str(tmp_path), SCAN, "fail")
    want = {"a8k.wav": 24_002, "b44k.wav": 16_000, "c16k.wav": 20_000}
    assert {Path(c.path).name: c.samples for c in source.clips} == want
    for clip in source.clips:
        wav = load_audio(clip.path, SR)
        assert len(wav) == want[Path(clip.path).name]
        peak_hz = np.argmax(np.abs(np.fft.rfft(wav))) * SR / len(wav)
        assert abs(peak_hz - 440) < 3  # the same tone at the new rate
    cfg = tiny_cfg(tmp_path, 2, "data.audio.batch_seconds=10.0", "data.audio.max_sample_size=30000")
    b = next(PIPELINES["audio"].loader(cfg, 0, 0, 1)[0])
    assert b.inputs.shape == (3, 16_000)  # cropped to the shortest clip, which is 44.1 kHz -> 16 kHz


def test_stereo_wav_is_downmixed(tmp_path: Path) -> None:
    left, right = tone(12_000, 300.0), tone(12_000, 700.0, seed=1)
    sf.write(tmp_path / "st.wav", np.stack([left, right], axis=1), 8000, subtype="FLOAT")
    (clip,) = scan_audio(str(tmp_path), SCAN, "fail").clips
    wav = load_audio(clip.path, SR)
    assert wav.ndim == 1 and len(wav) == clip.samples == 24_000
    mono = load_audio(tmp_path / "st.wav", 8000)
    np.testing.assert_allclose(mono, (left + right) / 2, atol=1e-6)


def test_manifest_sample_counts_at_the_wrong_rate_are_detected(tmp_path: Path) -> None:
    write_clips(tmp_path, [16_000, 16_000, 16_000, 16_000])
    write_truncated_wav(tmp_path / "cut.wav", 16_000)
    manifest = tmp_path / "train.tsv"
    # clip001's count was taken at 8 kHz, clip002's at 44.1 kHz; cut.wav lists its header's length
    manifest.write_text(
        "clip000.wav\t16000\nclip001.wav\t8000\nclip002.wav\t44100\nclip003.wav\t16001\ncut.wav\t16000\n"
    )
    cfg = tiny_cfg(manifest, 2, "data.audio.batch_seconds=2.0", "data.audio.max_sample_size=48000")
    it, n = PIPELINES["audio"].loader(cfg, 0, 0, 1)
    assert n == 5
    with pytest.raises(BadInputError, match="but the manifest gives") as err:
        for _ in range(5):
            next(it)
    assert len(str(err.value).splitlines()) == 1 and any(
        name in str(err.value) for name in ("clip001.wav", "clip002.wav", "cut.wav")
    )
    skip = apply_overrides(cfg, ["data.on_bad_input=skip"])
    it, _ = PIPELINES["audio"].loader(skip, 0, 0, 1)
    skipped: list[str] = []
    good: set[int] = set()
    for _ in range(8):  # two epochs (4 batches each: 44100 | 16001 | 16000 + 16000 | 8000)
        b = next(it)
        skipped += b.skipped
        good.update(int(n) for n in b.inputs.shape[:1] if b.inputs.numel())
    assert {Path(s.split(": ")[0]).name for s in skipped} == {"clip001.wav", "clip002.wav", "cut.wav"}
    assert good  # clip000 and clip003 (whose off-by-one count is within rounding) still train
    assert any("cut.wav: decodes to 7989 samples at 16000 Hz but the manifest gives 16000" in s for s in skipped)


# ---------------------------------------------------------------------- text corpus


def bad_text_files(d: Path) -> dict[str, tuple[Path, str]]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "latin1.txt").write_bytes("a fine line\ncaf\xe9 au lait\n".encode("latin-1"))
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_text("   \n\t\n  \n")
    return {
        "non-UTF-8 (latin-1) file": (d / "latin1.txt", "not UTF-8 text (line 2, byte 0xe9"),
        "empty file": (d / "empty.txt", "empty: no documents"),
        "whitespace-only file": (d / "blank.txt", "empty: no documents"),
    }


def bad_jsonl(d: Path) -> tuple[Path, dict[str, str]]:
    path = d / "records.jsonl"
    path.write_text(
        '{"text": "first good record"}\n{"text": oops\n{"body": "no text field"}\n{"text": "last good one"}\n'
    )
    return path, {f"{path}:2": "not valid JSON", f"{path}:3": "no string field 'text'"}


def test_text_bad_files_and_records_are_named(tmp_path: Path) -> None:
    dcfg = TextDataConfig()
    for path, reason in bad_text_files(tmp_path).values():
        with pytest.raises(BadInputError) as err:
            list(read_documents(path, dcfg))
        _one_line_naming(err.value, path, reason)
    jsonl, bad = bad_jsonl(tmp_path)
    seen: list[BadInputError] = []
    assert list(read_documents(jsonl, dcfg, seen.append)) == ["first good record", "last good one"]
    assert {e.path: e.reason.split(" (")[0] for e in seen} == bad
    with pytest.raises(BadInputError, match=r"records\.jsonl:2: not valid JSON"):
        list(read_documents(jsonl, dcfg))


def test_text_skip_keeps_good_records_and_counts_the_rest(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    files = bad_text_files(d)
    jsonl, bad = bad_jsonl(d)
    (d / "good.txt").write_text("alpha beta gamma\ndelta epsilon\n")
    tok = TextTokenizer.train(["alpha beta gamma delta epsilon first good record last one"] * 5, vocab_size=300)
    paths = sorted(d.iterdir())
    with pytest.raises(BadInputError, match="blank.txt: empty"):
        tokenize_corpus(paths, tok, TextDataConfig(), "fail", tmp_path / "fail.bin")
    stats = tokenize_corpus(paths, tok, TextDataConfig(), "skip", tmp_path / "tokens.bin")
    assert stats.files == 2 and stats.documents == 4  # good.txt (2) + records.jsonl (2)
    assert {s.split(": ")[0] for s in stats.skipped} == {str(p) for p, _ in files.values()} | set(bad)


def test_long_documents_reach_the_tokenizer_in_pieces_with_the_same_ids() -> None:
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta,", "  gamma.", "naïve", "123", "\n", "it's", "\t", "日本語", "x" * 40, "   "])
    text = " ".join(rng.choice(words, 20_000).tolist())
    pieces = list(split_long(text))
    assert "".join(pieces) == text and max(map(len, pieces)) <= PIECE_CHARS and len(pieces) > 100
    tok = TextTokenizer.train([text[:20_000]], vocab_size=400)
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)  # cut where pre-tokenisation cuts
    run = "".join(rng.choice(list("abcdefgh"), 2_500).tolist())  # no space: cut hard
    assert [len(p) for p in split_long(run)] == [PIECE_CHARS, PIECE_CHARS, 500]
    assert list(split_long("short")) == ["short"]


_TEN_MB_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    from data2vec.config import apply_overrides
    from data2vec.data.text import PackedBlocks, TextPipeline
    from data2vec.presets import preset

    data, run, shrink = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    sets = [*shrink, f"data.path={data}", "data.text.tokenizer_train_bytes=500000"]
    cfg = apply_overrides(preset("text-tiny", 2), sets)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    run.mkdir()
    cfg = TextPipeline().prepare(cfg, run)
    blocks = PackedBlocks(cfg.data.text.token_cache, cfg.data.text.block_size, 0, 1)
    print(json.dumps({
        "seconds": time.perf_counter() - t,
        "extra_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
        "blocks": len(blocks), "tokens": blocks.n_tokens, "documents": blocks.meta["documents"],
        "first": blocks[0].tolist(), "last": blocks[len(blocks) - 1].tolist(),
    }))
    """
)


def test_ten_megabyte_single_line_is_packed_in_bounded_time_and_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = rng.choice(np.array(["river", "stone", "light", "cat", "train", "alpha", "beta", "gamma"]), 1_800_000)
    line = " ".join(words.tolist())[:10_000_000]
    data = tmp_path / "one_line.txt"
    data.write_text(line + "\n")
    assert data.stat().st_size > 10_000_000 - 10
    proc = subprocess.run(
        [sys.executable, "-c", _TEN_MB_CHILD, str(data), str(tmp_path / "run"), json.dumps(SHRINK)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["documents"] == 1 and r["tokens"] > 1_000_000
    assert r["blocks"] == r["tokens"] // 31  # blocks of 32: <s> + 31 ids of the stream
    assert r["first"][0] == 0 and 1 not in r["first"] and 1 not in r["last"]  # <s> first, no padding
    # The whole line went to the tokenizer at once before (~2 GB, ~1.8 GB over the baseline); now
    # it goes in pieces. Time is generous for a loaded 2-core machine (about 5 s when idle).
    assert r["extra_mb"] < 500, r
    assert r["seconds"] < 60, r


# ---------------------------------------------------------------------- the CLI flags


def _args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["pretrain", *argv])


def test_flags_set_the_config_and_win_over_config_file_and_set(tmp_path: Path) -> None:
    base = preset("text-tiny", 2)
    saved = tmp_path / "config.json"
    apply_overrides(base, ["data.on_bad_input=fail", "train.on_nan=stop", "train.on_collapse=stop"]).save(saved)
    data = tmp_path / "a.txt"
    data.write_text("some text\n")
    cfg = resolve_pretrain_config(_args("--config", str(saved), "--data", str(data)))
    assert (cfg.data.on_bad_input, cfg.train.on_nan, cfg.train.on_collapse) == ("fail", "stop", "stop")
    flags = ["--on-bad-input", "skip", "--on-nan", "skip", "--on-collapse", "rewind"]
    cfg = resolve_pretrain_config(_args("--config", str(saved), "--data", str(data), *flags))
    assert (cfg.data.on_bad_input, cfg.train.on_nan, cfg.train.on_collapse) == ("skip", "skip", "rewind")
    sets = _sets(["data.on_bad_input=fail", "train.on_nan=stop", "train.on_collapse=stop", "optim.lr=0.123"])
    cfg = resolve_pretrain_config(_args("--preset", "text-tiny", "--data", str(data), *sets, *flags))
    assert (cfg.data.on_bad_input, cfg.train.on_nan, cfg.train.on_collapse) == ("skip", "skip", "rewind")
    assert cfg.optim.lr == 0.123
    cfg = resolve_pretrain_config(_args("--preset", "text-tiny", "--data", str(data), "--on-nan", "skip"))
    assert (cfg.data.on_bad_input, cfg.train.on_nan, cfg.train.on_collapse) == ("fail", "skip", "stop")


def test_flags_are_checked_and_refused_with_resume(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "--preset", "text-tiny", "--on-nan", "ignore"])
    assert "invalid choice: 'ignore'" in capsys.readouterr().err
    assert main(["pretrain", "--resume", str(tmp_path), "--on-collapse", "rewind"]) == 2
    assert "--resume takes the config saved in the run directory" in capsys.readouterr().err


def test_cli_audio_run_skips_bad_files_and_lists_them(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "wavs"
    write_clips(data, [8000] * 6)
    at_scan, at_load = bad_audio_at_scan(data), bad_audio_at_load(data)
    run = tmp_path / "run"
    sets = _sets([*AUDIO_SHRINK, "train.steps=4", "data.audio.batch_seconds=1.0"])  # 4 batches = 1 epoch
    flags = ["--on-bad-input", "skip", "--on-nan", "skip", "--on-collapse", "rewind"]
    argv = ["pretrain", "--preset", "audio-tiny", "--data", str(data), "--no-progress", *sets, *flags]
    assert main([*argv, "--out", str(run)]) == 0
    assert "skipped 6 bad input file(s)" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 4 and summary["skipped_inputs"] == 6
    listed = {s.split(": ")[0] for s in summary["skipped_input_files"]}
    assert listed == {str(p) for p, _ in [*at_scan.values(), *at_load.values()]}
    log = (run / "train.log").read_text()
    assert "skipped 6 bad input(s)" in log and "nan.wav: audio holds NaN" in log
    cfg = RunConfig.load(run / "config.json")
    assert (cfg.data.on_bad_input, cfg.train.on_nan, cfg.train.on_collapse) == ("skip", "skip", "rewind")
    # without the flag (the preset's on_bad_input=fail): one line naming a bad file, nothing trained
    assert main([*argv[:-6], "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and any(str(p) in err for p, _ in at_scan.values())


def test_cli_text_run_skips_bad_files_and_lists_them(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    files = bad_text_files(data)
    jsonl, bad = bad_jsonl(data)
    lines = [f"sentence {i} is about {['cats', 'dogs', 'trains', 'rivers'][i % 4]} and more" for i in range(120)]
    (data / "good.txt").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    argv = [
        "pretrain",
        "--preset",
        "text-tiny",
        "--data",
        str(data),
        "--no-progress",
        *_sets([*SHRINK, "train.steps=2"]),
    ]
    assert main([*argv, "--on-bad-input", "skip", "--out", str(run)]) == 0
    assert "skipped 5 bad input file(s)" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2 and summary["skipped_inputs"] == 5
    assert {s.split(": ")[0] for s in summary["skipped_input_files"]} == {str(p) for p, _ in files.values()} | set(bad)
    meta = json.loads((run / "tokens.json").read_text())
    assert meta["files"] == 2 and meta["documents"] == 122  # good.txt + the 2 good records
    assert main([*argv, "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "blank.txt: empty: no documents" in err
