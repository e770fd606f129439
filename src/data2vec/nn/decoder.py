"""data2vec 2.0's light convolutional decoder (fairseq `Decoder1d` / `Decoder2d`).

It sees the student's output at visible positions and noise at masked ones, in the
original token order, with no positional input: position reaches it only through the
convolution layout.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.config import DecoderConfig


class _ConvBlock(nn.Module):
    """conv -> (drop last step if the kernel is even) -> LayerNorm over channels (no affine) -> GELU."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int, two_d: bool) -> None:
        super().__init__()
        conv = nn.Conv2d if two_d else nn.Conv1d
        self.conv = conv(cin, cout, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0
        self.cout = cout

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.trim:
            x = x[..., : -self.trim, : -self.trim] if x.ndim == 4 else x[..., : -self.trim]
        x = F.layer_norm(x.movedim(1, -1), (self.cout,)).movedim(-1, 1)
        return F.gelu(x)


class ConvDecoder(nn.Module):
    """(B, T, D) tokens -> (B, T, D) predictions. 2-D over `grid` when given, else 1-D over T."""

    def __init__(self, cfg: DecoderConfig, dim: int, grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.grid = grid
        self.residual = cfg.residual
        self.blocks = nn.ModuleList(
            _ConvBlock(dim if i == 0 else cfg.dim, cfg.dim, cfg.kernel_size, cfg.groups, grid is not None)
            for i in range(cfg.layers)
        )
        if cfg.projection_layers == 1:
            self.proj: nn.Module = nn.Linear(cfg.dim, dim)
        else:
            hidden = int(cfg.dim * cfg.projection_ratio)
            self.proj = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        h = x.transpose(1, 2)  # (B, D, T)
        if self.grid is not None:
            h = h.reshape(B, D, *self.grid)
        for blk in self.blocks:
            y = blk(h)
            h = y + h if self.residual and y.shape == h.shape else y
        h = h.reshape(B, h.shape[1], T).transpose(1, 2)
        out: Tensor = self.proj(h)
        return out
