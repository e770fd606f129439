"""Text: RoBERTa-style token embeddings and data2vec's text masking (docs/design.md, 'Front-ends'
and 'Masking').

`local` (shared with the teacher in both versions, `teacher.ema_scope="encoder"`):
token ids (B, T) -> token embedding (padding_idx = <pad>, no scaling) + learned position
embedding with RoBERTa's offset -> LayerNorm (eps 1e-5). Position ids count the non-pad
tokens and start after the padding index (pad + 1, pad + 2, ...); pads get the pad index,
whose row is zero. So a sequence gets the same embeddings whatever padding surrounds it.

`context`: only the embedding dropout (0.1 in the official configs). The teacher pass
runs it with `clean=True`, so the teacher's input has no dropout noise: the official 2.0
code feeds the teacher the student's dropped-out embeddings; this does not (docs/design.md,
'Departures from the official code').

Masking is drawn from the token ids, because special tokens (<s>, </s>, <pad>, <unk>,
<mask>) are never masked and never in the loss (the official `random_masking` can mask
them; docs/design.md, 'Departures from the official code'):

- 1.0 `bert`: select `int(p * n + U[0,1))` of the n maskable tokens of a row; of those,
  `1 - random_token_prob - leave_unmasked_prob` (80%) become <mask>, `random_token_prob`
  (10%) a random non-special token and the rest (10%) stay unchanged. Only the <mask>
  positions are loss positions (fairseq: `src_tokens == <mask>`).
- 1.0 `span`: `int(p * n / L + U[0,1))` span starts among the maskable tokens, each span
  covering L tokens (special tokens inside a span stay visible); then the same split (the
  official config uses p 0.35, L 4 and no random/unchanged tokens: all <mask>).
- 2.0 `random`: every row (all B*M of them) masks exactly `n - int(n * (1 - p))` tokens,
  n = the smallest maskable count in the batch, drawn uniformly among its maskable tokens.

<unk> is treated as special: it carries no content to predict (and a byte-level BPE never
produces it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from data2vec.config import MaskingConfig, ModelConfig, TextConfig
from data2vec.modalities.base import ContextEncoder, Frontend, LocalEncoder, Tokens

LAYER_NORM_EPS = 1e-5


def special_ids(cfg: TextConfig) -> tuple[int, ...]:
    """The token ids that are never masked: <s>, <pad>, </s>, <unk>, <mask>."""
    return tuple(sorted({cfg.bos_id, cfg.pad_id, cfg.eos_id, cfg.unk_id, cfg.mask_id}))


def maskable_tokens(ids: Tensor, specials: tuple[int, ...]) -> Tensor:
    """(B, T) bool: True where the token may be masked (not special, not padding)."""
    return ~torch.isin(ids, torch.tensor(specials, dtype=ids.dtype, device=ids.device))


def position_ids(ids: Tensor, pad_id: int) -> Tensor:
    """RoBERTa/fairseq `make_positions`: real tokens get pad+1, pad+2, ...; pads get pad."""
    real = ids.ne(pad_id).long()
    return torch.cumsum(real, dim=1) * real + pad_id


class TokenEmbedding(LocalEncoder):
    """(B, T) token ids -> Tokens((B, T, D), (B, T) padding = ids == <pad>, or None)."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        max_positions: int,
        pad_id: int,
        norm_eps: float = LAYER_NORM_EPS,
        type_vocab_size: int = 0,
    ) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.max_positions = max_positions
        self.embed_tokens = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        # Position ids run up to max_positions + pad_id: RoBERTa's 514 rows for 512 tokens.
        self.embed_positions = nn.Embedding(max_positions + pad_id + 1, dim, padding_idx=pad_id)
        # Token types (imported RoBERTa/BERT-style checkpoints): every token is type 0.
        self.embed_types = nn.Embedding(type_vocab_size, dim) if type_vocab_size > 0 else None
        self.layer_norm = nn.LayerNorm(dim, eps=norm_eps)

    def reset_parameters(self) -> None:
        """BERT init: N(0, 0.02) embeddings with zero padding rows."""
        for emb in (self.embed_tokens, self.embed_positions):
            nn.init.normal_(emb.weight, std=0.02)
            with torch.no_grad():
                emb.weight[self.pad_id].zero_()
        if self.embed_types is not None:
            nn.init.normal_(self.embed_types.weight, std=0.02)

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> Tokens:
        if inputs.ndim != 2 or inputs.is_floating_point():
            raise ValueError(f"expected token ids of shape (B, T), got {tuple(inputs.shape)} {inputs.dtype}")
        if inputs.shape[1] > self.max_positions:
            raise ValueError(
                f"sequences of {inputs.shape[1]} tokens are longer than model.text.max_positions {self.max_positions}"
            )
        pad = inputs.eq(self.pad_id)
        if padding_mask is not None:
            pad = pad | padding_mask
        x = self.embed_tokens(inputs)
        if self.embed_types is not None:
            x = x + self.embed_types.weight[0]
        x = x + self.embed_positions(position_ids(inputs, self.pad_id))
        x = self.layer_norm(x)
        return Tokens(x, pad if bool(pad.any()) else None)


