"""The Transformer shared by every modality.

`Block` covers both architectures data2vec uses:
- pre-LN ViT with LayerScale and q/v-only bias (data2vec 1.0 vision, BEiT);
- post-LN blocks (data2vec 1.0 speech/text, every data2vec 2.0 model: fairseq `AltBlock`).

Each block returns its output *and* the FFN output before the residual, because that
is what data2vec's teacher regresses onto (paper 1.0, footnote 5 and Table 5).

Shapes: B batch, T tokens, D width, H heads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from data2vec.config import EncoderConfig


def written_out_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v, as plain tensor ops: on CPU in bf16, for a pass that
    needs gradients, 1.2-2.9x faster forward + backward than either SDPA kernel at data2vec's
    shapes (PyTorch's CPU flash kernel is slow backward in bf16, and a bias that needs a gradient
    leaves SDPA only its math kernel); `python benchmarks/levers.py --levers attention`."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores + bias
    weights = scores.softmax(-1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: str, attn_dropout: float, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias == "all")
        # BEiT: learned bias on q and v only (k's bias would cancel in the softmax anyway).
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias == "qv" else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias == "qv" else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x: (B, T, D); bias: additive, broadcastable to (B, H, T, T), -inf where a key is hidden."""
        B, T, D = x.shape
        qkv_bias: Tensor | None = self.qkv.bias
        if self.q_bias is not None and self.v_bias is not None:
            qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if bias is not None:
            bias = bias.to(q.dtype)
        p = self.attn_dropout if self.training else 0.0
        if q.requires_grad and q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # a bf16 pass that needs gradients, on CPU: written out beats both SDPA kernels; a
            # pass without gradients (the teacher, extraction) keeps the flash kernel, whose
            # bf16 forward is the fastest (benchmarks/attention_cpu.py)
            out = written_out_attention(q, k, v, bias, p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (B, H, T, D/H)
        out = out.transpose(1, 2).reshape(B, T, D)
        result: Tensor = self.proj_drop(self.proj(out))
        return result


def activation(name: str, x: Tensor) -> Tensor:
    """The MLP activations `EncoderConfig.activation` names."""
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}")


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, activation_dropout: float, activation: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.activation = activation
        self.act_drop = nn.Dropout(activation_dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(self.act_drop(activation(self.activation, self.fc1(x))))
        return out


class BlockOutput(NamedTuple):
    x: Tensor
    """(B, T, D) block output."""
    ffn_out: Tensor
    """(B, T, D) FFN branch output before dropout and the residual add."""


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig, drop_path: float, position_bias: nn.Module | None = None) -> None:
        super().__init__()
        d = cfg.dim
        self.pre_norm = cfg.norm_order == "pre"
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio), cfg.activation_dropout, cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)
        ls = cfg.layer_scale_init
        self.gamma1 = nn.Parameter(torch.full((d,), ls)) if ls > 0 else None
        self.gamma2 = nn.Parameter(torch.full((d,), ls)) if ls > 0 else None
        self.position_bias = position_bias

    def forward(self, x: Tensor, bias: Tensor | None = None, positions: Tensor | None = None) -> BlockOutput:
        if self.position_bias is not None:
            own = self.position_bias(positions, x.shape[1])
            bias = own if bias is None else bias + own
        if self.pre_norm:
            a = self.attn(self.norm1(x), bias)
            x = x + self.drop_path(a if self.gamma1 is None else self.gamma1 * a)
            t = self.mlp(self.norm2(x))
            if self.gamma2 is not None:
                t = self.gamma2 * t
            x = x + self.drop_path(self.drop(t))
            return BlockOutput(x, t)
        x = self.norm1(x + self.drop_path(self.attn(x, bias)))
        t = self.mlp(x)
        x = self.norm2(x + self.drop_path(self.drop(t)))
        return BlockOutput(x, t)


class EncoderOutput(NamedTuple):
    x: Tensor
    """(B, T, D) final output (after the final norm if any)."""
    layers: list[BlockOutput]
    """Outputs of the last `keep_layers` main blocks (prenet blocks never included)."""


