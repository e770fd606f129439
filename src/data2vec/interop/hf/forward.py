"""Running our model the way transformers runs its Data2Vec*Model: `forward_like_hf` returns what
transformers returns (every hidden state with the embedding output first, the last hidden state,
the pooler output and, with a runnable head, its logits); `pooled_output` and `head_logits` are
transformers' pooler and task heads on our features.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from data2vec.interop.common import InteropError
from data2vec.interop.hf.head import HFHead
from data2vec.interop.hf.tables import HEAD_KINDS
from data2vec.modalities.audio import conv_output_lengths, lengths_to_padding_mask
from data2vec.model import Data2Vec


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
