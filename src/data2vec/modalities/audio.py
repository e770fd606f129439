"""Speech: the wav2vec 2.0 feature encoder, convolutional positions and ALiBi (docs/design.md,
'Front-ends').

`local` (shared with the teacher in both versions): 16 kHz waveform (B, L) -> 7-layer CNN
(layer-norm mode, no bias) -> 50 Hz frames -> LayerNorm(512) -> Linear(512 -> D). Sample-level
padding becomes frame-level padding through the exact conv output-length formula.

`context`: a 5-layer grouped-conv positional encoder whose output is added to the frames.
data2vec 1.0 replaces masked frames by a learned vector (init uniform(0, 1)) first and keeps
the full length; 2.0 runs the conv on the full-length sequence with masked frames zeroed, then
drops them. Padded frames are zeroed before every conv layer, so they never reach a valid one.

data2vec 2.0 adds an ALiBi attention bias, -|i - j| * slope_h * scale_h, with the standard
per-head slopes and a learned per-head scale (init 1, clamped at 0), shared by all blocks and
evaluated at the original frame indices of the tokens that were kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data2vec.config import ModelConfig
from data2vec.modalities.base import ContextEncoder, Frontend, LocalEncoder, Tokens

NOMINAL_SAMPLES = 320_000
"""20 s at 16 kHz: the official crop, used only for the front-end's nominal grid."""


def conv_output_length(length: int, conv_layers: Sequence[tuple[int, int, int]]) -> int:
    """Frames the CNN produces from `length` samples: floor((L - k) / s) + 1 per layer (0 if too short)."""
    for _, k, s in conv_layers:
        length = max((length - k) // s + 1, 0)
    return length


def conv_output_lengths(lengths: Tensor, conv_layers: Sequence[tuple[int, int, int]]) -> Tensor:
    """Tensor version of `conv_output_length` for (B,) sample counts."""
    out = lengths.long()
    for _, k, s in conv_layers:
        out = torch.div(out - k, s, rounding_mode="floor").add(1).clamp_min(0)
    return out


def lengths_to_padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, max_len) bool, True past each length."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


class _ChannelNorm(nn.Module):
    """LayerNorm over the channels of (B, C, T), computed in fp32 (fairseq Fp32LayerNorm)."""

    def __init__(self, channels: int, affine: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, elementwise_affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        n = self.norm
        w = None if n.weight is None else n.weight.float()
        b = None if n.bias is None else n.bias.float()
        y = F.layer_norm(x.float().transpose(1, 2), n.normalized_shape, w, b, n.eps)
        return y.transpose(1, 2).to(x.dtype)


class ConvFeatureExtractor(nn.Module):
    """wav2vec 2.0 CNN in layer-norm mode: per layer conv (no bias) -> LayerNorm(C) in fp32 -> GELU."""

    def __init__(self, conv_layers: Sequence[tuple[int, int, int]], bias: bool = False) -> None:
        super().__init__()
        self.conv_layers = tuple(conv_layers)
        layers: list[nn.Module] = []
        cin = 1
        for c, k, s in self.conv_layers:
            layers.append(nn.Sequential(nn.Conv1d(cin, c, k, stride=s, bias=bias), _ChannelNorm(c), nn.GELU()))
            cin = c
        self.layers = nn.ModuleList(layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in self.modules():
            if isinstance(conv, nn.Conv1d):
                nn.init.kaiming_normal_(conv.weight)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)

    def forward(self, wav: Tensor) -> Tensor:
        """(B, L) -> (B, C, T)."""
        x = wav.unsqueeze(1)
        for layer in self.layers:
            x = layer(x)
        return x


class AudioLocal(LocalEncoder):
    """(B, L) waveform (+ (B, L) sample padding) -> Tokens((B, T, D), (B, T) frame padding)."""

    def __init__(
        self, conv_layers: Sequence[tuple[int, int, int]], conv_bias: bool, dim: int, norm_eps: float = 1e-5
    ) -> None:
        super().__init__()
        channels = conv_layers[-1][0]
        self.cnn = ConvFeatureExtractor(conv_layers, conv_bias)
        self.norm = nn.LayerNorm(channels, eps=norm_eps)
        self.proj = nn.Linear(channels, dim)

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> Tokens:
        if inputs.ndim != 2:
            raise ValueError(f"expected waveforms of shape (B, samples), got {tuple(inputs.shape)}")
        feats = self.cnn(inputs).transpose(1, 2)  # (B, T, C)
        x = self.proj(self.norm(feats))
        pad = None
        if padding_mask is not None:
            if padding_mask.shape != inputs.shape:
                raise ValueError(f"padding mask {tuple(padding_mask.shape)} != waveform {tuple(inputs.shape)}")
            if bool(padding_mask.any()):
                lengths = conv_output_lengths((~padding_mask).sum(1), self.cnn.conv_layers)
                pad = lengths_to_padding_mask(lengths, x.shape[1])
        return Tokens(x, pad)


class ConvPositions(nn.Module):
    """`depth` x [Conv1d(D, D, k, padding=k//2, groups) -> drop last step if k is even ->
    LayerNorm (no affine; left out with `norm=False`, wav2vec 2.0's form) -> GELU]; returns the
    term added to the frames (B, T, D).

    Padded frames are zeroed before every layer (and in the output), so a padded batch
    gives valid frames exactly what each utterance would get alone. `zero_padding="input"`
    zeroes them only before the first layer, as fairseq and transformers do: with depth > 1
    the last valid frames of a padded row then see non-zero values from the padding."""

    def __init__(
        self, dim: int, depth: int, kernel: int, groups: int, zero_padding: str = "each_layer", norm: bool = True
    ) -> None:
        super().__init__()
        self.every_layer = zero_padding == "each_layer"
        self.norm = norm
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups) for _ in range(depth)
        )
        self.trim = 1 if kernel % 2 == 0 else 0
        self.dim = dim

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        keep = None if padding_mask is None else (~padding_mask).unsqueeze(1).to(x.dtype)  # (B, 1, T)
        h = x.transpose(1, 2)
        for i, conv in enumerate(self.convs):
            if keep is not None and (i == 0 or self.every_layer):
                h = h * keep
            h = conv(h)
            if self.trim:
                h = h[..., : -self.trim]
            if self.norm:
                h = F.layer_norm(h.transpose(1, 2), (self.dim,)).transpose(1, 2)
            h = F.gelu(h)
        if keep is not None:
            h = h * keep
        return h.transpose(1, 2)


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi paper's head slopes: a geometric sequence from 2^(-8/n); for a head count that is
    not a power of two, the slopes of the nearest lower power plus every other one of the next."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


