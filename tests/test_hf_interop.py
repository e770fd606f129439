"""Parity with Hugging Face transformers' data2vec 1.0 models (Data2VecVision / Audio / Text).

Tiny random transformers models are saved to disk, imported with `load_hf`, run through our
model and compared with transformers' eager forward, every hidden state included; then our
model is written back with `save_hf`, loaded by transformers (no missing or unexpected
weights) and compared again. Nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

T = pytest.importorskip("transformers")

from data2vec.cli import main  # noqa: E402
from data2vec.config import apply_overrides  # noqa: E402
from data2vec.interop import InteropError, save_pretrained  # noqa: E402
from data2vec.interop.hf import HFOutput, forward_like_hf, load_hf, save_hf  # noqa: E402
from data2vec.model import Data2Vec  # noqa: E402
from data2vec.presets import preset  # noqa: E402
from data2vec.pretrained import build_model, from_hf, load_model, load_pretrained  # noqa: E402

T.logging.set_verbosity_error()
TOL = 1e-5
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)


def randomize(model: Any, seed: int = 0) -> Any:
    """Random values for every parameter: transformers initialises CLS tokens, relative tables and
    LayerScale to constants, which would hide mapping mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim <= 1 or p.shape[-1] <= 4 else 0.1))
    return model.eval()


def max_diff(ours: HFOutput, theirs: Any, valid: torch.Tensor | None = None) -> float:
    """Largest |difference| over the embedding output, every block output and last_hidden_state
    (only at `valid` positions when given)."""
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    pairs = [*zip(ours.hidden_states, theirs.hidden_states, strict=True)]
    pairs.append((ours.last_hidden_state, theirs.last_hidden_state))
    worst = 0.0
    for a, b in pairs:
        assert a.shape == b.shape
        if valid is not None:
            a, b = a[valid], b[valid]
        worst = max(worst, float((a - b).abs().max()))
    return worst


def hf_forward(model: Any, *args: Any, **kw: Any) -> Any:
    with torch.no_grad():
        return model(*args, output_hidden_states=True, **kw)


