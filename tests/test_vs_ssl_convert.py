"""benchmarks/vs_ssl_image.py's MAE -> ours conversion: the converted encoder computes what
transformers' ViTMAEModel computes with every patch visible, token by token."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import make_images, make_tiny_config

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vs_ssl_image  # noqa: E402

from data2vec.interop import InteropError  # noqa: E402
from data2vec.nn.pos import sincos_2d  # noqa: E402
from data2vec.pretrained import build_model, load_pretrained  # noqa: E402


def _random_mae(seed: int = 0, positions: bool = True) -> torch.nn.Module:
    """A tiny ViTMAEModel shaped like the tiny test config, every weight random (LayerNorms and
    biases too, so that swapping any two of them changes the output); the position table MAE's
    sin-cos one (`published_init`) or, without `positions`, the zeros transformers 5.x leaves."""
    from transformers import ViTMAEForPreTraining

    mcfg = vs_ssl_image.mae_config(make_tiny_config(2))
    mcfg.mask_ratio = 0.0
    torch.manual_seed(seed)
    full = ViTMAEForPreTraining(mcfg)
    mae = (vs_ssl_image.published_init(full) if positions else full).vit.eval()
    return _randomise(mae, "layernorm", skip="embeddings.position_embeddings")


def _randomise(model: torch.nn.Module, norm: str, skip: str = "") -> torch.nn.Module:
    """Every parameter (but `skip`) random, norms around 1 (those whose name holds `norm`), so that
    swapping any two of them changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != skip:
                p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if norm in name else 0.0))
    return model


