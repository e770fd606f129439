"""Hugging Face transformers checkpoints of data2vec 1.0: Data2VecVision, Data2VecAudio, Data2VecText.

- `load_hf(path_or_hub_id)` reads a transformers folder (config.json + model.safetensors, sharded
  safetensors, or a `pytorch_model.bin` loaded with `weights_only=True`) into our RunConfig and
  our key names, with task-head weights kept apart (`HFHead`).
- `save_hf(model, out_dir)` writes a data2vec 1.0 model so that
  `transformers.Data2Vec{Vision,Audio,Text}Model.from_pretrained(out_dir)` loads it with no missing
  or unexpected weights and computes the same hidden states.
- `forward_like_hf(model, inputs)` runs our model and returns what transformers returns
  (`hidden_states` with the embedding output first, `last_hidden_state`, pooler output, head logits).

transformers itself is never imported: config.json is plain JSON and the weights are safetensors.
Only a hub id needs `huggingface_hub` (installed with transformers). The architecture notes
behind every mapping here are in docs/interop.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from data2vec.config import (
    AudioConfig,
    ConfigError,
    EncoderConfig,
    ImageConfig,
    Modality,
    ModelConfig,
    RunConfig,
    TextConfig,
)
from data2vec.interop import InteropError, Source, build_model, tensors_for_saving, write_folder
from data2vec.modalities.audio import conv_output_lengths, lengths_to_padding_mask
from data2vec.model import Data2Vec
from data2vec.nn.pos import sincos_2d

MODEL_TYPE: dict[str, Modality] = {"data2vec-vision": "image", "data2vec-audio": "audio", "data2vec-text": "text"}
TYPE_OF: dict[str, str] = {v: k for k, v in MODEL_TYPE.items()}
PREFIX = {"image": "data2vec_vision.", "audio": "data2vec_audio.", "text": "data2vec_text."}
BARE = {"image": "Data2VecVisionModel", "audio": "Data2VecAudioModel", "text": "Data2VecTextModel"}
HEAD_KINDS = {
    "Data2VecVisionForImageClassification": "image_classification",
    "Data2VecAudioForCTC": "ctc",
    "Data2VecTextForSequenceClassification": "sequence_classification",
}
"""Heads `head_logits` can run; any other head's weights are still kept and written back."""
BASE_PRESET = {"image": "image-base", "audio": "audio-base", "text": "text-base"}

# Backbone weights by their (prefix-free) first name component; everything else is head.
_BACKBONE = {
    "image": ("embeddings.", "encoder.", "layernorm."),
    "audio": ("feature_extractor.", "feature_projection.", "encoder.", "masked_spec_embed", "adapter."),
    "text": ("embeddings.", "encoder."),
}
_IGNORED = ("relative_position_index", "embeddings.position_ids", "embeddings.token_type_ids")

Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]
PositionBias = Literal["none", "shared", "per_layer", "both"]
_ACT_IN: dict[str, Activation] = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_ACT_IN |= {"relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}

# transformers class defaults for the keys a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "image": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        image_size=224,
        patch_size=16,
        num_channels=3,
        use_mask_token=False,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=False,
        layer_scale_init_value=0.1,
        drop_path_rate=0.1,
        use_mean_pooling=True,
        out_indices=[3, 5, 7, 11],
        pool_scales=[1, 2, 3, 6],
        use_auxiliary_head=True,
        auxiliary_loss_weight=0.4,
        auxiliary_channels=256,
        auxiliary_num_convs=1,
        auxiliary_concat_input=False,
        semantic_loss_ignore_index=255,
    ),  # fmt: skip
    "audio": dict(
        vocab_size=32,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout=0.1,
        activation_dropout=0.1,
        attention_dropout=0.1,
        feat_proj_dropout=0.0,
        final_dropout=0.1,
        layerdrop=0.1,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        feat_extract_activation="gelu",
        conv_dim=[512] * 7,
        conv_stride=[5, 2, 2, 2, 2, 2, 2],
        conv_kernel=[10, 3, 3, 3, 3, 2, 2],
        conv_bias=False,
        num_conv_pos_embedding_groups=16,
        conv_pos_kernel_size=19,
        num_conv_pos_embeddings=5,
        mask_time_prob=0.05,
        mask_time_length=10,
        mask_time_min_masks=2,
        mask_feature_prob=0.0,
        mask_feature_length=10,
        mask_feature_min_masks=0,
        ctc_loss_reduction="sum",
        ctc_zero_infinity=False,
        use_weighted_layer_sum=False,
        classifier_proj_size=256,
        tdnn_dim=[512, 512, 512, 512, 1500],
        tdnn_kernel=[5, 3, 3, 1, 1],
        tdnn_dilation=[1, 2, 3, 1, 1],
        xvector_output_dim=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        add_adapter=False,
        adapter_kernel_size=3,
        adapter_stride=2,
        num_adapter_layers=3,
    ),  # fmt: skip
    "text": dict(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=2,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        use_cache=True,
        classifier_dropout=None,
        is_decoder=False,
        add_cross_attention=False,
        tie_word_embeddings=True,
    ),  # fmt: skip
}
# Keys the RunConfig determines (written from it on export); the rest of a source config travels
# with the head description, so an import -> export round trip keeps labels, token ids, etc.
_DERIVED: dict[str, set[str]] = {
    "image": {
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "layer_norm_eps",
        "image_size",
        "patch_size",
        "num_channels",
        "use_absolute_position_embeddings",
        "use_relative_position_bias",
        "use_shared_relative_position_bias",
        "layer_scale_init_value",
        "drop_path_rate",
        "use_mean_pooling",
    },  # fmt: skip
    "audio": {
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout",
        "activation_dropout",
        "attention_dropout",
        "layerdrop",
        "layer_norm_eps",
        "feat_extract_activation",
        "conv_dim",
        "conv_stride",
        "conv_kernel",
        "conv_bias",
        "num_feat_extract_layers",
        "num_conv_pos_embedding_groups",
        "conv_pos_kernel_size",
        "num_conv_pos_embeddings",
        "add_adapter",
        "output_hidden_size",
    },  # fmt: skip
    "text": {
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "max_position_embeddings",
        "type_vocab_size",
        "layer_norm_eps",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "mask_token_id",
        "is_decoder",
        "add_cross_attention",
    },  # fmt: skip
}
_NOT_CARRIED = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype"}