def padding_bias(padding_mask: Tensor) -> Tensor:
    """(B, T) bool, True = padding -> (B, 1, 1, T) additive float bias hiding padded keys."""
    bias = torch.zeros(padding_mask.shape, dtype=torch.float32, device=padding_mask.device)
    return bias.masked_fill(padding_mask, float("-inf"))[:, None, None, :]


class Encoder(nn.Module):
    """Input norm -> prenet blocks -> main blocks -> final norm.

    `make_position_bias` builds a module mapping (positions (B, T) | None, T) to an additive
    attention bias (B|1, H, T, T); the encoder owns one (shared) or gives one to each block.
    """

    def __init__(self, cfg: EncoderConfig, make_position_bias: Callable[[], nn.Module | None] | None = None) -> None:
        super().__init__()
        if cfg.position_bias != "none" and make_position_bias is None:
            raise ValueError(f"position_bias={cfg.position_bias!r} needs a front-end that provides one")
        self.cfg = cfg
        total = cfg.prenet_depth + cfg.depth
        rates = torch.linspace(0, cfg.drop_path, total).tolist() if total > 1 else [cfg.drop_path]
        per_layer = cfg.position_bias in ("per_layer", "both")

        def block(i: int) -> Block:
            return Block(cfg, rates[i], make_position_bias() if per_layer and make_position_bias else None)

        self.input_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.input_norm else None
        self.input_drop = nn.Dropout(cfg.dropout)
        self.prenet = nn.ModuleList([block(i) for i in range(cfg.prenet_depth)])
        self.blocks = nn.ModuleList([block(cfg.prenet_depth + i) for i in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.final_norm else None
        shared = cfg.position_bias in ("shared", "both") and make_position_bias is not None
        self.position_bias = make_position_bias() if shared and make_position_bias else None

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        positions: Tensor | None = None,
        keep_layers: int = 0,
    ) -> EncoderOutput:
        """x: (B, T, D); padding_mask: (B, T) True = pad; positions: (B, T) original token indices
        (for position biases when tokens were dropped). Returns the last `keep_layers` main blocks."""
        bias = padding_bias(padding_mask) if padding_mask is not None else None
        if self.position_bias is not None:
            shared = self.position_bias(positions, x.shape[1])
            bias = shared if bias is None else bias + shared
        if self.input_norm is not None:
            x = self.input_norm(x)
        x = self.input_drop(x)
        for blk in self.prenet:
            x = self._maybe_drop_layer(blk, x, bias, positions).x
        layers: list[BlockOutput] = []
        first_kept = len(self.blocks) - keep_layers
        for i, blk in enumerate(self.blocks):
            out = self._maybe_drop_layer(blk, x, bias, positions)
            x = out.x
            if i >= first_kept:
                layers.append(out)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return EncoderOutput(x, layers)

    def _maybe_drop_layer(
        self, blk: nn.Module, x: Tensor, bias: Tensor | None, positions: Tensor | None
    ) -> BlockOutput:
        if self.training and self.cfg.layerdrop > 0 and float(torch.rand(())) < self.cfg.layerdrop:
            return BlockOutput(x, torch.zeros_like(x))
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing replays dropout with the saved RNG state.
            ckpt: BlockOutput = checkpoint(blk, x, bias, positions, use_reentrant=False)
            return ckpt
        out: BlockOutput = blk(x, bias, positions)
        return out


COMPILE_RECOMPILE_LIMIT = 64


def compile_blocks(*encoders: nn.Module | None) -> None:
    """torch.compile each block of each `Encoder` given (anything else is skipped) in place
    (parameter names, state dicts and hooks unchanged).
    Blocks, not the whole encoder: the graph stays one block long and serves every block. All
    blocks share `Block.forward`, whose variants (student with gradients and teacher without,
    visible and full lengths, bf16 or not, pre-net and main blocks) easily pass dynamo's default
    limit of 8 compiled versions per function, after which it silently runs eager: raise it."""
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, COMPILE_RECOMPILE_LIMIT)
    for encoder in encoders:
        if isinstance(encoder, Encoder):
            for block in [*encoder.prenet, *encoder.blocks]:
                block.compile()
