"""Long inputs in `extract`: speech and text run in overlapping windows whose frames / tokens are
stitched back, so memory is bounded by the window while the output keeps the shape of an
unchunked run (one row per frame / token); inputs shorter than a window are unchanged."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import tiny_audio_config, tiny_text_config
from tests.test_extract import make_run, model_for, write_wavs

from data2vec.cli import main
from data2vec.config import ConfigError
from data2vec.extract import TEXT_PIECE_CHARS, encode_long, extract, extract_path, read_names
from data2vec.modalities.audio import conv_output_length
from data2vec.tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]
STRIDE = 20  # the tiny speech CNN: kernels 10/3/3, strides 5/2/2
WORDS = ["cats", "dogs", "trains", "and", "more", "line", "talks", "about", "zebra", "42", "late"]


def run_child(code: str) -> dict[str, float]:
    """Run `code` in a fresh interpreter (one thread) and return the JSON it prints last."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def words(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < n_chars:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


# ----------------------------------------------------------------------------- speech


def test_audio_shorter_than_a_window_is_unchanged() -> None:
    model = model_for(tiny_audio_config(2))
    g = torch.Generator().manual_seed(0)
    wavs = [torch.randn(n, generator=g) for n in (4000, 3001, 2500)]
    whole = extract(model, wavs, layers=[1, 2], pool="none", window=0)
    windowed = extract(model, wavs, layers=[1, 2], pool="none", window=4000, overlap=1000)
    for layer in (1, 2):
        for a, b in zip(whole[layer], windowed[layer], strict=True):
            np.testing.assert_array_equal(a, b)  # not chunked at all, even at exactly one window
    # the default window (30 s) leaves these clips alone too
    default = extract(model, wavs, layers=[2], pool="mean")
    np.testing.assert_array_equal(default[2], extract(model, wavs, layers=[2], pool="mean", window=0)[2])


