"""The fixed facts of transformers' data2vec 1.0 classes, as tables the mapping code reads: model
types and class names per modality, which weights are backbone, activation names, the defaults
of each config class, which config.json keys our RunConfig determines, the encoder fields that
map one to one onto config.json keys, and the encoder settings each transformers class fixes.
"""

from __future__ import annotations

from typing import Any, Literal

from data2vec.config import Modality

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
HEAD_OUTPUT = {
    "image_classification": "classifier.weight",
    "ctc": "lm_head.weight",
    "sequence_classification": "classifier.out_proj.weight",
}
"""The output layer of each runnable head kind (its rows are the labels)."""
BASE_PRESET = {"image": "image-base", "audio": "audio-base", "text": "text-base"}

BACKBONE = {
    "image": ("embeddings.", "encoder.", "layernorm."),
    "audio": ("feature_extractor.", "feature_projection.", "encoder.", "masked_spec_embed", "adapter."),
    "text": ("embeddings.", "encoder."),
}
"""Backbone weights by their (prefix-free) first name component; everything else is head."""
IGNORED = ("relative_position_index", "embeddings.position_ids", "embeddings.token_type_ids")
"""Buffers some checkpoints hold that are not weights."""

Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]
PositionBias = Literal["none", "shared", "per_layer", "both"]
ACT_IN: dict[str, Activation] = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
ACT_IN |= {"relu": "relu", "silu": "silu", "swish": "silu"}
ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}

_SHAPE_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu"
)
DEFAULTS: dict[str, dict[str, Any]] = {
    "image": dict(
        _SHAPE_DEFAULTS,
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
    ),
    "audio": dict(
        vocab_size=32,
        **_SHAPE_DEFAULTS,
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
    ),
    "text": dict(
        vocab_size=30522,
        **_SHAPE_DEFAULTS,
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
    ),
}
"""transformers class defaults for the keys a config.json may leave out."""

ENCODER_FLOATS: dict[str, dict[str, str]] = {
    "image": {
        "hidden_dropout_prob": "dropout",
        "attention_probs_dropout_prob": "attn_dropout",
        "layer_scale_init_value": "layer_scale_init",
        "drop_path_rate": "drop_path",
    },
    "audio": {
        "hidden_dropout": "dropout",
        "activation_dropout": "activation_dropout",
        "attention_dropout": "attn_dropout",
        "layerdrop": "layerdrop",
    },
    "text": {"hidden_dropout_prob": "dropout", "attention_probs_dropout_prob": "attn_dropout"},
}
"""config.json key -> EncoderConfig field, for the float settings that map one to one (besides
`layer_norm_eps` -> `norm_eps`, common to all three)."""

FIXED_ENCODER: dict[str, dict[str, Any]] = {
    "image": dict(norm_order="pre", qkv_bias="qv", input_norm=False),
    "audio": dict(norm_order="post", qkv_bias="all", input_norm=True, final_norm=False, position_bias="none"),
    "text": dict(norm_order="post", qkv_bias="all", input_norm=False, final_norm=False, position_bias="none"),
}
"""The encoder settings each transformers class has no config key for (what it always does)."""

_SHAPE_KEYS = {*_SHAPE_DEFAULTS, "layer_norm_eps"}
DERIVED: dict[str, set[str]] = {
    "image": _SHAPE_KEYS
    | set(ENCODER_FLOATS["image"])
    | {
        "image_size",
        "patch_size",
        "num_channels",
        "use_absolute_position_embeddings",
        "use_relative_position_bias",
        "use_shared_relative_position_bias",
        "use_mean_pooling",
    },
    "audio": _SHAPE_KEYS
    | set(ENCODER_FLOATS["audio"])
    | {
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
    },
    "text": _SHAPE_KEYS
    | set(ENCODER_FLOATS["text"])
    | {
        "vocab_size",
        "max_position_embeddings",
        "type_vocab_size",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "mask_token_id",
        "is_decoder",
        "add_cross_attention",
    },
}
"""Keys the RunConfig determines (written from it on export); the rest of a source config travels
with the head description, so an import -> export round trip keeps labels, token ids, etc."""
NOT_CARRIED = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype"}
"""config.json keys neither derived nor carried with the head."""
