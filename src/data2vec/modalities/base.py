"""The contract every modality front-end follows.

A front-end has two stages, so that the teacher can share or copy each one:

1. `local` (`LocalEncoder`): raw input -> tokens (B, T, D). The expensive per-sample
   feature extractor (patch embedding, speech CNN, token embedding). It runs once per
   sample even with M masks, and must be deterministic (no dropout), because a teacher
   that shares it reads the student's output directly.
2. `context` (`ContextEncoder`, the same class for every modality): adds positions,
   applies the mask (replace with a learned vector in 1.0, drop in 2.0), prepends prefix
   tokens (CLS) and applies input dropout. `clean=True` turns dropout off, for the
   teacher pass through shared modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.config import MaskingConfig
from data2vec.masking import gather_tokens, replace_masked


class Tokens(NamedTuple):
    x: Tensor
    """(B, T, D) token features."""
    padding_mask: Tensor | None
    """(B, T) bool, True = padding; None when nothing is padded."""


class EncoderInput(NamedTuple):
    x: Tensor
    """(B, P + T', D) with P prefix tokens first."""
    padding_mask: Tensor | None
    """(B, P + T') bool or None."""
    positions: Tensor | None
    """(B, P + T') index of each token in the full sequence (prefix first), or None = in order."""


class LocalEncoder(nn.Module, ABC):
    @abstractmethod
    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> Tokens: ...


class ContextEncoder(nn.Module):
    """Positions -> masking -> prefix tokens -> dropout, for any modality.

    Args:
        dim: D.
        num_prefix: P extra tokens (CLS) prepended after masking; never masked.
        positional: module mapping (x (B, T, D), padding_mask) to an additive (B|1, T, D)
            position term, or None.
        mask_token: learn a vector that replaces masked tokens (data2vec 1.0). Without it,
            masked tokens can only be dropped (2.0).
        dropout: input dropout, off in the teacher pass.
    """

    def __init__(
        self, dim: int, num_prefix: int, positional: nn.Module | None, mask_token: bool, dropout: float
    ) -> None:
        super().__init__()
        self.num_prefix = num_prefix
        self.prefix = nn.Parameter(torch.zeros(1, num_prefix, dim)) if num_prefix else None
        self.mask_emb = nn.Parameter(torch.zeros(dim)) if mask_token else None
        self.positional = positional
        self.dropout = dropout

    def forward(
        self,
        tokens: Tokens,
        mask: Tensor | None = None,
        ids_keep: Tensor | None = None,
        clean: bool = False,
    ) -> EncoderInput:
        """mask: (B, T) True = masked. Without `ids_keep`, masked tokens are replaced by the
        mask vector; with `ids_keep` (B, T_keep) only those tokens are kept (positions are
        added first, so the encoder never needs to know where they came from)."""
        x, pad = tokens
        B = x.shape[0]
        if mask is not None and ids_keep is None:
            if self.mask_emb is None:
                raise ValueError("this front-end has no mask token; pass ids_keep to drop masked tokens")
            x = replace_masked(x, mask, self.mask_emb)
        if self.positional is not None:
            # Content-dependent positions (speech conv) see masked tokens as zeros in 2.0.
            pos_in = x if mask is None or ids_keep is None else replace_masked(x, mask, x.new_zeros(()))
            x = x + self.positional(pos_in, pad)
        positions = None
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)
            pad = pad.gather(1, ids_keep) if pad is not None else None
            positions = ids_keep + self.num_prefix
        if self.prefix is not None:
            P = self.num_prefix
            x = torch.cat([self.prefix.expand(B, -1, -1).to(x.dtype), x], dim=1)
            if pad is not None:
                pad = torch.cat([pad.new_zeros(B, P), pad], dim=1)
            if positions is not None:
                prefix_pos = torch.arange(P, device=x.device).expand(B, P)
                positions = torch.cat([prefix_pos, positions], dim=1)
        x = F.dropout(x, self.dropout, training=self.training and not clean)
        return EncoderInput(x, pad, positions)


class Frontend(nn.Module):
    """A modality: its `local` and `context` stages plus facts the model needs."""

    local: LocalEncoder
    context: ContextEncoder
    grid: tuple[int, int]
    """Token layout used by maskers and the decoder: (H, W) for images, (1, T) for sequences."""
    decoder_2d: bool

    @property
    def num_prefix(self) -> int:
        return self.context.num_prefix

    def make_position_bias(self) -> nn.Module | None:
        """A fresh attention-bias module for the encoder, or None."""
        return None

    def reset_parameters(self) -> None:
        """Modality-specific initialisation, run after the model's generic init (BERT-style
        N(0, 0.02) Linear layers, truncated-normal prefix and mask tokens)."""

    def corrupt(self, inputs: Tensor, mask: Tensor, generator: torch.Generator | None) -> Tensor | None:
        """data2vec 1.0 input-level masking: the student's corrupted copy of `inputs`, or None
        when this modality masks at the token level (a learned mask vector in `context`)."""
        return None

    def input_masks(
        self, inputs: Tensor, masking: MaskingConfig, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None] | None:
        """Masks that depend on the input itself (text: special tokens are never masked), as
        ((B*M, T) loss positions, the student's corrupted input or None); None = draw masks
        over the token grid from the masking config alone (every other modality)."""
        return None