def test_long_audio_is_windowed_and_stitched() -> None:
    cfg = tiny_audio_config(2)
    model = model_for(cfg)
    L, W, O = 20_000, 4000, 1000
    wav = torch.randn(L, generator=torch.Generator().manual_seed(1))
    out = extract(model, [wav], layers=[2], pool="none", window=W, overlap=O)[2][0]
    frames = conv_output_length(L, cfg.model.audio.conv_layers)
    whole = extract(model, [wav], layers=[2], pool="none", window=0)[2][0]
    assert out.shape == whole.shape == (frames, 32)  # one row per frame, as unchunked
    # windows every W - O samples, the last one the clip's last W samples (start rounded up to the stride)
    H = W - O
    starts = list(range(0, L - W, H))
    starts.append(min(starts[-1] + H, math.ceil((L - W) / STRIDE) * STRIDE))
    alone = [extract(model, [wav[s : s + W]], layers=[2], pool="none", window=0)[2][0] for s in starts]
    n0 = H // STRIDE
    np.testing.assert_allclose(out[:n0], alone[0][:n0], atol=2e-5)  # before window 1: window 0's frames
    np.testing.assert_allclose(out[-50:], alone[-1][-50:], atol=2e-5)  # the end: the last window's
    for j in range(frames):  # every frame is the frame some window computed for it, in that window
        candidates = [a[j - s // STRIDE] for s, a in zip(starts, alone, strict=True) if 0 <= j - s // STRIDE < len(a)]
        assert any(np.allclose(out[j], c, atol=2e-5) for c in candidates), j
    # and mean pooling averages the stitched frames
    mean = extract(model, [wav], layers=[2], pool="mean", window=W, overlap=O)[2][0]
    np.testing.assert_allclose(mean, out.mean(0), atol=1e-5)


def test_window_settings_are_checked() -> None:
    model = model_for(tiny_audio_config(2))
    wav = [torch.randn(9000)]
    with pytest.raises(ConfigError, match="overlap: .*must be smaller than the window"):
        extract(model, wav, window=4000, overlap=4000)
    with pytest.raises(ConfigError, match="overlap: 10 samples is too short.*at least 20"):
        extract(model, wav, window=4000, overlap=10)
    with pytest.raises(ConfigError, match="window: 30 samples is too short"):
        extract(model, wav, window=30, overlap=25)


def test_long_audio_memory_stays_bounded() -> None:
    """A 150 s clip at the default 30 s window, in a child process: extraction adds well under
    the ~1 GB that running it whole took (its attention grows with the square of its length)."""
    result = run_child(
        """
        import json, resource, torch
        from tests.helpers import tiny_audio_config
        from data2vec.extract import extract
        from data2vec.model import Data2Vec
        torch.manual_seed(0)
        # the real CNN layout (stride 320 samples = 20 ms), narrow
        cfg = tiny_audio_config(2, "model.audio.conv_layers="
                                   "[[16,10,5],[16,3,2],[16,3,2],[16,3,2],[16,3,2],[16,2,2],[16,2,2]]")
        model = Data2Vec.from_config(cfg).eval()
        extract(model, [torch.randn(8000)], pool="none")  # warm up
        wav = torch.randn(16_000 * 150)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        feats = extract(model, [wav], pool="none", batch_size=1)[2][0]
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(json.dumps({"frames": feats.shape[0], "grew_mb": grew}))
        """
    )
    assert result["frames"] == conv_output_length(16_000 * 150, [(1, 10, 5), *[(1, 3, 2)] * 4, *[(1, 2, 2)] * 2])
    assert result["grew_mb"] < 400, result


def test_cli_window_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_audio_config(2)
    make_run(tmp_path / "run", cfg)
    write_wavs(tmp_path / "wavs", [20_000, 3000])
    out = tmp_path / "s.npy"
    args = ["extract", "--checkpoint", str(tmp_path / "run"), "--input", str(tmp_path / "wavs"), "--no-progress"]
    assert main([*args, "--pool", "none", "--window", "0.25", "--overlap", "0.0625", "--out", str(out)]) == 0
    with np.load(tmp_path / "s.npz") as z:
        assert z["layer2_000000"].shape == (conv_output_length(20_000, cfg.model.audio.conv_layers), 32)
    assert len(read_names(out.with_suffix(".npz"))) == 2
    assert main([*args, "--window", "0.25", "--overlap", "0.25", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "overlap" in err[0] and "smaller than the window" in err[0]


# ----------------------------------------------------------------------------- text


def text_setup(tmp_path: Path) -> tuple[TextTokenizer, object]:
    corpus = [f"line {i} talks about {['cats', 'dogs', 'trains'][i % 3]} and more" for i in range(60)]
    tok = TextTokenizer.train(corpus, vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    cfg = tiny_text_config(
        2,
        f"model.text.vocab_size={tok.vocab_size}",
        f"model.text.mask_id={tok.mask_id}",
        f"data.text.tokenizer={tmp_path / 'tokenizer.json'}",
    )
    return tok, cfg


def test_long_text_is_tokenised_in_pieces_exactly(tmp_path: Path) -> None:
    tok, _ = text_setup(tmp_path)
    text = words(3 * TEXT_PIECE_CHARS + 123) + "  double  spaces,punctuation!and " + words(TEXT_PIECE_CHARS, 1)
    ids = encode_long(tok, text)
    assert ids.dtype == np.int32
    assert ids.tolist() == tok.encode(text)  # cut only before a space that follows a non-space
    assert encode_long(tok, "x" * (TEXT_PIECE_CHARS + 5)).size > 0  # no space at all: still encoded


def test_text_windows(tmp_path: Path) -> None:
    tok, cfg = text_setup(tmp_path)
    make_run(tmp_path / "run", cfg)  # type: ignore[arg-type]
    from data2vec.pretrained import load_model

    model = load_model(tmp_path / "run")
    short = "cats and dogs"
    doc = words(600, 2)
    (tmp_path / "docs.txt").write_text(f"{short}\n{doc}\n")
    names, feats = extract_path(model, cfg, tmp_path / "docs.txt", layers=[-1], pool="none")  # type: ignore[arg-type]
    assert names == [f"{tmp_path / 'docs.txt'}#1", f"{tmp_path / 'docs.txt'}#2"]
    ids = tok.encode(doc)
    assert len(ids) + 2 > 32  # longer than the model's 32 positions
    rows = feats[2]
    assert rows[1].shape == (len(ids) + 2, 32)  # every token (and <s>, </s>) has its row; nothing is cut
    seq = torch.tensor([tok.bos_id, *ids, tok.eos_id])
    short_seq = torch.tensor([tok.bos_id, *tok.encode(short), tok.eos_id])
    np.testing.assert_array_equal(rows[0], extract(model, [short_seq], layers=[-1], pool="none", window=0)[2][0])
    # windows of 32 positions = <s> + 30 tokens + </s>, 8 tokens of overlap (32 // 4)
    first = extract(model, [torch.tensor([*seq[:31].tolist(), tok.eos_id])], layers=[-1], pool="none")
    np.testing.assert_allclose(rows[1][:23], first[2][0][:23], atol=2e-5)  # before window 1 starts
    last = torch.tensor([tok.bos_id, *ids[-30:], tok.eos_id])
    np.testing.assert_allclose(rows[1][-10:], extract(model, [last], layers=[-1], pool="none")[2][0][-10:], atol=2e-5)
    # window=0 keeps the old behaviour: cut to the model's positions (with a warning)
    with pytest.warns(UserWarning, match="1 document.* cut"):
        cut = extract(model, [seq], layers=[-1], pool="none", window=0)[2][0]
    assert cut.shape == (32, 32)


def test_long_text_line_memory_stays_bounded(tmp_path: Path) -> None:
    """A 2 MB line, in a child process: reading and extracting it adds far less than tokenising
    it whole did (~330 MB), and every token gets into the mean."""
    _, cfg = text_setup(tmp_path)
    make_run(tmp_path / "run", cfg)  # type: ignore[arg-type]
    (tmp_path / "long.txt").write_text(words(2_000_000, 3) + "\n")
    result = run_child(
        f"""
        import json, resource, warnings
        from pathlib import Path
        from data2vec.extract import extract_path
        from data2vec.pretrained import load_pretrained, build_model
        tmp = Path({str(tmp_path)!r})
        pre = load_pretrained(tmp / "run")
        model = build_model(pre)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names, feats = extract_path(model, pre.config, tmp / "long.txt", pool="mean")
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(json.dumps({{"rows": feats[2].shape[0], "grew_mb": grew, "warnings": len(caught)}}))
        """
    )
    assert result["rows"] == 1 and result["warnings"] == 0, result  # nothing cut
    assert result["grew_mb"] < 150, result
