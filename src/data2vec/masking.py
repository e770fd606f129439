"""Mask generators and the helpers that apply masks.

Every generator is a pure function of its arguments and an explicit `torch.Generator`:
the same generator state gives the same mask. A mask is a bool tensor (B, T) where
True means *masked* (hidden from the student, predicted by it); T = H*W patches in
row-major order for images.

Data2vec 2.0 drops masked tokens before the encoder and packs the rest densely, which
needs the same number of masked tokens in every row. `block_mask_2d`, `block_mask_1d`,
`span_mask` and `random_mask` guarantee that; `mask_to_indices` checks it. Masks are drawn
after any cropping, for the final token count (docs/design.md, 'Departures from the official
code').
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from data2vec.config import MaskingConfig


def _uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(lo: int, hi: int, generator: torch.Generator) -> int:
    """Integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def beit_block_mask(
    batch: int,
    grid: tuple[int, int],
    num_masked: int,
    *,
    generator: torch.Generator,
    min_patches: int = 16,
    max_patches: int | None = None,
    min_aspect: float = 0.3,
    max_attempts: int = 10,
) -> Tensor:
    """BEiT block-wise masking (data2vec 1.0 vision; BEiT `MaskingGenerator`).

    Rectangles of area in [min_patches, remaining budget] and log-uniform aspect ratio in
    [min_aspect, 1/min_aspect] are added until `num_masked` patches are masked. A block
    never overshoots the budget; the count can fall short when `max_attempts` placements
    in a row fail, so rows may differ (fine for 1.0, which keeps every token).

    Returns: (B, H*W) bool.
    """
    h, w = grid
    if not 0 < num_masked <= h * w:
        raise ValueError(f"num_masked={num_masked} must be in [1, {h * w}]")
    max_patches = num_masked if max_patches is None else max_patches
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    out = torch.zeros(batch, h, w, dtype=torch.bool)
    for b in range(batch):
        mask = out[b]
        count = 0
        while count < num_masked:
            budget = min(num_masked - count, max_patches)
            delta = 0
            for _ in range(max_attempts):
                area = _uniform(min_patches, budget, generator)
                aspect = math.exp(_uniform(log_lo, log_hi, generator))
                bh = int(round(math.sqrt(area * aspect)))
                bw = int(round(math.sqrt(area / aspect)))
                if bw < w and bh < h:
                    top = _randint(0, h - bh, generator)
                    left = _randint(0, w - bw, generator)
                    region = mask[top : top + bh, left : left + bw]
                    new = bh * bw - int(region.sum())
                    if 0 < new <= budget:
                        region.fill_(True)
                        delta = new
                if delta > 0:
                    break
            if delta == 0:
                break
            count += delta
    return out.view(batch, h * w)


def _exact_count(marked: Tensor, target: int, generator: torch.Generator) -> Tensor:
    """Make every row have exactly `target` True values, keeping as many marked ones as possible.

    Too many: a random subset of the marked ones survives. Too few: random unmarked
    positions are added. (fairseq's `require_same_masks` fix-up, vectorised.)
    """
    score = marked.float() + torch.rand(marked.shape, generator=generator)
    idx = score.topk(target, dim=1).indices
    out = torch.zeros_like(marked)
    out.scatter_(1, idx, True)
    return out