# ----------------------------------------------------------------------------- head description


@dataclass
class HFHead:
    """What a transformers checkpoint holds beyond the backbone.

    `weights` use transformers' names without the backbone prefix (`classifier.weight`,
    `pooler.layernorm.weight`, `lm_head.weight`, `classifier.out_proj.bias`, ...); `config` holds the
    source config.json keys our RunConfig does not carry (labels, CTC vocabulary and blank id,
    SpecAugment settings, segmentation settings, ...), written back on export."""

    architecture: str
    kind: str
    """image_classification | ctc | sequence_classification (runnable by `head_logits`), pooler (a bare
    model's pooler only), none (no head weights), other (kept and written back, not run)."""
    num_labels: int | None = None
    id2label: dict[int, str] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (without the weights)."""
        return {
            "architecture": self.architecture,
            "kind": self.kind,
            "num_labels": self.num_labels,
            "id2label": {str(k): v for k, v in self.id2label.items()},
            "weights": sorted(self.weights),
            "config": self.config,
        }

    @classmethod
    def from_description(cls, data: dict[str, Any], weights: dict[str, Tensor]) -> HFHead:
        id2label = data.get("id2label") or {}
        return cls(
            architecture=str(data["architecture"]),
            kind=str(data["kind"]),
            num_labels=data.get("num_labels"),
            id2label={int(k): str(v) for k, v in id2label.items()},
            weights=weights,
            config=dict(data.get("config") or {}),
        )


@dataclass
class HFImport:
    """A transformers checkpoint in our terms."""

    config: RunConfig
    state_dict: dict[str, Tensor]
    """Backbone weights in our key names (`frontend.*`, `encoder.*`)."""
    head: HFHead
    hf_config: dict[str, Any]
    """The source config.json as read."""
    path: str

    def build_model(self) -> Data2Vec:
        return build_model(self.config, self.state_dict)

    def as_source(self) -> Source:
        return Source(self.config, self.state_dict, "transformers", self.path, self.head)


# ----------------------------------------------------------------------------- reading files


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InteropError(
            f"{repo_id}: not a local folder, and downloading from the Hugging Face hub needs huggingface_hub "
            "(pip install 'data2vec[hf]')"
        ) from None
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated, ...: fall back to the local cache
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:
            pass
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InteropError(
            f"{repo_id}: not a local folder, and the Hugging Face hub download failed ({type(e).__name__}: {msg}). "
            f"Offline? Fetch it where the hub is reachable (`hf download {repo_id} --local-dir DIR`) and pass DIR."
        ) from None


def _load_weights(folder: Path) -> dict[str, Tensor]:
    from data2vec.checkpoint import CheckpointError, safe_torch_load

    def shards(index_name: str) -> list[Path]:
        index = json.loads((folder / index_name).read_text())
        return [folder / name for name in sorted(set(index["weight_map"].values()))]

    out: dict[str, Tensor] = {}
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "model.safetensors.index.json").is_file():
        for shard in shards("model.safetensors.index.json"):
            out.update(load_file(str(shard)))
        return out
    bins = []
    if (folder / "pytorch_model.bin").is_file():
        bins = [folder / "pytorch_model.bin"]
    elif (folder / "pytorch_model.bin.index.json").is_file():
        bins = shards("pytorch_model.bin.index.json")
    if not bins:
        raise InteropError(f"{folder}: no model.safetensors or pytorch_model.bin")
    for b in bins:
        try:
            sd = safe_torch_load(b)
        except CheckpointError as e:
            raise InteropError(str(e)) from None
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise InteropError(f"{b}: expected a flat dict of tensors")
        out.update(sd)
    return out


# ----------------------------------------------------------------------------- config: HF -> ours


def _get(hf: dict[str, Any], modality: str, key: str) -> Any:
    return hf[key] if key in hf and hf[key] is not None else _DEFAULTS[modality][key]


def _activation(name: str, key: str) -> Activation:
    if name not in _ACT_IN:
        raise InteropError(f"{key}={name!r} is not supported (supported: {', '.join(sorted(_ACT_IN))})")
    return _ACT_IN[name]


def _mlp_ratio(dim: int, hidden: int) -> float:
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        raise InteropError(f"intermediate_size {hidden} is not representable as a ratio of hidden_size {dim}")
    return ratio


def _pair(value: Any, key: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise InteropError(f"{key}: expected an integer or two, got {value!r}")


def _model_config(hf: dict[str, Any], modality: Modality) -> ModelConfig:
    def g(key: str) -> Any:
        return _get(hf, modality, key)

    dim = int(g("hidden_size"))
    common = EncoderConfig(
        dim=dim,
        depth=int(g("num_hidden_layers")),
        num_heads=int(g("num_attention_heads")),
        mlp_ratio=_mlp_ratio(dim, int(g("intermediate_size"))),
        norm_eps=float(g("layer_norm_eps")),
        activation=_activation(g("hidden_act"), "hidden_act"),
    )
    if modality == "image":
        h, w = _pair(g("image_size"), "image_size")
        ph, pw = _pair(g("patch_size"), "patch_size")
        if ph != pw:
            raise InteropError(f"patch_size {ph}x{pw}: only square patches are supported")
        shared, per_layer = bool(g("use_shared_relative_position_bias")), bool(g("use_relative_position_bias"))
        bias: PositionBias = (
            "both" if shared and per_layer else "shared" if shared else "per_layer" if per_layer else "none"
        )
        encoder = replace(
            common,
            norm_order="pre",
            qkv_bias="qv",
            layer_scale_init=float(g("layer_scale_init_value")),
            position_bias=bias,
            final_norm=not g("use_mean_pooling"),
            dropout=float(g("hidden_dropout_prob")),
            attn_dropout=float(g("attention_probs_dropout_prob")),
            drop_path=float(g("drop_path_rate")),
        )
        image = ImageConfig(
            image_size=(h, w),
            patch_size=ph,
            channels=int(g("num_channels")),
            positions="learned" if g("use_absolute_position_embeddings") else "none",
            cls_token=True,
            rel_pos_hf_resample=bias != "none" and h // ph != w // ph,
        )
        return ModelConfig(modality="image", version=1, encoder=encoder, image=image)
    if modality == "audio":
        if g("add_adapter"):
            raise InteropError("add_adapter=true: the adapter after the encoder is not supported")
        _activation(g("feat_extract_activation"), "feat_extract_activation")
        if g("feat_extract_activation") != "gelu":
            raise InteropError(f"feat_extract_activation={g('feat_extract_activation')!r}: only 'gelu' is supported")
        depth = int(g("num_conv_pos_embeddings"))
        if depth < 1:
            raise InteropError("num_conv_pos_embeddings=0 (no positional conv layers) is not supported")
        dims, kernels, strides = g("conv_dim"), g("conv_kernel"), g("conv_stride")
        if not len(dims) == len(kernels) == len(strides):
            raise InteropError("conv_dim, conv_kernel and conv_stride differ in length")
        encoder = replace(
            common,
            norm_order="post",
            qkv_bias="all",
            input_norm=True,
            dropout=float(g("hidden_dropout")),
            attn_dropout=float(g("attention_dropout")),
            activation_dropout=float(g("activation_dropout")),
            layerdrop=float(g("layerdrop")),
        )
        audio = AudioConfig(
            conv_layers=tuple((int(c), int(k), int(s)) for c, k, s in zip(dims, kernels, strides, strict=True)),
            conv_bias=bool(g("conv_bias")),
            proj_norm_eps=float(g("layer_norm_eps")),
            pos_conv_depth=depth,
            pos_conv_kernel=int(g("conv_pos_kernel_size")),
            pos_conv_groups=int(g("num_conv_pos_embedding_groups")),
            pos_conv_zero_padding="input",
        )
        return ModelConfig(modality="audio", version=1, encoder=encoder, audio=audio)
    if g("is_decoder") or g("add_cross_attention"):
        raise InteropError("is_decoder / add_cross_attention: only the bidirectional encoder is supported")
    vocab, pad = int(g("vocab_size")), int(g("pad_token_id"))
    max_positions = int(g("max_position_embeddings")) - pad - 1
    if max_positions < 1:
        raise InteropError(f"max_position_embeddings {g('max_position_embeddings')} leaves no positions after pad id")
    mask_id = hf.get("mask_token_id")
    unk_id = hf.get("unk_token_id", 3)
    text = TextConfig(
        vocab_size=vocab,
        max_positions=max_positions,
        pad_id=pad,
        bos_id=int(g("bos_token_id")),
        eos_id=int(g("eos_token_id")),
        mask_id=int(mask_id) if isinstance(mask_id, int) and 0 <= mask_id < vocab else vocab - 1,
        unk_id=int(unk_id) if isinstance(unk_id, int) and 0 <= unk_id < vocab else pad,
        embed_dropout=float(g("hidden_dropout_prob")),
        layer_norm_eps=float(g("layer_norm_eps")),
        type_vocab_size=int(g("type_vocab_size")),
    )
    encoder = replace(
        common,
        norm_order="post",
        qkv_bias="all",
        dropout=float(g("hidden_dropout_prob")),
        attn_dropout=float(g("attention_probs_dropout_prob")),
    )
    return ModelConfig(modality="text", version=1, encoder=encoder, text=text)


def _run_config(model: ModelConfig) -> RunConfig:
    """Our full config: the matching official 1.0 preset's objective and training settings around
    the imported model, adjusted so it validates (top-K <= depth, channels, text block size)."""
    from data2vec.presets import preset

    base = preset(BASE_PRESET[model.modality], 1)
    data = base.data
    if model.modality == "image" and model.image.channels != len(data.mean):
        data = replace(data, mean=(0.5,) * model.image.channels, std=(0.5,) * model.image.channels)
    if model.modality == "text":
        data = replace(data, text=replace(data.text, block_size=min(data.text.block_size, model.text.max_positions)))
    targets = replace(base.targets, top_k=min(base.targets.top_k, model.encoder.depth))
    return replace(base, model=model, data=data, targets=targets, preset=f"{base.preset} (transformers import)")


# ----------------------------------------------------------------------------- weights: names


def _layer_pairs(modality: str, enc: EncoderConfig, i: int) -> Iterator[tuple[str, str]]:
    """(our key, transformers key) for block i, for the weights that map one to one."""
    o = f"encoder.blocks.{i}."
    if modality == "image":
        h = f"encoder.layer.{i}."
        names = [
            ("norm1", "layernorm_before"),
            ("norm2", "layernorm_after"),
            ("attn.proj", "attention.output.dense"),
            ("mlp.fc1", "intermediate.dense"),
            ("mlp.fc2", "output.dense"),
        ]
        yield o + "attn.q_bias", h + "attention.attention.query.bias"
        yield o + "attn.v_bias", h + "attention.attention.value.bias"
        if enc.layer_scale_init > 0:
            yield o + "gamma1", h + "lambda_1"
            yield o + "gamma2", h + "lambda_2"
        if enc.position_bias in ("per_layer", "both"):
            yield (
                o + "position_bias.table",
                h + "attention.attention.relative_position_bias.relative_position_bias_table",
            )
    elif modality == "audio":
        h = f"encoder.layers.{i}."
        names = [
            ("norm1", "layer_norm"),
            ("norm2", "final_layer_norm"),
            ("attn.proj", "attention.out_proj"),
            ("mlp.fc1", "feed_forward.intermediate_dense"),
            ("mlp.fc2", "feed_forward.output_dense"),
        ]
    else:
        h = f"encoder.layer.{i}."
        names = [
            ("norm1", "attention.output.LayerNorm"),
            ("norm2", "output.LayerNorm"),
            ("attn.proj", "attention.output.dense"),
            ("mlp.fc1", "intermediate.dense"),
            ("mlp.fc2", "output.dense"),
        ]
    for ours, theirs in names:
        for p in ("weight", "bias"):
            yield f"{o}{ours}.{p}", f"{h}{theirs}.{p}"


def _qkv_names(modality: str, i: int) -> tuple[list[str], list[str] | None]:
    """transformers' q, k, v weight names (and bias names, None for BEiT's q/v-only bias) of block i."""
    if modality == "image":
        base = f"encoder.layer.{i}.attention.attention."
        return [base + n + ".weight" for n in ("query", "key", "value")], None
    base = f"encoder.layers.{i}.attention." if modality == "audio" else f"encoder.layer.{i}.attention.self."
    names = ("q_proj", "k_proj", "v_proj") if modality == "audio" else ("query", "key", "value")
    return [base + n + ".weight" for n in names], [base + n + ".bias" for n in names]


def _pairs(model: ModelConfig) -> list[tuple[str, str]]:
    """Every one-to-one (our key, transformers key) pair of the backbone."""
    enc = model.encoder
    pairs: list[tuple[str, str]] = []
    if model.modality == "image":
        pairs += [
            ("frontend.local.proj.weight", "embeddings.patch_embeddings.projection.weight"),
            ("frontend.local.proj.bias", "embeddings.patch_embeddings.projection.bias"),
        ]
        if enc.position_bias in ("shared", "both"):
            pairs.append(("encoder.position_bias.table", "encoder.relative_position_bias.relative_position_bias_table"))
        if enc.final_norm:
            pairs += [("encoder.final_norm.weight", "layernorm.weight"), ("encoder.final_norm.bias", "layernorm.bias")]
    elif model.modality == "audio":
        for j in range(len(model.audio.conv_layers)):
            o, h = f"frontend.local.cnn.layers.{j}.", f"feature_extractor.conv_layers.{j}."
            pairs.append((o + "0.weight", h + "conv.weight"))
            if model.audio.conv_bias:
                pairs.append((o + "0.bias", h + "conv.bias"))
            pairs += [(o + "1.norm.weight", h + "layer_norm.weight"), (o + "1.norm.bias", h + "layer_norm.bias")]
        for p in ("weight", "bias"):
            pairs += [
                (f"frontend.local.norm.{p}", f"feature_projection.layer_norm.{p}"),
                (f"frontend.local.proj.{p}", f"feature_projection.projection.{p}"),
                (f"encoder.input_norm.{p}", f"encoder.layer_norm.{p}"),
            ]
            pairs += [
                (f"frontend.context.positional.convs.{j}.{p}", f"encoder.pos_conv_embed.layers.{j}.conv.{p}")
                for j in range(model.audio.pos_conv_depth)
            ]
    else:
        pairs += [
            ("frontend.local.embed_tokens.weight", "embeddings.word_embeddings.weight"),
            ("frontend.local.embed_positions.weight", "embeddings.position_embeddings.weight"),
            ("frontend.local.layer_norm.weight", "embeddings.LayerNorm.weight"),
            ("frontend.local.layer_norm.bias", "embeddings.LayerNorm.bias"),
        ]
        if model.text.type_vocab_size > 0:
            pairs.append(("frontend.local.embed_types.weight", "embeddings.token_type_embeddings.weight"))
    for i in range(enc.depth):
        pairs += list(_layer_pairs(model.modality, enc, i))
    return pairs


def _legacy_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Old BERT-style `LayerNorm.gamma/beta` names (transformers renames them on load too)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("LayerNorm.gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith("LayerNorm.beta"):
            k = k[: -len("beta")] + "bias"
        out[k] = v
    return out


def _split_backbone(sd: dict[str, Tensor], modality: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(backbone weights without the `data2vec_*.` prefix, head weights without it)."""
    prefix = PREFIX[modality]
    backbone, head = {}, {}
    for k, v in _legacy_names(sd).items():
        if any(s in k for s in _IGNORED):
            continue
        name = k[len(prefix) :] if k.startswith(prefix) else k
        if name.startswith(_BACKBONE[modality]):
            if name.startswith("adapter."):
                raise InteropError("the checkpoint has adapter weights: the adapter is not supported")
            backbone[name] = v
        else:
            head[name] = v
    return backbone, head


