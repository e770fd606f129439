"""Position information: fixed 2-D sin-cos embeddings and BEiT's relative position bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(N,) positions -> (N, dim) as [sin(pos * w), cos(pos * w)], w = 10000^(-2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos embedding (MAE `get_2d_sincos_pos_embed`, no CLS slot): (H*W, dim).

    The first half encodes the column (x) coordinate, the second half the row (y).
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return emb.float()


class RelativePositionBias2d(nn.Module):
    """BEiT relative position bias over an H x W patch grid, with an optional CLS token.

    A learned table holds one value per head for each of the (2H-1)(2W-1) relative
    offsets, plus three for CLS->patch, patch->CLS and CLS->CLS. The integer index
    buffer is never EMA-averaged by the teacher (see teacher.py).

    `hf_resample` reproduces transformers' Data2VecVision on a non-square grid: there the
    offset part of the table is read as (2W-1, 2H-1) and bilinearly resized to (2H-1, 2W-1)
    before indexing, on every forward (an identity on square grids, where it is skipped).
    """

    def __init__(
        self, grid: tuple[int, int], num_heads: int, cls_token: bool = True, hf_resample: bool = False
    ) -> None:
        super().__init__()
        h, w = grid
        self.grid = (h, w)
        self.hf_resample = hf_resample and h != w
        self.num_prefix = 1 if cls_token else 0
        num_rel = (2 * h - 1) * (2 * w - 1) + 3
        self.table = nn.Parameter(torch.zeros(num_rel, num_heads))
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords = torch.stack([rows.reshape(-1), cols.reshape(-1)])  # (2, N)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
        rel_index = (rel[..., 0] + h - 1) * (2 * w - 1) + (rel[..., 1] + w - 1)
        n = h * w
        index = torch.zeros(n + 1, n + 1, dtype=torch.long)
        index[1:, 1:] = rel_index
        index[0, :] = num_rel - 3
        index[:, 0] = num_rel - 2
        index[0, 0] = num_rel - 1
        if not cls_token:
            index = index[1:, 1:].contiguous()
        self.register_buffer("index", index, persistent=False)

    def effective_table(self) -> Tensor:
        """The table the index reads: `table`, or its transformers-style resampling (see class doc)."""
        if not self.hf_resample:
            return self.table
        rh, rw = 2 * self.grid[0] - 1, 2 * self.grid[1] - 1
        sub = self.table[: rh * rw].reshape(1, rw, rh, -1).permute(0, 3, 1, 2)
        sub = F.interpolate(sub, size=(rh, rw), mode="bilinear")
        return torch.cat([sub.permute(0, 2, 3, 1).reshape(rh * rw, -1), self.table[rh * rw :]])

    def forward(self, positions: Tensor | None, num_tokens: int) -> Tensor:
        """positions: (B, T) token indices into the full sequence (prefix first), or None for
        all tokens in order. Returns (B|1, heads, T, T)."""
        index: Tensor = self.index  # type: ignore[assignment]
        table = self.effective_table()
        if positions is None:
            if num_tokens != index.shape[0]:
                raise ValueError(f"expected {index.shape[0]} tokens for this grid, got {num_tokens}")
            return table[index].permute(2, 0, 1).unsqueeze(0)
        idx = index[positions[:, :, None], positions[:, None, :]]  # (B, T, T)
        return table[idx].permute(0, 3, 1, 2)