def block_mask_2d(
    batch: int,
    grid: tuple[int, int],
    mask_prob: float,
    *,
    generator: torch.Generator,
    block_size: int = 3,
    mask_prob_adjust: float = 0.07,
    inverse: bool = True,
) -> Tensor:
    """data2vec 2.0 image block masking with an exact count per row (`compute_block_mask_2d`).

    With `inverse=True` (the released configs) the square blocks mark the *visible*
    patches and everything else is masked. Block centres are drawn with replacement;
    blocks are clamped at the border; then random single patches are added or removed
    so every row keeps exactly int(L * (1 - mask_prob)) visible patches (inverse) or
    masks exactly int(L * mask_prob) (non-inverse).

    Returns: (B, H*W) bool, True = masked.
    """
    h, w = grid
    length = h * w
    p = 1.0 - mask_prob if inverse else mask_prob
    n_centres = int(length * (p + mask_prob_adjust) / block_size**2)
    target = int(length * p)
    marked = torch.zeros(batch, h, w, dtype=torch.bool)
    if n_centres > 0:
        centres = torch.randint(0, length, (batch, n_centres), generator=generator)
        offs = torch.arange(block_size) - block_size // 2
        rows = (centres // w)[:, :, None] + offs  # (B, n, bs)
        cols = (centres % w)[:, :, None] + offs
        rows = rows.clamp(0, h - 1)[:, :, :, None].expand(-1, -1, -1, block_size)
        cols = cols.clamp(0, w - 1)[:, :, None, :].expand(-1, -1, block_size, -1)
        flat = (rows * w + cols).reshape(batch, -1)
        marked.view(batch, -1).scatter_(1, flat, True)
    marked = _exact_count(marked.view(batch, length), target, generator)
    return ~marked if inverse else marked


def random_mask(batch: int, length: int, mask_prob: float, *, generator: torch.Generator) -> Tensor:
    """MAE-style random masking: exactly `length - int(length * (1 - mask_prob))` masked per row.

    Returns: (B, T) bool, True = masked.
    """
    keep = int(length * (1.0 - mask_prob))
    noise = torch.rand(batch, length, generator=generator)
    idx = noise.argsort(dim=1)[:, :keep]
    visible = torch.zeros(batch, length, dtype=torch.bool)
    visible.scatter_(1, idx, True)
    return ~visible


def _row_lengths(batch: int, length: int, valid_lengths: Tensor | None) -> list[int]:
    if valid_lengths is None:
        return [length] * batch
    if valid_lengths.shape != (batch,):
        raise ValueError(f"valid_lengths has shape {tuple(valid_lengths.shape)}, expected ({batch},)")
    sizes = [int(v) for v in valid_lengths.tolist()]
    if any(not 0 < v <= length for v in sizes):
        raise ValueError(f"valid lengths must be in [1, {length}], got {sizes}")
    return sizes


def span_mask(
    batch: int,
    length: int,
    mask_prob: float,
    *,
    generator: torch.Generator,
    mask_length: int = 10,
    valid_lengths: Tensor | None = None,
    min_masks: int = 1,
) -> Tensor:
    """wav2vec 2.0 / data2vec 1.0 span masking (fairseq `compute_mask_indices`, static
    lengths, overlaps allowed, `require_same_masks=True`).

    Per row of valid length `sz`: `int(mask_prob * sz / mask_length + U[0,1))` spans (at
    least `min_masks`; one draw shared by all rows when nothing is padded), starts drawn
    without replacement from [0, sz - mask_length), each covering `mask_length` frames,
    clipped at `sz`. Then every row keeps a random subset of its masked frames, down to the
    smallest count in the batch, so all rows mask the same number. `mask_prob` is the share
    of span *starts*: 0.65 with length 10 masks about 49% of the frames.

    Args:
        valid_lengths: (B,) frames per row that are not padding; nothing past them is masked.
    Returns: (B, T) bool, True = masked.
    """
    sizes = _row_lengths(batch, length, valid_lengths)
    shared = int(mask_prob * length / mask_length + float(torch.rand((), generator=generator)))
    rows: list[Tensor] = []
    for sz in sizes:
        if valid_lengths is None:
            num = shared
        else:
            num = int(mask_prob * sz / mask_length + float(torch.rand((), generator=generator)))
        num = max(min_masks, num)
        span = mask_length
        if sz - span <= num:  # fairseq: shorten the start range so `num` distinct starts exist
            span = sz - num - 1
        positions = max(sz - span, 1)
        num = min(num, positions)
        starts = torch.randperm(positions, generator=generator)[:num]
        idx = (starts[:, None] + torch.arange(mask_length)[None, :]).reshape(-1)
        rows.append(torch.unique(idx[idx < sz]))
    target = min(len(r) for r in rows)
    out = torch.zeros(batch, length, dtype=torch.bool)
    for b, idx in enumerate(rows):
        if len(idx) > target:
            idx = idx[torch.randperm(len(idx), generator=generator)[:target]]
        out[b, idx] = True
    return out


def block_mask_1d(
    batch: int,
    length: int,
    mask_prob: float,
    *,
    generator: torch.Generator,
    mask_length: int = 5,
    mask_prob_adjust: float = 0.05,
    valid_lengths: Tensor | None = None,
) -> Tensor:
    """data2vec 2.0 speech masking with an exact count (fairseq `compute_block_mask_1d`,
    `require_same_masks=True`, not inverse).

    Per row of valid length `sz`: `int(sz * (mask_prob + mask_prob_adjust) / mask_length)`
    distinct span centres, each marking `mask_length` frames around it (clamped to the row);
    then random frames are un-marked or added until exactly `int(min_sz * mask_prob)` are
    masked, where `min_sz` is the shortest valid length in the batch (so every row masks
    the same number and padding is never masked).

    Returns: (B, T) bool, True = masked.
    """
    sizes = _row_lengths(batch, length, valid_lengths)
    marked = torch.zeros(batch, length, dtype=torch.bool)
    offs = torch.arange(mask_length) - mask_length // 2
    for b, sz in enumerate(sizes):
        n = min(int(sz * (mask_prob + mask_prob_adjust) / mask_length), sz)
        if n > 0:
            centres = torch.randperm(sz, generator=generator)[:n]
            marked[b, (centres[:, None] + offs).clamp(0, sz - 1).reshape(-1)] = True
    target = int(min(sizes) * mask_prob)
    score = marked.float() + torch.rand(marked.shape, generator=generator)
    if valid_lengths is not None:
        pad = torch.arange(length)[None, :] >= torch.tensor(sizes)[:, None]
        score = score.masked_fill(pad, -1.0)
    out = torch.zeros_like(marked)
    out.scatter_(1, score.topk(target, dim=1).indices, True)
    return out


def mask_to_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Indices to pack the visible tokens densely and to undo it.

    Args:
        mask: (B, T) bool, True = masked; every row must mask the same number of tokens.
    Returns:
        ids_keep: (B, T_keep) positions of the visible tokens, in their original order.
        ids_restore: (B, T) where `cat([visible, masked])[ids_restore]` is the original order.
    """
    counts = mask.sum(dim=1)
    if counts.numel() and bool((counts != counts[0]).any()):
        raise ValueError(f"every row must mask the same number of tokens to be packed; got counts {counts.tolist()}")
    keep = mask.shape[1] - (int(counts[0]) if counts.numel() else 0)
    # A stable sort puts visible tokens first and keeps them in order.
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :keep], ids_restore


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """x: (B, T, D), ids: (B, T') -> (B, T', D)."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_tokens(visible: Tensor, fill: Tensor, ids_restore: Tensor) -> Tensor:
    """Put packed visible tokens (B, T_keep, D) and fill tokens (B, T - T_keep, D) back in order."""
    return gather_tokens(torch.cat([visible, fill], dim=1), ids_restore)


def replace_masked(x: Tensor, mask: Tensor, value: Tensor) -> Tensor:
    """Replace masked tokens of x (B, T, D) by `value` (D,) or (B, T, D); mask (B, T)."""
    return torch.where(mask.unsqueeze(-1), value.to(x.dtype), x)


def draw_masks(
    kind: str,
    batch: int,
    grid: tuple[int, int],
    mask_prob: float,
    *,
    generator: torch.Generator,
    num_masks: int = 1,
    mask_length: int = 3,
    mask_prob_adjust: float = 0.0,
    min_block_patches: int = 16,
    valid_lengths: Tensor | None = None,
) -> Tensor:
    """Draw `num_masks` masks per sample for a (H, W) token grid ((1, T) for sequences).

    `valid_lengths` (batch,) gives each sample's unpadded token count; the sequence maskers
    (span, block_1d) never mask past it. Other kinds draw over the full length (the model
    then refuses 2.0 masks that cover padding).

    Returns: (batch * num_masks, H*W) bool; the M masks of a sample are consecutive rows,
    matching `repeat_interleave(M)` of the batch.
    """
    rows = batch * num_masks
    length = grid[0] * grid[1]
    if valid_lengths is not None and num_masks > 1:
        valid_lengths = valid_lengths.repeat_interleave(num_masks)
    if kind == "span":
        return span_mask(
            rows, length, mask_prob, generator=generator, mask_length=mask_length, valid_lengths=valid_lengths
        )
    if kind == "block_1d":
        return block_mask_1d(
            rows,
            length,
            mask_prob,
            generator=generator,
            mask_length=mask_length,
            mask_prob_adjust=mask_prob_adjust,
            valid_lengths=valid_lengths,
        )
    if kind == "beit_block":
        return beit_block_mask(
            rows,
            grid,
            max(1, int(round(length * mask_prob))),
            generator=generator,
            min_patches=min(min_block_patches, length),
        )
    if kind == "inverse_block":
        return block_mask_2d(
            rows,
            grid,
            mask_prob,
            generator=generator,
            block_size=mask_length,
            mask_prob_adjust=mask_prob_adjust,
            inverse=True,
        )
    if kind == "random":
        return random_mask(rows, length, mask_prob, generator=generator)
    raise ValueError(f"unknown masking kind {kind!r}")


def masks_from_config(
    masking: MaskingConfig,
    batch: int,
    grid: tuple[int, int],
    *,
    version: int,
    generator: torch.Generator,
    valid_lengths: Tensor | None = None,
) -> Tensor:
    """The masks `masking` asks for, for a batch of `batch` samples on a (H, W) token grid
    ((1, T) for sequences): the one place that reads a `MaskingConfig` into `draw_masks`.

    data2vec 2.0 (`version=2`) draws `masking.num_masks` masks per sample, 1.0 one. Used by the
    pretraining loaders (images, speech) and by `Data2Vec.draw_masks`. (Text masks depend on the
    token ids as well; `modalities.text.draw_text_masks` draws them.)

    Returns: (batch * M, H*W) bool, True = masked, as `draw_masks`.
    """
    return draw_masks(
        masking.kind,
        batch,
        grid,
        masking.mask_prob,
        generator=generator,
        num_masks=masking.num_masks if version == 2 else 1,
        mask_length=masking.mask_length,
        mask_prob_adjust=masking.mask_prob_adjust,
        min_block_patches=masking.min_block_patches,
        valid_lengths=valid_lengths,
    )