def _to_ours(theirs: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    src = dict(theirs)

    def take(key: str) -> Tensor:
        if key not in src:
            raise InteropError(f"the checkpoint lacks {key}, which its config implies")
        return src.pop(key)

    out = {ours: take(h) for ours, h in _pairs(model)}
    mod = model.modality
    for i in range(model.encoder.depth):
        w_names, b_names = _qkv_names(mod, i)
        out[f"encoder.blocks.{i}.attn.qkv.weight"] = torch.cat([take(n) for n in w_names])
        if b_names is not None:
            out[f"encoder.blocks.{i}.attn.qkv.bias"] = torch.cat([take(n) for n in b_names])
    if mod == "image":
        cls = take("embeddings.cls_token")
        if model.image.positions == "learned":
            pos = take("embeddings.position_embeddings")
            n = model.image.grid[0] * model.image.grid[1]
            if pos.shape[1] != n + 1:
                raise InteropError(f"position_embeddings has {pos.shape[1]} rows, expected {n + 1}")
            cls = cls + pos[:, :1]  # transformers adds position 0 to the CLS token: fold it in
            out["frontend.context.positional.table"] = pos[:, 1:]
        out["frontend.context.prefix"] = cls
        if "embeddings.mask_token" in src:
            out["frontend.context.mask_emb"] = take("embeddings.mask_token").reshape(-1)
    elif mod == "audio" and "masked_spec_embed" in src:
        out["frontend.context.mask_emb"] = take("masked_spec_embed")
    if src:
        extra = sorted(src)
        raise InteropError(f"backbone weights this config does not explain: {', '.join(extra[:8])}")
    return out


# ----------------------------------------------------------------------------- load


def load_hf(path: str | Path) -> HFImport:
    """Read a transformers data2vec checkpoint: a local folder or a hub id (downloaded when the
    string is not an existing path)."""
    folder = Path(path)
    if not folder.exists():
        folder = _download(str(path))
    if not (folder / "config.json").is_file():
        raise InteropError(f"{folder}: no config.json")
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InteropError(f"{folder / 'config.json'}: unreadable ({e})") from None
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPE:
        raise InteropError(
            f"{folder}: model_type {model_type!r} is not a data2vec model ({', '.join(sorted(MODEL_TYPE))})"
        )
    modality = MODEL_TYPE[model_type]
    try:
        model = _model_config(hf, modality)
        cfg = _run_config(model)
    except ConfigError as e:
        raise InteropError(f"{folder}: the config maps to an invalid model: {e}") from None
    backbone, head_weights = _split_backbone(_load_weights(folder), modality)
    state = _to_ours(backbone, model)
    archs = hf.get("architectures") or []
    architecture = str(archs[0]) if archs else BARE[modality]
    head = _head(architecture, head_weights, hf, modality)
    return HFImport(cfg, state, head, hf, str(path))


def _head(architecture: str, weights: dict[str, Tensor], hf: dict[str, Any], modality: str) -> HFHead:
    kind = HEAD_KINDS.get(architecture)
    if kind is None:
        if not weights:
            kind = "none"
        elif all(k.startswith("pooler.") for k in weights):
            kind = "pooler"
        else:
            kind = "other"
    out_weight = {
        "image_classification": "classifier.weight",
        "ctc": "lm_head.weight",
        "sequence_classification": "classifier.out_proj.weight",
    }.get(kind)
    if out_weight is not None and out_weight not in weights:
        raise InteropError(f"{architecture}: the checkpoint lacks {out_weight}")
    id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
    num_labels = int(weights[out_weight].shape[0]) if out_weight else (len(id2label) or None)
    config = {
        k: v for k, v in hf.items() if k not in _DERIVED[modality] and k not in _NOT_CARRIED and not k.startswith("_")
    }
    return HFHead(architecture, kind, num_labels, id2label, dict(weights), config)


# ----------------------------------------------------------------------------- export


def exportable(model: Data2Vec) -> list[str]:
    """Why transformers cannot hold this model exactly (empty list = it can)."""
    m = model.cfg
    enc = m.encoder
    if m.version != 1:
        return [
            "it is a data2vec 2.0 model: transformers has no data2vec 2.0 classes (only 1.0 vision/audio/text). "
            "Keep it in this library's format (save_pretrained / `data2vec convert SRC DST`): config.json holds "
            "the full RunConfig and model.safetensors the weights, so it is self-describing"
        ]
    why = []
    if enc.prenet_depth:
        why.append("encoder.prenet_depth > 0")
    if m.modality == "image":
        icfg = m.image
        h, w = icfg.grid
        want = dict(norm_order="pre", qkv_bias="qv", input_norm=False)
        why += [f"encoder.{k} must be {v!r}" for k, v in want.items() if getattr(enc, k) != v]
        if not icfg.cls_token:
            why.append("image.cls_token must be true")
        if icfg.positions != "none" and h != w:
            why.append("absolute positions on a non-square grid (transformers resizes them on every forward)")
        if enc.position_bias != "none" and h != w and not icfg.rel_pos_hf_resample:
            why.append(
                "relative position bias on a non-square grid: transformers resamples the table (reading it "
                "transposed) on every forward, so only models imported from transformers "
                "(image.rel_pos_hf_resample) can go back"
            )
    elif m.modality == "audio":
        want = dict(norm_order="post", qkv_bias="all", input_norm=True, final_norm=False, position_bias="none")
        why += [f"encoder.{k} must be {v!r}" for k, v in want.items() if getattr(enc, k) != v]
        if m.audio.alibi:
            why.append("audio.alibi (transformers has no ALiBi for data2vec audio)")
        if m.audio.pos_conv_depth < 1:
            why.append("audio.pos_conv_depth must be >= 1")
        if m.audio.proj_norm_eps != enc.norm_eps:
            why.append("audio.proj_norm_eps must equal encoder.norm_eps (transformers uses one layer_norm_eps)")
    else:
        want = dict(norm_order="post", qkv_bias="all", input_norm=False, final_norm=False, position_bias="none")
        why += [f"encoder.{k} must be {v!r}" for k, v in want.items() if getattr(enc, k) != v]
        if m.text.layer_norm_eps != enc.norm_eps:
            why.append("text.layer_norm_eps must equal encoder.norm_eps (transformers uses one layer_norm_eps)")
    return why


def hf_config(model: ModelConfig, head: HFHead | None = None) -> dict[str, Any]:
    """The config.json transformers needs for `model` (+ the head's architecture and carried keys)."""
    mod = model.modality
    enc = model.encoder
    derived: dict[str, Any] = {
        "hidden_size": enc.dim,
        "num_hidden_layers": enc.depth,
        "num_attention_heads": enc.num_heads,
        "intermediate_size": int(enc.dim * enc.mlp_ratio),
        "hidden_act": _ACT_OUT[enc.activation],
        "layer_norm_eps": enc.norm_eps,
    }
    if mod == "image":
        icfg = model.image
        h, w = icfg.image_size
        derived |= {
            "hidden_dropout_prob": enc.dropout,
            "attention_probs_dropout_prob": enc.attn_dropout,
            "image_size": h if h == w else [h, w],
            "patch_size": icfg.patch_size,
            "num_channels": icfg.channels,
            "use_absolute_position_embeddings": icfg.positions != "none",
            "use_relative_position_bias": enc.position_bias in ("per_layer", "both"),
            "use_shared_relative_position_bias": enc.position_bias in ("shared", "both"),
            "layer_scale_init_value": enc.layer_scale_init,
            "drop_path_rate": enc.drop_path,
            "use_mean_pooling": not enc.final_norm,
        }
        defaults = dict(_DEFAULTS["image"], use_mask_token=True)
    elif mod == "audio":
        a = model.audio
        derived |= {
            "hidden_dropout": enc.dropout,
            "activation_dropout": enc.activation_dropout,
            "attention_dropout": enc.attn_dropout,
            "layerdrop": enc.layerdrop,
            "feat_extract_activation": "gelu",
            "conv_dim": [c for c, _, _ in a.conv_layers],
            "conv_kernel": [k for _, k, _ in a.conv_layers],
            "conv_stride": [s for _, _, s in a.conv_layers],
            "conv_bias": a.conv_bias,
            "num_feat_extract_layers": len(a.conv_layers),
            "num_conv_pos_embedding_groups": a.pos_conv_groups,
            "conv_pos_kernel_size": a.pos_conv_kernel,
            "num_conv_pos_embeddings": a.pos_conv_depth,
            "add_adapter": False,
            "output_hidden_size": enc.dim,
        }
        defaults = dict(_DEFAULTS["audio"])
    else:
        t = model.text
        derived |= {
            "vocab_size": t.vocab_size,
            "hidden_dropout_prob": enc.dropout,
            "attention_probs_dropout_prob": enc.attn_dropout,
            "max_position_embeddings": t.max_positions + t.pad_id + 1,
            "type_vocab_size": max(t.type_vocab_size, 1),
            "pad_token_id": t.pad_id,
            "bos_token_id": t.bos_id,
            "eos_token_id": t.eos_id,
            "mask_token_id": t.mask_id,
            "is_decoder": False,
            "add_cross_attention": False,
        }
        defaults = dict(_DEFAULTS["text"])
    carried = {} if head is None else {k: v for k, v in head.config.items() if k not in _DERIVED[mod]}
    arch = head.architecture if head is not None else BARE[mod]
    return {"architectures": [arch], "model_type": TYPE_OF[mod], **defaults, **carried, **derived, "dtype": "float32"}


def _to_theirs(model: Data2Vec, config: dict[str, Any]) -> dict[str, Tensor]:
    m = model.cfg
    sd = {k: v.detach() for k, v in model.student_state_dict().items() if not k.startswith("head.")}
    out = {h: sd[ours] for ours, h in _pairs(m)}
    dim = m.encoder.dim
    for i in range(m.encoder.depth):
        w_names, b_names = _qkv_names(m.modality, i)
        for n, part in zip(w_names, torch.split(sd[f"encoder.blocks.{i}.attn.qkv.weight"], dim), strict=True):
            out[n] = part
        if b_names is not None:
            for n, part in zip(b_names, torch.split(sd[f"encoder.blocks.{i}.attn.qkv.bias"], dim), strict=True):
                out[n] = part
    if m.modality == "image":
        out["embeddings.cls_token"] = sd["frontend.context.prefix"]
        if m.image.positions != "none":
            # learned table or fixed sin-cos: either way a (1, N, D) table added to the patches
            if m.image.positions == "learned":
                table = sd["frontend.context.positional.table"]
            else:  # the fixed sin-cos table, written as a learned one
                table = sincos_2d(dim, m.image.grid).unsqueeze(0)
            out["embeddings.position_embeddings"] = torch.cat([table.new_zeros(1, 1, dim), table], dim=1)
        if config["use_mask_token"]:
            out["embeddings.mask_token"] = sd["frontend.context.mask_emb"].reshape(1, 1, dim)
    elif m.modality == "audio":
        if config["mask_time_prob"] > 0 or config["mask_feature_prob"] > 0:
            out["masked_spec_embed"] = sd["frontend.context.mask_emb"]
    elif m.text.type_vocab_size == 0:
        out["embeddings.token_type_embeddings.weight"] = sd["frontend.local.embed_tokens.weight"].new_zeros(1, dim)
    return out


def save_hf(model: Data2Vec, out_dir: str | Path, head: HFHead | None = None) -> Path:
    """Write a data2vec 1.0 model as a transformers folder (config.json + model.safetensors).

    Without `head`: a bare `Data2Vec{Vision,Audio,Text}Model`. With one (from `load_hf`): its
    architecture, weights and carried config keys, the backbone under `data2vec_*.` as transformers
    expects for task models. Our pretraining regression head is not written (transformers has none).
    """
    problems = exportable(model)
    if problems:
        raise InteropError("cannot write this model for transformers: " + "; ".join(problems))
    m = model.cfg
    if m.modality == "audio" and m.audio.pos_conv_zero_padding == "each_layer" and m.audio.pos_conv_depth > 1:
        import warnings

        warnings.warn(
            "audio.pos_conv_zero_padding='each_layer': transformers zeroes padded frames only before the first "
            "positional conv layer, so padded batches give slightly different outputs there (unpadded inputs "
            "are identical)",
            stacklevel=2,
        )
    config = hf_config(m, head)
    weights = _to_theirs(model, config)
    bare = head is None or head.architecture == BARE[m.modality]
    if not bare:
        weights = {PREFIX[m.modality] + k: v for k, v in weights.items()}
    if head is not None:
        for k, v in head.weights.items():
            under_backbone = k.startswith("pooler.") and not bare
            weights[(PREFIX[m.modality] + k) if under_backbone else k] = v
    tensors = tensors_for_saving(weights)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_folder(out_dir, write)


# ----------------------------------------------------------------------------- running like transformers


class HFOutput(NamedTuple):
    last_hidden_state: Tensor
    """(B, T, D): after the final LayerNorm for vision without mean pooling; else the last block's output."""
    hidden_states: tuple[Tensor, ...]
    """L + 1 tensors: the embedding output (the first block's input), then every block's output."""
    pooler_output: Tensor | None
    logits: Tensor | None
    padding_mask: Tensor | None
    """(B, T) True = padded token/frame, or None."""


@torch.no_grad()
def forward_like_hf(
    model: Data2Vec, inputs: Tensor, attention_mask: Tensor | None = None, head: HFHead | None = None
) -> HFOutput:
    """Run our model the way transformers runs its Data2Vec*Model (eval mode, no masking).

    `attention_mask` uses transformers' convention (1 = real sample/token, 0 = padding): sample-level
    for audio, token-level for text (where padding is also read from the pad id)."""
    if model.cfg.encoder.prenet_depth:
        raise InteropError("prenet blocks have no transformers counterpart")
    padding = None if attention_mask is None else attention_mask == 0
    tokens = model.frontend.local(inputs, padding)
    enc_in = model.frontend.context(tokens, clean=True)
    first = enc_in.x
    if model.encoder.input_norm is not None:
        first = model.encoder.input_norm(first)
    out = model.encoder(enc_in.x, enc_in.padding_mask, enc_in.positions, keep_layers=len(model.encoder.blocks))
    hidden = (first, *(layer.x for layer in out.layers))
    pad = enc_in.padding_mask
    if model.cfg.modality == "audio" and attention_mask is not None and pad is None:
        lengths = conv_output_lengths(attention_mask.sum(1), model.cfg.audio.conv_layers)
        pad = lengths_to_padding_mask(lengths, out.x.shape[1])
    pooled = pooled_output(model, out.x, head)
    logits = head_logits(model, out.x, head) if head is not None and head.kind in HEAD_KINDS.values() else None
    return HFOutput(out.x, hidden, pooled, logits, pad)


def pooled_output(model: Data2Vec, last_hidden_state: Tensor, head: HFHead | None = None) -> Tensor | None:
    """transformers' pooler: vision = CLS after the final norm, or LayerNorm(mean of patch tokens) with
    mean pooling (needs the head's `pooler.layernorm`); text = tanh(dense(first token)) when the
    head has `pooler.dense`; None otherwise."""
    w = {} if head is None else head.weights
    x = last_hidden_state
    if model.cfg.modality == "image":
        if model.cfg.encoder.final_norm:
            return x[:, 0]
        if "pooler.layernorm.weight" not in w:
            return None
        mean = x[:, 1:].mean(1)
        return F.layer_norm(
            mean, mean.shape[-1:], w["pooler.layernorm.weight"], w["pooler.layernorm.bias"], model.cfg.encoder.norm_eps
        )
    if model.cfg.modality == "text" and "pooler.dense.weight" in w:
        return torch.tanh(F.linear(x[:, 0], w["pooler.dense.weight"], w["pooler.dense.bias"]))
    return None


def head_logits(model: Data2Vec, last_hidden_state: Tensor, head: HFHead) -> Tensor:
    """Logits of a transformers task head run on our features (eval mode: no dropout)."""
    w, x = head.weights, last_hidden_state
    if head.kind == "image_classification":
        pooled = pooled_output(model, x, head)
        if pooled is None:
            raise InteropError("image classification with mean pooling needs pooler.layernorm weights")
        return F.linear(pooled, w["classifier.weight"], w.get("classifier.bias"))
    if head.kind == "ctc":
        return F.linear(x, w["lm_head.weight"], w.get("lm_head.bias"))
    if head.kind == "sequence_classification":
        h = torch.tanh(F.linear(x[:, 0], w["classifier.dense.weight"], w["classifier.dense.bias"]))
        return F.linear(h, w["classifier.out_proj.weight"], w["classifier.out_proj.bias"])
    raise InteropError(f"no forward for head kind {head.kind!r} ({head.architecture})")