def reload(cls: Any, folder: Path, **kw: Any) -> Any:
    """transformers' own loader on our export; it must find exactly the weights it needs."""
    model, info = cls.from_pretrained(folder, attn_implementation="eager", output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


# ----------------------------------------------------------------------------- vision

VISION_CASES = {
    # name: (config overrides, image (H, W), pooling layer)
    "shared-bias+final-norm": (dict(use_shared_relative_position_bias=True, use_mean_pooling=False), (32, 32), False),
    "per-layer-bias+mean-pool+non-square": (
        dict(use_relative_position_bias=True, use_mean_pooling=True, image_size=[32, 48]),
        (32, 48),
        True,
    ),
    "both-biases+non-square+eps": (
        dict(
            use_shared_relative_position_bias=True,
            use_relative_position_bias=True,
            use_mean_pooling=False,
            image_size=[48, 32],
            layer_norm_eps=1e-6,
        ),
        (48, 32),
        True,
    ),
    "absolute-pos+no-layer-scale+tanh-gelu": (
        dict(use_absolute_position_embeddings=True, layer_scale_init_value=0.0, hidden_act="gelu_pytorch_tanh"),
        (32, 32),
        True,
    ),
}


@pytest.mark.parametrize("case", list(VISION_CASES))
def test_vision_parity_and_round_trip(case: str, tmp_path: Path) -> None:
    overrides, (h, w), pooling = VISION_CASES[case]
    cfg = T.Data2VecVisionConfig(
        **TINY, **{"image_size": 32, **overrides}, patch_size=8, use_mask_token=True, attn_implementation="eager"
    )
    ref_model = randomize(T.Data2VecVisionModel(cfg, add_pooling_layer=pooling))
    ref_model.save_pretrained(tmp_path / "hf")
    imp = load_hf(tmp_path / "hf")
    assert imp.config.model.version == 1 and imp.config.model.image.image_size == (h, w)
    ours = build_model(from_hf(imp))
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    ref = hf_forward(ref_model, x)
    out = forward_like_hf(ours, x, head=imp.head)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    assert max_diff(out, ref) <= TOL
    if pooling:
        assert out.pooler_output is not None
        assert float((out.pooler_output - ref.pooler_output).abs().max()) <= TOL

    save_hf(ours, tmp_path / "back", imp.head)
    back = reload(T.Data2VecVisionModel, tmp_path / "back", add_pooling_layer=pooling)
    ref2 = hf_forward(back, x)
    assert max_diff(out, ref2) <= TOL
    if pooling:
        assert float((out.pooler_output - ref2.pooler_output).abs().max()) <= TOL


def test_non_square_needs_the_transformers_table_resampling(tmp_path: Path) -> None:
    """transformers reads the relative-position table transposed on a non-square grid; without
    `image.rel_pos_hf_resample` the outputs differ, and such a model is refused on export."""
    cfg = T.Data2VecVisionConfig(
        **TINY, image_size=[32, 48], patch_size=8, use_relative_position_bias=True, attn_implementation="eager"
    )
    ref_model = randomize(T.Data2VecVisionModel(cfg))
    ref_model.save_pretrained(tmp_path / "hf")
    imp = load_hf(tmp_path / "hf")
    assert imp.config.model.image.rel_pos_hf_resample
    plain_cfg = replace(
        imp.config, model=replace(imp.config.model, image=replace(imp.config.model.image, rel_pos_hf_resample=False))
    )
    plain = build_model(replace(from_hf(imp), config=plain_cfg))
    x = torch.randn(1, 3, 32, 48)
    ref = hf_forward(ref_model, x)
    assert max_diff(forward_like_hf(plain, x), ref) > 1e-4
    with pytest.raises(InteropError, match="non-square"):
        save_hf(plain, tmp_path / "out")


# ----------------------------------------------------------------------------- audio


def audio_config(**kw: Any) -> Any:
    return T.Data2VecAudioConfig(
        **TINY,
        conv_dim=(16, 16, 16),
        conv_kernel=(10, 3, 2),
        conv_stride=(5, 2, 2),
        conv_pos_kernel_size=5,
        num_conv_pos_embeddings=3,
        num_conv_pos_embedding_groups=2,
        attn_implementation="eager",
        **kw,
    )


def padded_audio() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    lengths = [3200, 2500, 1400]
    x = torch.zeros(3, max(lengths))
    mask = torch.zeros(3, max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randn(n, generator=g)
        mask[i, :n] = 1
    return x, mask


def test_audio_padded_batch_parity_and_round_trip(tmp_path: Path) -> None:
    ref_model = randomize(T.Data2VecAudioModel(audio_config()))
    ref_model.save_pretrained(tmp_path / "hf")
    imp = load_hf(tmp_path / "hf")
    a = imp.config.model.audio
    assert a.conv_layers == ((16, 10, 5), (16, 3, 2), (16, 2, 2)) and a.pos_conv_zero_padding == "input"
    ours = build_model(from_hf(imp))
    x, mask = padded_audio()
    ref = hf_forward(ref_model, x, attention_mask=mask)
    out = forward_like_hf(ours, x, mask)
    assert out.padding_mask is not None and bool(out.padding_mask.any())
    valid = ~out.padding_mask
    assert max_diff(out, ref, valid) <= TOL

    save_hf(ours, tmp_path / "back")
    back = reload(T.Data2VecAudioModel, tmp_path / "back")
    assert max_diff(out, hf_forward(back, x, attention_mask=mask), valid) <= TOL


# ----------------------------------------------------------------------------- text


def text_config(**kw: Any) -> Any:
    base = dict(vocab_size=100, max_position_embeddings=34, attn_implementation="eager")
    return T.Data2VecTextConfig(**TINY, **{**base, **kw})


def padded_ids() -> torch.Tensor:
    return torch.tensor([[0, 10, 11, 12, 13, 14, 2], [0, 15, 16, 2, 1, 1, 1], [0, 17, 2, 1, 1, 1, 1]])


@pytest.mark.parametrize(
    "overrides",
    [dict(type_vocab_size=1, layer_norm_eps=1e-5), dict(type_vocab_size=2, hidden_act="relu")],
    ids=["roberta-like", "two-token-types+relu+eps-1e-12"],
)
def test_text_padded_batch_parity_and_round_trip(overrides: dict[str, Any], tmp_path: Path) -> None:
    ref_model = randomize(T.Data2VecTextModel(text_config(**overrides)))  # with its pooler
    ref_model.save_pretrained(tmp_path / "hf")
    imp = load_hf(tmp_path / "hf")
    assert imp.config.model.text.max_positions == 32 and imp.head.kind == "pooler"
    ours = build_model(from_hf(imp))
    ids = padded_ids()
    attn = ids.ne(1).long()
    ref = hf_forward(ref_model, ids, attention_mask=attn)
    out = forward_like_hf(ours, ids, attn, imp.head)
    assert max_diff(out, ref, attn.bool()) <= TOL
    assert out.pooler_output is not None and float((out.pooler_output - ref.pooler_output).abs().max()) <= TOL

    save_hf(ours, tmp_path / "back", imp.head)
    back = reload(T.Data2VecTextModel, tmp_path / "back")
    ref2 = hf_forward(back, ids, attention_mask=attn)
    assert max_diff(out, ref2, attn.bool()) <= TOL
    assert float((out.pooler_output - ref2.pooler_output).abs().max()) <= TOL


# ----------------------------------------------------------------------------- heads

HEAD_CASES = {
    "image-classification": (
        lambda: T.Data2VecVisionForImageClassification(
            T.Data2VecVisionConfig(
                **TINY,
                image_size=32,
                patch_size=8,
                use_relative_position_bias=True,
                num_labels=5,
                id2label={i: f"class{i}" for i in range(5)},
                label2id={f"class{i}": i for i in range(5)},
                attn_implementation="eager",
            )
        ),
        lambda: (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)),),
        "image_classification",
        5,
    ),
    "ctc": (
        lambda: T.Data2VecAudioForCTC(audio_config(vocab_size=12, pad_token_id=0)),
        lambda: padded_audio(),
        "ctc",
        12,
    ),
    "sequence-classification": (
        lambda: T.Data2VecTextForSequenceClassification(text_config(type_vocab_size=1, num_labels=3)),
        lambda: (padded_ids(), padded_ids().ne(1).long()),
        "sequence_classification",
        3,
    ),
}


