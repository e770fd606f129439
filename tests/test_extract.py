"""Feature extraction: padding removed exactly, layer numbering, batching, and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from tests.conftest import make_tiny_config
from tests.helpers import tiny_audio_config, tiny_text_config

from data2vec.checkpoint import save_checkpoint
from data2vec.cli import main
from data2vec.config import RunConfig
from data2vec.extract import (
    extract,
    extract_path,
    num_layers,
    plan_batches,
    read_inputs,
    resolve_layers,
)
from data2vec.modalities.audio import conv_output_length
from data2vec.model import Data2Vec
from data2vec.pretrained import load_model, load_pretrained
from data2vec.tokenizer import TextTokenizer


def audio_config(version: int) -> RunConfig:
    return tiny_audio_config(version)


def text_config(version: int, *extra: str) -> RunConfig:
    return tiny_text_config(version, "model.text.vocab_size=300", *extra)


def model_for(cfg: RunConfig, seed: int = 0) -> Data2Vec:
    torch.manual_seed(seed)
    return Data2Vec.from_config(cfg).eval()


def make_run(run: Path, cfg: RunConfig, seed: int = 0) -> Data2Vec:
    """A run directory holding one checkpoint of a freshly built model."""
    model = model_for(cfg, seed)
    run.mkdir(parents=True)
    cfg.save(run / "config.json")
    save_checkpoint(run, 1, model.student_state_dict(), model.teacher_state_dict(), cfg.to_dict(), {"step": 1})
    return model


def assert_per_item_equal(batched: list[np.ndarray], alone: list[np.ndarray]) -> None:
    assert len(batched) == len(alone)
    for a, b in zip(batched, alone, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("version", [1, 2])
def test_audio_padding_is_removed_exactly(version: int) -> None:
    cfg = audio_config(version)
    model = model_for(cfg)
    g = torch.Generator().manual_seed(0)
    wavs = [torch.randn(n, generator=g) for n in (4000, 2500, 3333)]
    assert plan_batches([len(w) for w in wavs], batch_size=3) == [[0, 2, 1]]  # one padded batch
    batched = extract(model, wavs, layers=[1, 2], pool="none", batch_size=3)
    for layer in (1, 2):
        alone = [extract(model, [w], layers=[layer], pool="none")[layer][0] for w in wavs]
        assert_per_item_equal(batched[layer], alone)
        for w, f in zip(wavs, batched[layer], strict=True):
            assert f.shape == (conv_output_length(len(w), cfg.model.audio.conv_layers), 32)
    means = extract(model, wavs, layers=[2], pool="mean", batch_size=3)[2]
    assert means.shape == (3, 32)
    np.testing.assert_allclose(means, np.stack([f.mean(0) for f in batched[2]]), atol=1e-6)


@pytest.mark.parametrize("version", [1, 2])
def test_text_padding_is_removed_exactly(version: int) -> None:
    model = model_for(text_config(version))
    seqs = [torch.tensor([0, *ids, 2]) for ids in ([5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16])]
    batched = extract(model, seqs, layers=[-1], pool="none", batch_size=8)[2]
    alone = [extract(model, [s], layers=[-1], pool="none")[2][0] for s in seqs]
    assert_per_item_equal(batched, alone)
    assert [f.shape[0] for f in batched] == [8, 4, 6]
    # mean pooling averages real tokens only
    means = extract(model, seqs, pool="mean")[2]
    np.testing.assert_allclose(means, np.stack([f.mean(0) for f in alone]), atol=2e-5)


def test_batching_caps_count_and_padded_size() -> None:
    lengths = [5, 100, 50, 7, 60, 200]
    batches = plan_batches(lengths, batch_size=2, max_tokens=120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 2
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 120
    assert batches[0] == [5]  # longest first, alone (over the cap by itself)
    assert plan_batches([3, 3, 3], batch_size=2) == [[0, 1], [2]]


# ----------------------------------------------------------------------------- layers


def test_layer_numbering_counts_prenet_and_input() -> None:
    cfg = make_tiny_config(2, model__encoder__prenet_depth=1)
    model = model_for(cfg)
    assert num_layers(model) == 4
    assert resolve_layers(model, None) == [4]
    assert resolve_layers(model, [0, 1, -1, 4]) == [0, 1, 4]
    with pytest.raises(ValueError, match="layers 0 .* to 4"):
        resolve_layers(model, [5])
    x = torch.randn(2, 3, 32, 32)
    feats = extract(model, list(x), layers=[0, 1, -1], pool="none")
    with torch.no_grad():
        enc_in = model.frontend.context(model.frontend.local(x), clean=True)
        h0 = model.encoder.input_norm(enc_in.x)
        h1 = model.encoder.prenet[0](h0).x
        last = model.encode(x).x
    for i in range(2):
        np.testing.assert_allclose(feats[0][i], h0[i, 1:].numpy(), atol=1e-6)  # CLS dropped
        np.testing.assert_allclose(feats[1][i], h1[i, 1:].numpy(), atol=1e-6)
        np.testing.assert_allclose(feats[4][i], last[i, 1:].numpy(), atol=1e-5)
        assert feats[4][i].shape == (16, 32)


def test_pre_ln_last_layer_is_the_block_output_before_the_final_norm() -> None:
    model = model_for(make_tiny_config(1))
    x = torch.randn(1, 3, 32, 32)
    feats = extract(model, list(x), layers=[-1], pool="none")[3]
    with torch.no_grad():
        out = model.encode(x)
    np.testing.assert_allclose(feats[0], out.layers[-1].x[0, 1:].numpy(), atol=1e-5)
    assert not np.allclose(feats[0], out.x[0, 1:].numpy(), atol=1e-3)


# ----------------------------------------------------------------------------- reading inputs and the CLI


def write_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_cli_extract_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_tiny_config(2)
    make_run(tmp_path / "run", cfg)
    paths = write_images(tmp_path / "imgs", 3)
    out = tmp_path / "feats" / "features.npy"
    args = ["extract", "--checkpoint", str(tmp_path / "run"), "--input", str(tmp_path / "imgs"), "--no-progress"]
    assert main([*args, "--layers", "1,3", "--pool", "mean", "--out", str(out)]) == 0
    arr = np.load(out)
    assert arr.shape == (2, 3, 32)
    assert (tmp_path / "feats" / "features.files.txt").read_text().splitlines() == [str(p) for p in paths]
    assert "wrote" in capsys.readouterr().out
    # the same numbers through the API
    model = load_model(tmp_path / "run")
    names, feats = extract_path(model, cfg, tmp_path / "imgs", layers=[1, 3])
    np.testing.assert_allclose(arr[1], feats[3], atol=1e-6)
    # pool=none with .npy -> an .npz beside it, one array per input and layer
    assert main([*args, "--layers", "-1", "--pool", "none", "--out", str(out)]) == 0
    with np.load(tmp_path / "feats" / "features.npz") as z:
        assert sorted(z.files) == ["layer3_000000", "layer3_000001", "layer3_000002"]
        assert z["layer3_000000"].shape == (16, 32)
    # a single image file
    assert main([*args[:4], str(paths[0]), "--out", str(tmp_path / "one.npy")]) == 0
    assert np.load(tmp_path / "one.npy").shape == (1, 1, 32)


@pytest.mark.parametrize("spelling", ["separate", "equals"])
def test_cli_negative_layer_lists_work_as_written(tmp_path: Path, spelling: str) -> None:
    cfg = make_tiny_config(2)  # 3 blocks: -3..-1 are blocks 1..3
    make_run(tmp_path / "run", cfg)
    write_images(tmp_path / "imgs", 2)
    out = tmp_path / "neg.npy"
    layers = ["--layers", "-3,-2,-1"] if spelling == "separate" else ["--layers=-3,-2,-1"]
    args = ["extract", "--checkpoint", str(tmp_path / "run"), "--input", str(tmp_path / "imgs"), "--no-progress"]
    assert main([*args, *layers, "--out", str(out)]) == 0
    assert main([*args, "--layers", "1,2,3", "--out", str(tmp_path / "pos.npy")]) == 0
    np.testing.assert_array_equal(np.load(out), np.load(tmp_path / "pos.npy"))


def test_cli_bad_image_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run", make_tiny_config(2))
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image at all")
    code = main(
        ["extract", "--checkpoint", str(tmp_path / "run"), "--input", str(tmp_path / "imgs")]
        + ["--out", str(tmp_path / "f.npy"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "broken.png" in err and "not a readable image" in err
    assert not (tmp_path / "f.npy").exists()


def write_wavs(folder: Path, lengths: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, n in enumerate(lengths):
        p = folder / f"clip{i}.wav"
        sf.write(p, (0.1 * rng.standard_normal(n)).astype(np.float32), 16_000)
        paths.append(p)
    return paths


def test_cli_extract_audio_per_frame(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = audio_config(2)
    make_run(tmp_path / "run", cfg)
    paths = write_wavs(tmp_path / "wavs", [4000, 6400, 3000])
    out = tmp_path / "speech.npy"
    args = ["extract", "--checkpoint", str(tmp_path / "run"), "--input", str(tmp_path / "wavs"), "--no-progress"]
    assert main([*args, "--layers", "2", "--pool", "none", "--out", str(out)]) == 0
    with np.load(tmp_path / "speech.npz") as z:
        for i, n in enumerate([4000, 6400, 3000]):
            assert z[f"layer2_{i:06d}"].shape == (conv_output_length(n, cfg.model.audio.conv_layers), 32)
    assert (tmp_path / "speech.files.txt").read_text().splitlines() == [str(p) for p in paths]
    # a clip the loader cannot read is named
    (tmp_path / "wavs" / "zz_bad.wav").write_bytes(b"RIFF....WAVEjunk")
    assert main([*args, "--out", str(tmp_path / "x.npy")]) == 2
    assert "zz_bad.wav" in capsys.readouterr().err


def test_cli_extract_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = [f"line {i} talks about {['cats', 'dogs', 'trains'][i % 3]} and more" for i in range(60)]
    tok = TextTokenizer.train(corpus, vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    cfg = text_config(
        2,
        f"model.text.vocab_size={tok.vocab_size}",
        f"model.text.mask_id={tok.mask_id}",
        f"data.text.tokenizer={tmp_path / 'tokenizer.json'}",
    )
    make_run(tmp_path / "run", cfg)
    docs = tmp_path / "docs.txt"
    docs.write_text("cats and dogs\n\nthe trains are late today\nline 4\n")
    out = tmp_path / "text.npz"
    args = ["extract", "--checkpoint", str(tmp_path / "run"), "--no-progress", "--layers", "0,-1"]
    assert main([*args, "--input", str(docs), "--out", str(out)]) == 0
    with np.load(out) as z:
        assert z["layer0"].shape == (3, 32) and z["layer2"].shape == (3, 32)
    assert (tmp_path / "text.files.txt").read_text().splitlines() == [f"{docs}#{k}" for k in (1, 2, 3)]
    items = read_inputs(cfg, docs)
    assert items[0].load().tolist() == [tok.bos_id, *tok.encode("cats and dogs"), tok.eos_id]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    assert main([*args, "--input", str(bad), "--out", str(out)]) == 2
    assert "bad.txt: not UTF-8" in capsys.readouterr().err


def test_cli_extract_from_a_fairseq_checkpoint(tmp_path: Path) -> None:
    from tests.test_fairseq import audio_v1_checkpoint

    _, src, path = audio_v1_checkpoint(tmp_path)
    write_wavs(tmp_path / "wavs", [3000, 5000])
    out = tmp_path / "fs.npy"
    assert main(["extract", "--checkpoint", str(path), "--input", str(tmp_path / "wavs"), "--out", str(out)]) == 0
    arr = np.load(out)
    assert arr.shape == (1, 2, 32)
    wav = read_inputs(load_pretrained(path).config, tmp_path / "wavs")[0].load()
    with torch.no_grad():
        ref = src.encode(wav[None]).x[0].mean(0).numpy()
    np.testing.assert_allclose(arr[0, 0], ref, atol=1e-5)


def test_parquet_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run", make_tiny_config(2))
    write_images(tmp_path / "imgs", 2)
    out = tmp_path / "f.parquet"
    args = ["extract", "--checkpoint", str(tmp_path / "run"), "--input", str(tmp_path / "imgs"), "--out", str(out)]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        assert main(args) == 2
        assert "pyarrow" in capsys.readouterr().err
        return
    assert main([*args, "--pool", "none"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["input", "layer3"]
    assert np.asarray(table.column("layer3")[0].as_py()).shape == (16, 32)