class AlibiBias(nn.Module):
    """bias[h, i, j] = -|pos_i - pos_j| * slope_h * max(scale_h, 0), scale_h learned (init 1.0)."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", torch.tensor(alibi_slopes(num_heads)), persistent=False)
        self.scale = nn.Parameter(torch.ones(num_heads))

    def forward(self, positions: Tensor | None, num_tokens: int) -> Tensor:
        """positions: (B, T) original frame index of each token, or None = 0..T-1.
        Returns (B|1, H, T, T) float32."""
        slopes: Tensor = self.slopes  # type: ignore[assignment]
        if positions is None:
            positions = torch.arange(num_tokens, device=slopes.device)[None, :]
        pos = positions.float()
        dist = (pos[:, :, None] - pos[:, None, :]).abs()  # (B, T, T)
        per_head = (slopes * self.scale.float().clamp_min(0.0))[None, :, None, None]
        return -dist[:, None] * per_head


class AudioFrontend(Frontend):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        acfg, dim = cfg.audio, cfg.encoder.dim
        self.version = cfg.version
        self.alibi = acfg.alibi
        self.num_heads = cfg.encoder.num_heads
        self.grid = (1, conv_output_length(NOMINAL_SAMPLES, acfg.conv_layers))
        self.decoder_2d = False
        self.local = AudioLocal(acfg.conv_layers, acfg.conv_bias, dim, acfg.proj_norm_eps)
        positional = (
            ConvPositions(
                dim,
                acfg.pos_conv_depth,
                acfg.pos_conv_kernel,
                acfg.pos_conv_groups,
                acfg.pos_conv_zero_padding,
                acfg.pos_conv_norm,
            )
            if acfg.pos_conv_depth > 0
            else None
        )
        self.context = ContextEncoder(
            dim, num_prefix=0, positional=positional, mask_token=cfg.version == 1, dropout=0.0
        )

    @property
    def audio_local(self) -> AudioLocal:
        local = self.local
        assert isinstance(local, AudioLocal)
        return local

    @property
    def conv_layers(self) -> tuple[tuple[int, int, int], ...]:
        return self.audio_local.cnn.conv_layers

    def make_position_bias(self) -> nn.Module | None:
        return AlibiBias(self.num_heads) if self.alibi else None

    def reset_parameters(self) -> None:
        # The CNN keeps kaiming-normal weights and the projection PyTorch's default Linear init
        # (fairseq never applies the BERT init to them); the 1.0 mask vector is uniform(0, 1).
        self.audio_local.cnn.reset_parameters()
        self.audio_local.proj.reset_parameters()
        if self.context.mask_emb is not None:
            nn.init.uniform_(self.context.mask_emb)