def _mae_tokens(mae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    mc = mae.config
    T = (mc.image_size // mc.patch_size) ** 2
    noise = torch.arange(T, dtype=torch.float32).expand(len(x), -1)  # the identity shuffle
    out = mae(pixel_values=x, noise=noise)
    assert torch.equal(out.ids_restore, noise.long())
    return out.last_hidden_state


def _ours_tokens(state: dict[str, torch.Tensor], folder: Path, x: torch.Tensor) -> torch.Tensor:
    vs_ssl_image.mae_to_ours(state, make_tiny_config(2), folder)
    model = build_model(load_pretrained(folder))
    return model.encode(x).x


@pytest.mark.parametrize("positions", [True, False], ids=["sincos", "zero-table"])
def test_converted_mae_matches_transformers(tmp_path: Path, positions: bool) -> None:
    mae = _random_mae(positions=positions)
    table = mae.embeddings.position_embeddings[0, 1:]
    assert torch.equal(table, sincos_2d(32, (4, 4)) if positions else torch.zeros_like(table))
    x = make_images(3)
    with torch.no_grad():
        ref = _mae_tokens(mae, x)
        ours = _ours_tokens(mae.state_dict(), tmp_path / "mae", x)
    assert ours.shape == ref.shape == (3, 17, 32)  # CLS + 4x4 patches
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), float((ours - ref).abs().max())
    assert load_pretrained(tmp_path / "mae").config.model.image.positions == ("sincos" if positions else "none")
    # the ForPreTraining form (vit. prefix, decoder dropped) converts to the same weights
    wrapped = {f"vit.{k}": v for k, v in mae.state_dict().items()} | {"decoder.decoder_norm.weight": torch.ones(32)}
    a = vs_ssl_image.mae_state_to_ours(wrapped, make_tiny_config(2))
    b = vs_ssl_image.mae_state_to_ours(mae.state_dict(), make_tiny_config(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "a,b",
    [
        ("layers.1.layernorm_before.weight", "layers.1.layernorm_after.weight"),
        ("layers.0.attention.q_proj.weight", "layers.0.attention.k_proj.weight"),
        ("layers.2.mlp.fc2.bias", "layers.2.attention.o_proj.bias"),
    ],
)
def test_a_wrong_mapping_changes_the_output(tmp_path: Path, a: str, b: str) -> None:
    """The comparison above is sensitive to each mapping: two weights swapped differ visibly."""
    mae = _random_mae()
    x = make_images(2)
    state = dict(mae.state_dict())
    state[a], state[b] = state[b], state[a]
    with torch.no_grad():
        ref = _mae_tokens(mae, x)
        ours = _ours_tokens(state, tmp_path / "swapped", x)
    assert float((ours - ref).abs().max()) > 1e-2


def test_a_foreign_position_table_is_refused(tmp_path: Path) -> None:
    state = dict(_random_mae().state_dict())
    pos = state["embeddings.position_embeddings"].clone()
    state["embeddings.position_embeddings"] = torch.cat([pos[..., 16:], pos[..., :16]], -1)  # rows first
    with pytest.raises(InteropError, match="neither zero nor our fixed sin-cos"):
        vs_ssl_image.mae_to_ours(state, make_tiny_config(2), tmp_path / "bad")


def test_published_init_gives_mae_its_position_tables() -> None:
    """transformers 5.x leaves a ViTMAE built from a config without positions; the peer's
    pretraining re-runs transformers' own initialisers (published_init)."""
    from transformers import ViTMAEForPreTraining

    mcfg = vs_ssl_image.mae_config(make_tiny_config(2))
    torch.manual_seed(0)
    model = vs_ssl_image.published_init(ViTMAEForPreTraining(mcfg))
    zero_row = torch.zeros(1, 32)
    assert torch.equal(model.vit.embeddings.position_embeddings[0], torch.cat([zero_row, sincos_2d(32, (4, 4))]))
    assert torch.equal(model.decoder.decoder_pos_embed[0], torch.cat([zero_row, sincos_2d(32, (4, 4))]))
    assert bool(model.vit.embeddings.cls_token.detach().any()) and bool(model.decoder.mask_token.detach().any())
    assert not model.vit.embeddings.position_embeddings.requires_grad


def _random_roberta(seed: int = 0) -> torch.nn.Module:
    """A small RobertaModel, every weight random (norms and biases too)."""
    from transformers import RobertaConfig, RobertaModel

    rcfg = RobertaConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = RobertaModel(rcfg, add_pooling_layer=False).eval()
    return _randomise(model, "LayerNorm")


def test_converted_roberta_matches_transformers(tmp_path: Path) -> None:
    """vs_ssl_text.peer_to_ours: RoBERTa's encoder as our text model, token for token, padding included."""
    import vs_ssl_text

    roberta = _random_roberta()
    snap = tmp_path / "peer.pt"
    torch.save({"config": roberta.config.to_dict(), "encoder": roberta.state_dict()}, snap)
    folder = vs_ssl_text.peer_to_ours(str(snap), tmp_path / "ours")
    model = build_model(load_pretrained(folder)).eval()
    ids = torch.randint(3, 60, (3, 12))
    ids[:, 0] = 0
    ids[2, 8:] = 1  # the last sentence is padded
    valid = ids.ne(1)
    with torch.no_grad():
        ref = roberta(input_ids=ids, attention_mask=valid).last_hidden_state
        ours = model.encode(ids, padding_mask=~valid).x
    assert ours.shape == ref.shape == (3, 12, 32)
    assert torch.allclose(ours[valid], ref[valid], atol=1e-5, rtol=0), float((ours - ref)[valid].abs().max())
    with pytest.raises(InteropError, match="expected 'roberta'"):
        vs_ssl_text.roberta_to_ours({"model_type": "bert"}, roberta.state_dict(), tmp_path / "bad")


def _random_w2v(seed: int = 0) -> torch.nn.Module:
    """A small post-norm Wav2Vec2Model with a layer-norm CNN, every weight random."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    wcfg = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        feat_extract_norm="layer",
        do_stable_layer_norm=False,
        conv_dim=[16, 16],
        conv_kernel=[10, 3],
        conv_stride=[5, 2],
        conv_bias=False,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
    )
    torch.manual_seed(seed)
    model = Wav2Vec2Model(wcfg).eval()
    return _randomise(model, "layer_norm.weight")


def test_converted_wav2vec2_matches_transformers(tmp_path: Path) -> None:
    """vs_ssl_audio.w2v_to_ours: wav2vec 2.0's encoder (weight-normed positional conv, no norm
    after it) as our audio model, frame for frame, a padded clip included."""
    import vs_ssl_audio

    w2v = _random_w2v()
    folder = vs_ssl_audio.w2v_to_ours(w2v, tmp_path / "ours")
    pre = load_pretrained(folder)
    assert pre.config.model.audio.pos_conv_norm is False and pre.config.model.audio.pos_conv_kernel == 16
    model = build_model(pre).eval()
    x = torch.randn(2, 1600)
    with torch.no_grad():
        ref = w2v(x).last_hidden_state
        ours = model.encode(x).x
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), float((ours - ref).abs().max())
    # the normalised form (data2vec's) differs: the flag is what makes the two agree
    normed = load_pretrained(folder)
    from dataclasses import replace

    m = normed.config.model
    normed.config = replace(normed.config, model=replace(m, audio=replace(m.audio, pos_conv_norm=True)))
    with torch.no_grad():
        other = build_model(normed).eval().encode(x).x
    assert float((other - ref).abs().max()) > 1e-2


def test_runs_with_other_seeds_or_overrides_get_their_own_folders() -> None:
    import argparse

    import vs_ssl

    def tag(seed: int, overrides: list[str]) -> str:
        return vs_ssl.run_tag(argparse.Namespace(seed=seed, overrides=overrides))

    assert tag(0, []) == ""
    assert tag(1, []) == "-seed1"
    ema = tag(1, ["teacher.decay=0.99"])
    assert (
        ema.startswith("-seed1-") and ema != tag(1, ["teacher.decay=0.999"]) and ema == tag(1, ["teacher.decay=0.99"])
    )


def test_the_recipe_line_names_what_the_task_uses() -> None:
    import vs_ssl

    from data2vec.finetune import finetune_preset

    image = vs_ssl.recipe_line(finetune_preset("image_cls").to_dict())
    text = vs_ssl.recipe_line(finetune_preset("text_cls", lr=5e-4).to_dict())
    audio = vs_ssl.recipe_line(finetune_preset("audio_cls", head_norm="batch").to_dict())
    assert "mixup" in image and "crop scale" in image
    assert "mixup" not in text and "lr 0.0005" in text
    assert "batch-norm head, CNN frozen" in audio and "mixup" not in audio
