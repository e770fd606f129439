"""Fine-tuning: every task end to end on tiny generated data, heads, schedules and metrics."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from tests.helpers import tiny_audio_config, tiny_text_config

from data2vec.cli import main
from data2vec.config import ConfigError, RunConfig, apply_overrides
from data2vec.finetune import (
    FinetuneConfig,
    LabelledSet,
    build_finetune_model,
    edit_distance,
    encode_letters,
    error_rates,
    evaluate,
    finetune,
    finetune_preset,
    greedy_decode,
    letter_vocab,
    load_finetuned,
    mix_batch,
    param_groups,
    smooth_one_hot,
)
from data2vec.presets import preset
from data2vec.tokenizer import TextTokenizer
from data2vec.training import train

IMAGE = [
    "model.encoder.dim=32",
    "model.encoder.depth=2",
    "model.encoder.num_heads=2",
    "model.image.image_size=[16,16]",
    "model.decoder.dim=32",
    "model.decoder.groups=4",
    "model.decoder.layers=1",
    "targets.top_k=2",
    "data.batch_size=8",
    "data.num_workers=0",
    "train.precision=fp32",
    "optim.warmup_steps=1",
]
FAST = dict(epochs=2, batch_size=8, log_every=1, warmup_fraction=0.0)


def image_config(version: int = 2) -> RunConfig:
    return apply_overrides(preset("digits-tiny", version), IMAGE)


def text_config(tmp: Path, version: int = 2) -> RunConfig:
    texts = [f"this movie is {w} and {v}" for w in ("good", "bad", "great", "awful") for v in ("fun", "dull", "long")]
    tok = TextTokenizer.train(texts * 5, vocab_size=300, min_frequency=1)
    tok.save(tmp / "tokenizer.json")
    return tiny_text_config(
        version, f"model.text.vocab_size={tok.vocab_size}", f"data.text.tokenizer={tmp / 'tokenizer.json'}"
    )


def write_images(root: Path, n: int = 8) -> None:
    """Class `dark` and class `bright`: trivially separable grey images."""
    rng = np.random.default_rng(0)
    for cls, level in (("bright", 200), ("dark", 40)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = np.clip(level + rng.normal(0, 20, (16, 16)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, "L").save(root / cls / f"{i}.png")


def write_tar(path: Path, n: int = 8) -> None:
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            label = i % 2
            arr = np.clip((200 if label else 40) + rng.normal(0, 20, (16, 16)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr, "L").save(buf, format="PNG")
            for name, data in ((f"{i:04d}.png", buf.getvalue()), (f"{i:04d}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def tone(freq: float, seconds: float = 0.25, sr: int = 16_000, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    noise = np.random.default_rng(seed).normal(0, 0.05, t.shape)
    return (0.5 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write_audio_folder(root: Path, n: int = 4) -> None:
    for cls, freq in (("high", 2000.0), ("low", 200.0)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            sf.write(root / cls / f"{i}.wav", tone(freq, 0.2 + 0.05 * i, seed=i), 16_000)


# ----------------------------------------------------------------------------- images


def test_image_from_pretrained_run_end_to_end(tmp_path: Path) -> None:
    cfg = image_config()
    train(apply_overrides(cfg, ["train.steps=2", "train.log_every=1"]), tmp_path / "run", progress=False, quiet=True)
    write_images(tmp_path / "train")
    write_images(tmp_path / "eval", n=4)
    ft = finetune_preset("image_cls", **FAST)
    result = finetune(tmp_path / "run", ft, tmp_path / "train", tmp_path / "eval", tmp_path / "ft", quiet=True)
    out = tmp_path / "ft"
    assert result.metric == "accuracy" and len(result.history) == 2
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "eval_accuracy" in r] == [1, 2]
    assert (out / "metrics.png").stat().st_size > 0
    model, rcfg, meta = load_finetuned(out)
    assert meta["classes"] == ["bright", "dark"] and meta["epoch"] == result.best_epoch
    assert rcfg.model.modality == "image"
    # The saved model scores what was recorded for its epoch.
    from data2vec.finetune import read_labelled

    ev = evaluate(model, read_labelled(tmp_path / "eval", ft, rcfg), ft, rcfg)
    assert ev.metrics["accuracy"] == pytest.approx(result.best_metric)


def test_a_torn_fine_tuned_model_is_named(tmp_path: Path) -> None:
    from data2vec.interop import InteropError

    write_tar(tmp_path / "train.tar")
    write_tar(tmp_path / "eval.tar", n=4)
    ft = finetune_preset("image_cls", **{**FAST, "epochs": 1})
    finetune(image_config(1), ft, tmp_path / "train.tar", tmp_path / "eval.tar", tmp_path / "ft", quiet=True)
    weights = tmp_path / "ft" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InteropError, match=r"best/model\.safetensors: not a readable safetensors file"):
        load_finetuned(tmp_path / "ft")


def test_image_tar_shards_with_cls_labels(tmp_path: Path) -> None:
    write_tar(tmp_path / "train.tar")
    write_tar(tmp_path / "eval.tar", n=4)
    ft = finetune_preset("image_cls", **{**FAST, "epochs": 1})
    result = finetune(image_config(1), ft, tmp_path / "train.tar", tmp_path / "eval.tar", tmp_path / "ft", quiet=True)
    _, _, meta = load_finetuned(tmp_path / "ft")
    assert meta["classes"] == ["0", "1"] and 0.0 <= result.best_metric <= 1.0


def test_loss_goes_down_on_a_learnable_task(tmp_path: Path) -> None:
    write_images(tmp_path / "img", n=8)
    ft = FinetuneConfig(task="image_cls", epochs=8, batch_size=8, lr=3e-3, log_every=1, warmup_fraction=0.0)
    result = finetune(image_config(), ft, tmp_path / "img", tmp_path / "img", tmp_path / "ft", quiet=True)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.best_metric == 1.0


def test_best_checkpoint_is_the_best_epoch(tmp_path: Path) -> None:
    write_images(tmp_path / "img", n=4)
    ft = FinetuneConfig(task="image_cls", epochs=4, batch_size=4, lr=2e-2, log_every=1, warmup_fraction=0.0)
    result = finetune(image_config(), ft, tmp_path / "img", tmp_path / "img", tmp_path / "ft", quiet=True)
    accs = [h["eval_accuracy"] for h in result.history]
    best_epoch = int(np.argmax(accs)) + 1  # the first epoch with the highest accuracy
    meta = json.loads((tmp_path / "ft" / "best" / "finetune.json").read_text())
    assert meta["epoch"] == best_epoch == result.best_epoch
    assert meta["eval"]["accuracy"] == max(accs)
    assert not list((tmp_path / "ft").glob(".tmp-*")) and not list((tmp_path / "ft").glob(".old-*"))


def test_layer_wise_lr_decay_values() -> None:
    ft = FinetuneConfig(task="image_cls", layer_decay=0.5)
    model, _ = build_finetune_model(image_config(), None, ft, 3)
    scales: dict[str, float] = {}
    for g in param_groups(model, 0.05, 0.5):
        for p in g["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            scales[name] = g["lr_scale"]
    # L = 2 blocks: front-end 0.5^3, block 0 0.5^2, block 1 0.5^1, head 1.
    assert scales["frontend.local.proj.weight"] == 0.125
    assert scales["frontend.context.prefix"] == 0.125
    assert scales["encoder.blocks.0.attn.qkv.weight"] == 0.25
    assert scales["encoder.blocks.1.mlp.fc2.bias"] == 0.5
    assert scales["head.1.weight"] == 1.0
    groups = param_groups(model, 0.05, 0.5)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.head[1].bias) in no_decay and id(model.head[1].weight) not in no_decay


def test_mixup_and_cutmix_targets_sum_to_one() -> None:
    x = torch.randn(6, 1, 16, 16)
    y = smooth_one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3, 0.1)
    assert torch.allclose(y.sum(1), torch.ones(6))
    rng = random.Random(0)
    for cfg in (
        FinetuneConfig(mixup=0.8),
        FinetuneConfig(cutmix=1.0),
        FinetuneConfig(mixup=0.8, cutmix=1.0, mix_switch_prob=0.5),
    ):
        for _ in range(5):
            xm, ym, lam = mix_batch(x, y, cfg, rng)
            assert xm.shape == x.shape and 0 <= lam <= 1
            assert torch.allclose(ym.sum(1), torch.ones(6), atol=1e-6)
            # Each row mixes its own label and its partner's (the flipped batch) by lambda.
            assert torch.allclose(ym, lam * y + (1 - lam) * y.flip(0), atol=1e-6)
    # CutMix pastes a box: the pixels that changed are exactly the area 1 - lambda.
    xm, _, lam = mix_batch(x, y, FinetuneConfig(cutmix=1.0), random.Random(3))
    changed = (xm != x).any(dim=(0, 1)).float().mean()
    assert float(changed) == pytest.approx(1 - lam, abs=1e-6)


def test_finetune_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="layer_decay"):
        FinetuneConfig(layer_decay=0.0)
    with pytest.raises(ConfigError, match="task"):
        finetune_preset("video_cls")
    with pytest.raises(ConfigError, match="mix_prob"):
        FinetuneConfig(mix_prob=2.0)
    cfg = finetune_preset("audio_ctc", epochs=3)
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        FinetuneConfig.from_dict({"nope": 1})


def test_wrong_modality_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="audio model"):
        finetune(image_config(), FinetuneConfig(task="audio_cls"), tmp_path, tmp_path, tmp_path / "ft", quiet=True)


# ----------------------------------------------------------------------------- audio


def test_ctc_letters_greedy_decoding_and_error_rates() -> None:
    vocab = letter_vocab(["ab c", "Ca b"])
    assert vocab == ["<blank>", "|", "a", "b", "c"]
    assert encode_letters("Ab  c!", vocab) == [2, 3, 1, 4]
    # frames: a a _ b | | c c _ c  -> "ab cc"
    frames = [2, 2, 0, 3, 1, 1, 4, 4, 0, 4]
    scores = torch.full((1, len(frames) + 2, 5), -10.0)
    for t, k in enumerate(frames):
        scores[0, t, k] = 0.0
    scores[0, len(frames) :, 2] = 0.0  # padding frames past the length are ignored
    assert greedy_decode(scores, torch.tensor([len(frames)]), vocab) == ["ab cc"]
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a"]) == 1
    wer, cer = error_rates(["the cat sat", "hello"], ["the cat sat down", "hallo"])
    assert wer == pytest.approx(2 / 5)  # one deletion + one substitution over 5 words
    assert cer == pytest.approx((5 + 1) / (16 + 5))  # " down" deleted (5 chars), e->a


def test_audio_ctc_end_to_end_cnn_frozen(tmp_path: Path) -> None:
    root = tmp_path / "speech"
    root.mkdir()
    rows = ["path\ttranscript"]
    for i, (freq, text) in enumerate([(300.0, "ab"), (1500.0, "ba"), (700.0, "a b"), (2500.0, "b")]):
        sf.write(root / f"u{i}.wav", tone(freq, 0.3, seed=i), 16_000)
        rows.append(f"u{i}.wav\t{text}")
    (root / "train.tsv").write_text("\n".join(rows) + "\n")
    ft = finetune_preset("audio_ctc", **FAST, lr=1e-3, mask_length=3, mask_channel_length=4)
    assert ft.freeze_cnn and ft.mask_prob > 0
    cfg = tiny_audio_config(1)
    torch.manual_seed(0)
    before, _ = build_finetune_model(cfg, None, ft, 4)
    result = finetune(cfg, ft, root / "train.tsv", root / "train.tsv", tmp_path / "ft", quiet=True)
    assert result.metric == "cer" and set(result.history[-1]) >= {"eval_cer", "eval_wer"}
    cnn_before = before.frontend.local.state_dict()  # the same seed builds the same start
    for k, v in result.model.frontend.local.state_dict().items():
        if k.startswith("cnn."):
            assert torch.equal(v, cnn_before[k]), k
    assert not torch.equal(result.model.frontend.local.proj.weight, cnn_before["proj.weight"])
    _, _, meta = load_finetuned(tmp_path / "ft")
    assert meta["letters"] == ["<blank>", "|", "a", "b"]


def test_ctc_batch_norm_head_uses_valid_frames_only(tmp_path: Path) -> None:
    root = tmp_path / "speech"
    root.mkdir()
    rows = ["path\ttranscript"]
    for i, (freq, secs, text) in enumerate([(300.0, 0.3, "ab"), (1500.0, 0.5, "ba"), (700.0, 0.4, "a b")]):
        sf.write(root / f"u{i}.wav", tone(freq, secs, seed=i), 16_000)
        rows.append(f"u{i}.wav\t{text}")
    (root / "train.tsv").write_text("\n".join(rows) + "\n")
    ft = finetune_preset("audio_ctc", **FAST, lr=1e-3, mask_length=3, mask_channel_length=4, head_norm="batch")
    finetune(tiny_audio_config(1), ft, root / "train.tsv", root / "train.tsv", tmp_path / "ft", quiet=True)
    model, _, meta = load_finetuned(tmp_path / "ft")
    norm, letters = model.head
    assert isinstance(norm, torch.nn.BatchNorm1d) and not norm.affine and letters.out_features == len(meta["letters"])
    assert norm.running_var is not None and not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))
    short, long = torch.from_numpy(tone(300.0, 0.3)), torch.from_numpy(tone(1500.0, 0.5))
    batch = torch.zeros(2, len(long))
    batch[0, : len(short)], batch[1] = short, long
    pad = torch.zeros(2, len(long), dtype=torch.bool)
    pad[0, len(short) :] = True
    both, frame_pad = model(batch, pad)
    alone, _ = model(short[None])
    n = alone.shape[1]
    assert frame_pad is not None and int((~frame_pad[0]).sum()) == n
    assert torch.allclose(both[0, :n], alone[0], atol=1e-4)  # padding does not change the short one
    # in training, the batch statistics come from the valid frames only: zeroing the padded
    # samples or filling them with noise gives the same outputs on the valid frames
    model.train()
    model.mask_prob = model.mask_channel_prob = 0.0
    noisy = batch.clone()
    noisy[0, len(short) :] = torch.randn(len(long) - len(short))
    torch.manual_seed(0)  # the same layerdrop draws for both
    a, _ = model(batch, pad)
    torch.manual_seed(0)
    b, _ = model(noisy, pad)
    assert torch.allclose(a[0, :n], b[0, :n], atol=1e-4) and torch.allclose(a[1], b[1], atol=1e-4)


def test_fine_tuning_masks_are_on_in_training_only() -> None:
    cfg = tiny_audio_config(2)
    ft = finetune_preset("audio_ctc", mask_length=2, mask_channel_length=4, mask_prob=0.5)
    model, _ = build_finetune_model(cfg, None, ft, 5)
    model.mask_prob, model.mask_length = 0.5, 2
    model.mask_channel_prob, model.mask_channel_length = 0.25, 4
    wav = torch.from_numpy(tone(440.0, 0.3))[None]
    model.eval()
    a, _ = model(wav)
    b, _ = model(wav)
    assert torch.equal(a, b)
    model.train()
    c, _ = model(wav)
    assert not torch.allclose(a, c)


def test_audio_classification_from_class_folders(tmp_path: Path) -> None:
    write_audio_folder(tmp_path / "clips")
    ft = finetune_preset("audio_cls", **FAST, lr=1e-3, mask_length=2, max_sample_size=3000)
    result = finetune(tiny_audio_config(2), ft, tmp_path / "clips", tmp_path / "clips", tmp_path / "ft", quiet=True)
    _, _, meta = load_finetuned(tmp_path / "ft")
    assert meta["classes"] == ["high", "low"] and result.metric == "accuracy"


def test_audio_classification_batch_norm_head(tmp_path: Path) -> None:
    write_audio_folder(tmp_path / "clips")
    ft = finetune_preset("audio_cls", **FAST, lr=1e-3, mask_length=2, max_sample_size=3000, head_norm="batch")
    finetune(tiny_audio_config(2), ft, tmp_path / "clips", tmp_path / "clips", tmp_path / "ft", quiet=True)
    model, _, meta = load_finetuned(tmp_path / "ft")
    norm = model.head[0]
    assert meta["config"]["head_norm"] == "batch" and isinstance(norm, torch.nn.BatchNorm1d) and not norm.affine
    # training updated the running statistics, and they were saved and loaded with the weights
    assert norm.running_var is not None and not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))
    wav = torch.randn(3, 3000)
    model.eval()
    a, _ = model(wav)
    b, _ = model(wav[:1])
    assert torch.allclose(a[:1], b, atol=1e-5)  # eval: running statistics, no batch dependence
    model.train()
    one, _ = model(wav[:1])  # a training batch of one falls back to the running statistics
    assert one.shape == (1, 2) and torch.isfinite(one).all()
    with pytest.raises(ConfigError, match="head_norm"):
        FinetuneConfig(task="audio_cls", head_norm="group")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- text


def test_text_classification_tsv_first_token_head(tmp_path: Path) -> None:
    cfg = text_config(tmp_path)
    rows = ["sentence\tlabel"] + [
        f"this movie is {w} and {v}\t{int(w in ('good', 'great'))}"
        for w in ("good", "bad", "great", "awful")
        for v in ("fun", "dull")
    ]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    ft = finetune_preset("text_cls", **FAST, lr=1e-3)
    result = finetune(cfg, ft, tmp_path / "train.tsv", tmp_path / "train.tsv", tmp_path / "ft", quiet=True)
    model, _, meta = load_finetuned(tmp_path / "ft")
    assert meta["classes"] == ["0", "1"] and result.metric == "accuracy"
    dense, tanh, out_proj = model.head
    assert isinstance(tanh, torch.nn.Tanh) and out_proj.out_features == 2 and dense.in_features == 32


def test_text_regression_jsonl(tmp_path: Path) -> None:
    cfg = text_config(tmp_path)
    recs = [{"text": f"this movie is {w}", "label": s} for w, s in (("good", 4.0), ("bad", 1.0), ("great", 4.5))] * 3
    (tmp_path / "sts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ft = finetune_preset("text_reg", **FAST, lr=1e-3)
    result = finetune(cfg, ft, tmp_path / "sts.jsonl", tmp_path / "sts.jsonl", tmp_path / "ft", quiet=True)
    assert result.metric == "pearson" and {"eval_pearson", "eval_spearman", "eval_mse"} <= set(result.history[0])


def test_labelled_set_subset_and_in_memory_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(np.full((16, 16), v, np.uint8), "L") for v in rng.integers(0, 255, 12)]
    data = LabelledSet(lambda i: imgs[i], [int(i % 2) for i in range(12)], ["a", "b"])
    sub = data.subset([0, 2, 4])
    assert len(sub) == 3 and sub.targets == [0, 0, 0] and sub.load(1) is imgs[2]
    ft = FinetuneConfig(task="image_cls", epochs=1, batch_size=4)
    result = finetune(image_config(), ft, data, data.subset(range(4)), tmp_path / "ft", quiet=True)
    assert result.best_epoch == 1


# ----------------------------------------------------------------------------- CLI


def test_cli_finetune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train(apply_overrides(image_config(), ["train.steps=1"]), tmp_path / "run", progress=False, quiet=True)
    write_images(tmp_path / "img", n=4)
    rc = main(
        [
            "finetune",
            "--checkpoint",
            str(tmp_path / "run"),
            "--task",
            "image_cls",
            "--train",
            str(tmp_path / "img"),
            "--eval",
            str(tmp_path / "img"),
            "--out",
            str(tmp_path / "ft"),
            "--epochs",
            "1",
            "--set",
            "batch_size=4",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "best accuracy" in capsys.readouterr().out
    assert (tmp_path / "ft" / "best" / "model.safetensors").is_file()
    rc = main(["finetune", "--checkpoint", str(tmp_path / "run"), "--task", "image_cls", "--train", "x",
               "--eval", "y", "--out", str(tmp_path / "ft2"), "--set", "layer_decay=2"])  # fmt: skip
    assert rc == 2