@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_task_heads(case: str, tmp_path: Path) -> None:
    make, inputs, kind, num_labels = HEAD_CASES[case]
    ref_model = randomize(make())
    ref_model.save_pretrained(tmp_path / "hf")
    imp = load_hf(tmp_path / "hf")
    assert imp.head.kind == kind and imp.head.num_labels == num_labels
    if case == "image-classification":
        assert imp.head.id2label[4] == "class4"
    ours = build_model(from_hf(imp))
    args = inputs()
    kw = {"attention_mask": args[1]} if len(args) > 1 else {}
    ref = hf_forward(ref_model, args[0], **kw)
    out = forward_like_hf(ours, args[0], args[1] if len(args) > 1 else None, imp.head)
    assert out.logits is not None and out.logits.shape == ref.logits.shape
    valid = out.padding_mask is not None and case == "ctc"
    a, b = (out.logits[~out.padding_mask], ref.logits[~out.padding_mask]) if valid else (out.logits, ref.logits)
    assert float((a - b).abs().max()) <= TOL

    # Export with the head: transformers' task class loads it, labels and head weights intact.
    save_hf(ours, tmp_path / "back", imp.head)
    source = load_file(str(tmp_path / "hf" / "model.safetensors"))
    exported = load_file(str(tmp_path / "back" / "model.safetensors"))
    head_keys = [k for k in source if not k.startswith(("data2vec_vision.", "data2vec_audio.", "data2vec_text."))]
    head_keys += [k for k in source if ".pooler." in k]
    assert head_keys and all(torch.equal(source[k], exported[k]) for k in head_keys)
    back = reload(type(ref_model), tmp_path / "back")
    outputs = back.config.vocab_size if case == "ctc" else back.config.num_labels  # CTC: labels = vocabulary
    assert outputs == num_labels and back.config.id2label == ref_model.config.id2label
    ref2 = hf_forward(back, args[0], **kw)
    a, b = (out.logits[~out.padding_mask], ref2.logits[~out.padding_mask]) if valid else (out.logits, ref2.logits)
    assert float((a - b).abs().max()) <= TOL


# ----------------------------------------------------------------------------- formats, convert, errors


def test_pytorch_model_bin_and_legacy_names(tmp_path: Path) -> None:
    """Old hub checkpoints: pytorch_model.bin (weights-only torch pickle), `LayerNorm.gamma/beta`."""
    ref_model = randomize(T.Data2VecTextModel(text_config(type_vocab_size=1)))
    folder = tmp_path / "old"
    folder.mkdir()
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in ref_model.state_dict().items()}  # fmt: skip
    sd["embeddings.position_ids"] = torch.arange(34)[None]
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(ref_model.config.to_json_string())
    ours = build_model(from_hf(load_hf(folder)))
    ids = padded_ids()
    ref = hf_forward(ref_model, ids, attention_mask=ids.ne(1).long())
    assert max_diff(forward_like_hf(ours, ids, ids.ne(1).long()), ref, ids.ne(1)) <= TOL


def test_convert_cli_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref_model = randomize(T.Data2VecVisionForImageClassification(T.Data2VecVisionConfig(
        **TINY, image_size=32, patch_size=8, use_shared_relative_position_bias=True, num_labels=4,
        attn_implementation="eager")))  # fmt: skip
    ref_model.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_logits = ref_model(x).logits

    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert "task head kept: Data2VecVisionForImageClassification" in capsys.readouterr().out
    data = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert data["model"]["version"] == 1 and data["model"]["encoder"]["position_bias"] == "shared"
    source = load_pretrained(tmp_path / "ours")
    assert source.kind == "data2vec" and source.head is not None and source.head.num_labels == 4
    out = forward_like_hf(build_model(source), x, head=source.head)
    assert out.logits is not None and float((out.logits - ref_logits).abs().max()) <= TOL

    # our folder -> transformers; converting again into the same folder replaces it
    for _ in range(2):
        assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    back = reload(T.Data2VecVisionForImageClassification, tmp_path / "hf2")
    with torch.no_grad():
        assert float((back(x).logits - ref_logits).abs().max()) <= TOL

    # a folder holding other files is never overwritten
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "busy")]) == 2
    assert "holds other files" in capsys.readouterr().err


