"""Images: a ViT patch embedding (1 or 3 channels, any size divisible by the patch).

data2vec 1.0 (BEiT): CLS token, no absolute positions, a relative position bias in the
encoder, masked patches replaced by a learned vector.
data2vec 2.0: fixed 2-D sin-cos positions added before masking, CLS token, masked
patches dropped; the teacher is an EMA of the whole front-end (`ema_scope="local"`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from data2vec.config import ModelConfig
from data2vec.modalities.base import ContextEncoder, Frontend, LocalEncoder, Tokens
from data2vec.nn.pos import RelativePositionBias2d, sincos_2d


class PatchEmbed(LocalEncoder):
    """(B, C, H, W) -> (B, H/p * W/p, D), patches in row-major order."""

    def __init__(self, image_size: tuple[int, int], patch_size: int, channels: int, dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.channels = channels
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> Tokens:
        if inputs.ndim != 4 or inputs.shape[1] != self.channels or tuple(inputs.shape[2:]) != self.image_size:
            raise ValueError(
                f"expected images of shape (B, {self.channels}, {self.image_size[0]}, {self.image_size[1]}), "
                f"got {tuple(inputs.shape)}"
            )
        return Tokens(self.proj(inputs).flatten(2).transpose(1, 2), None)


class FixedPositions(nn.Module):
    """Adds a fixed (T, D) table; content-independent."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.unsqueeze(0), persistent=False)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        table: Tensor = self.table  # type: ignore[assignment]
        return table.to(x.dtype)


class LearnedPositions(nn.Module):
    """Adds a learned (T, D) table (BEiT's optional absolute position embeddings, patch part)."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.table.to(x.dtype)


class ImageFrontend(Frontend):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        icfg, dim = cfg.image, cfg.encoder.dim
        self.grid = icfg.grid
        self.decoder_2d = True
        self.num_heads = cfg.encoder.num_heads
        self.rel_pos_hf_resample = icfg.rel_pos_hf_resample
        self.local = PatchEmbed(icfg.image_size, icfg.patch_size, icfg.channels, dim)
        positional: nn.Module | None = None
        if icfg.positions == "sincos":
            positional = FixedPositions(sincos_2d(dim, self.grid))
        elif icfg.positions == "learned":
            positional = LearnedPositions(self.grid[0] * self.grid[1], dim)
        self.context = ContextEncoder(
            dim,
            num_prefix=1 if icfg.cls_token else 0,
            positional=positional,
            mask_token=cfg.version == 1,
            dropout=0.0,
        )

    def make_position_bias(self) -> nn.Module:
        return RelativePositionBias2d(
            self.grid, self.num_heads, cls_token=self.num_prefix == 1, hf_resample=self.rel_pos_hf_resample
        )


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, T, p*p*C) pixel patches in row-major order (for pictures and probes)."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)