class TextFrontend(Frontend):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        tcfg = cfg.text
        self.cfg = tcfg
        self.version = cfg.version
        self.grid = (1, tcfg.max_positions)
        self.decoder_2d = False
        self.local = TokenEmbedding(
            tcfg.vocab_size, cfg.encoder.dim, tcfg.max_positions, tcfg.pad_id, tcfg.layer_norm_eps, tcfg.type_vocab_size
        )
        # Input-level masking (<mask> ids) in 1.0, dropped tokens in 2.0: no mask vector.
        self.context = ContextEncoder(
            cfg.encoder.dim, num_prefix=0, positional=None, mask_token=False, dropout=tcfg.embed_dropout
        )

    def reset_parameters(self) -> None:
        assert isinstance(self.local, TokenEmbedding)
        self.local.reset_parameters()

    def corrupt(self, inputs: Tensor, mask: Tensor, generator: torch.Generator | None) -> Tensor:
        """Masked positions become <mask>. (Random replacements are drawn together with the
        mask, by `draw_text_masks`, since they sit outside the loss positions.)"""
        return inputs.masked_fill(mask, self.cfg.mask_id)

    def input_masks(
        self, inputs: Tensor, masking: MaskingConfig, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        m = draw_text_masks(inputs.cpu(), masking, self.cfg, self.version, generator)
        student = None if m.student_inputs is None else m.student_inputs.to(inputs.device)
        return m.mask.to(inputs.device), student


# ------------------------------------------------------------------------ masking


class TextMasks(NamedTuple):
    mask: Tensor
    """(B*M, T) bool loss positions (True = masked and predicted)."""
    student_inputs: Tensor | None
    """(B, T) the student's corrupted ids (1.0); None in 2.0 (masked tokens are dropped)."""


def _rank_pick(candidates: Tensor, counts: Tensor, generator: torch.Generator) -> Tensor:
    """Per row, `counts[b]` positions drawn uniformly without replacement among `candidates[b]`."""
    scores = torch.rand(candidates.shape, generator=generator).masked_fill(~candidates, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < counts[:, None]) & candidates


def bert_selection(maskable: Tensor, mask_prob: float, generator: torch.Generator) -> Tensor:
    """`int(p * n + U[0,1))` of each row's n maskable tokens (fairseq MaskTokensDataset)."""
    n = maskable.sum(dim=1)
    counts = (mask_prob * n.double() + torch.rand(n.shape, generator=generator, dtype=torch.float64)).long()
    return _rank_pick(maskable, counts.clamp(max=n), generator)


def span_selection(maskable: Tensor, mask_prob: float, span: int, generator: torch.Generator) -> Tensor:
    """Spans of `span` tokens from `int(p * n / span + U[0,1))` starts among the maskable tokens
    (overlaps allowed, cut at the row end); special tokens inside a span are left out."""
    n = maskable.sum(dim=1)
    starts_n = (mask_prob * n.double() / span + torch.rand(n.shape, generator=generator, dtype=torch.float64)).long()
    starts = _rank_pick(maskable, starts_n.clamp(max=n), generator)
    out = starts.clone()
    for k in range(1, min(span, maskable.shape[1])):
        out[:, k:] |= starts[:, :-k]
    return out & maskable


def random_text_mask(maskable: Tensor, mask_prob: float, num_masks: int, generator: torch.Generator) -> Tensor:
    """data2vec 2.0 text: (B*M, T) masks with the same count in every row, maskable tokens only."""
    rows = maskable.repeat_interleave(num_masks, dim=0) if num_masks > 1 else maskable
    n_min = int(rows.sum(dim=1).min()) if rows.numel() else 0
    if n_min == 0:
        raise ValueError("a sequence in the batch has no maskable tokens (only special tokens or padding)")
    count = n_min - int(n_min * (1.0 - mask_prob))
    scores = torch.rand(rows.shape, generator=generator).masked_fill(~rows, 2.0)
    out = torch.zeros_like(rows)
    out.scatter_(1, scores.topk(count, dim=1, largest=False).indices, True)
    return out


def random_tokens(shape: torch.Size, vocab_size: int, specials: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Token ids drawn uniformly from the vocabulary minus the special tokens."""
    r = torch.randint(0, vocab_size - len(specials), shape, generator=generator)
    for s in sorted(specials):  # shift past each special id, in increasing order
        r += (r >= s).long()
    return r


def draw_text_masks(
    ids: Tensor, masking: MaskingConfig, cfg: TextConfig, version: int, generator: torch.Generator
) -> TextMasks:
    """The loss positions and (1.0) the student's corrupted ids for a batch of token ids (B, T)."""
    specials = special_ids(cfg)
    maskable = maskable_tokens(ids, specials)
    if version == 2:
        if masking.kind != "random":
            raise ValueError(f"masking.kind {masking.kind!r}: data2vec 2.0 text uses 'random'")
        return TextMasks(random_text_mask(maskable, masking.mask_prob, masking.num_masks, generator), None)
    if masking.kind == "bert":
        selected = bert_selection(maskable, masking.mask_prob, generator)
    elif masking.kind == "span":
        selected = span_selection(maskable, masking.mask_prob, masking.mask_length, generator)
    else:
        raise ValueError(f"masking.kind {masking.kind!r}: data2vec 1.0 text uses 'bert' or 'span'")
    u = torch.rand(ids.shape, generator=generator)
    rt, lu = masking.random_token_prob, masking.leave_unmasked_prob
    to_random = selected & (u < rt)
    to_mask = selected & (u >= rt + lu)
    student = ids.masked_fill(to_mask, cfg.mask_id)
    if bool(to_random.any()):
        student = torch.where(to_random, random_tokens(ids.shape, cfg.vocab_size, specials, generator), student)
    return TextMasks(to_mask, student)