def small_image_v1() -> Any:
    """image-tiny 1.0 (BEiT-shaped), narrowed to keep the tests quick."""
    cfg = preset("image-tiny", 1)
    encoder = replace(cfg.model.encoder, dim=64, depth=2, num_heads=4)
    return replace(cfg, model=replace(cfg.model, encoder=encoder), targets=replace(cfg.targets, top_k=2))


def test_training_checkpoint_and_run_dir(tmp_path: Path) -> None:
    from data2vec.checkpoint import save_checkpoint

    cfg = small_image_v1()
    model = Data2Vec.from_config(cfg)
    save_checkpoint(tmp_path / "run", 7, model.student_state_dict(), model.teacher_state_dict(), cfg.to_dict(), {})
    cfg.save(tmp_path / "run" / "config.json")  # a run directory holds the resolved config too
    source = load_pretrained(tmp_path / "run")
    assert source.kind == "checkpoint" and source.config == cfg
    loaded = build_model(source)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).x, model.eval().encode(x).x)
    save_pretrained(loaded, tmp_path / "pretrained", config=cfg)
    again = load_model(tmp_path / "pretrained")
    with torch.no_grad():
        assert torch.equal(again.encode(x).x, model.encode(x).x)
    # and out to transformers: a 1.0 image preset is BEiT-shaped
    save_hf(again, tmp_path / "hf")
    back = reload(T.Data2VecVisionModel, tmp_path / "hf")
    with torch.no_grad():
        assert float((back(x).last_hidden_state - model.encode(x).x).abs().max()) <= TOL


@pytest.mark.parametrize("name", ["audio-tiny", "text-tiny"])
def test_models_trained_here_export_to_transformers(name: str, tmp_path: Path) -> None:
    cfg = preset(name, 1)
    if name == "text-tiny":  # a small vocabulary keeps the test fast
        text = replace(cfg.model.text, vocab_size=300, mask_id=299)
        cfg = replace(cfg, model=replace(cfg.model, text=text))
    torch.manual_seed(0)
    model = Data2Vec.from_config(cfg).eval()
    if name == "audio-tiny":
        x = torch.randn(2, 4000)
        with pytest.warns(UserWarning, match="pos_conv_zero_padding"):
            save_hf(model, tmp_path / "hf")
        back = reload(T.Data2VecAudioModel, tmp_path / "hf")
    else:
        x = torch.randint(4, 299, (2, 20))
        save_hf(model, tmp_path / "hf")
        back = reload(T.Data2VecTextModel, tmp_path / "hf", add_pooling_layer=False)
    ours = forward_like_hf(model, x)
    assert max_diff(ours, hf_forward(back, x)) <= TOL


def test_fairseq_checkpoints_are_read_and_converted(tmp_path: Path) -> None:
    from tests.test_fairseq import image_v2_checkpoint

    _, model, path = image_v2_checkpoint(tmp_path)
    source = load_pretrained(path)
    assert source.kind == "fairseq" and not any(k.startswith("teacher.") for k in source.student)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 0
    x = torch.randn(1, 3, *source.config.model.image.image_size)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "out").encode(x).x, model.eval().encode(x).x)


def test_data2vec_2_export_is_refused(tmp_path: Path) -> None:
    model = Data2Vec.from_config(preset("image-tiny", 2))
    with pytest.raises(InteropError, match=r"data2vec 2\.0.*self-describing"):
        save_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2


def test_a_positional_conv_without_norm_is_not_exported(tmp_path: Path) -> None:
    """`audio.pos_conv_norm=false` (wav2vec 2.0's positional conv) has no data2vec-audio form in
    transformers: refused with the key named, nothing written."""
    cfg = apply_overrides(preset("audio-tiny", 1), ["model.audio.pos_conv_norm=false"])
    with pytest.raises(InteropError, match="audio.pos_conv_norm must be true"):
        save_hf(Data2Vec.from_config(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_download_failure_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*args: Any, **kw: Any) -> str:
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(InteropError, match="hub download failed.*Offline"):
        load_hf("facebook/data2vec-vision-base")


def test_reading_needs_no_transformers() -> None:
    code = "import sys, data2vec.interop.hf; assert 'transformers' not in sys.modules, 'imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)
