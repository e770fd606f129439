"""`Data2Vec`: student, EMA teacher and the pretraining objective, for any modality.

One model, two modes (`ModelConfig.version`):

- 1.0: the student sees the full sequence with masked tokens replaced by a learned
  vector; a linear (or 2-layer) head predicts the targets at masked positions.
- 2.0: the student encodes only the visible tokens (packed densely); a small conv
  decoder fills the masked slots from noise; M masks per sample share one teacher pass;
  images add a CLS loss.

Shapes: B samples, M masks per sample, T tokens, P prefix tokens, D width, K top layers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from data2vec.config import LossConfig, MaskingConfig, ModelConfig, RunConfig, TargetConfig, TeacherConfig
from data2vec.masking import mask_to_indices, masks_from_config, restore_tokens
from data2vec.modalities import Frontend, Tokens, build_frontend
from data2vec.nn.decoder import ConvDecoder
from data2vec.nn.transformer import Block, Encoder, EncoderOutput, compile_blocks
from data2vec.targets import build_targets, feature_std, loss_scale, regression_loss, relative_std
from data2vec.teacher import EMATeacher


class Batch(NamedTuple):
    inputs: Tensor
    """Images (B, C, H, W), waveforms (B, L) or token ids (B, T); the teacher's (clean) input."""
    mask: Tensor | None = None
    """(B*M, T) bool over tokens, True = masked; None lets the model draw masks."""
    padding_mask: Tensor | None = None
    """Input-level padding, (B, L) bool, True = pad."""
    student_inputs: Tensor | None = None
    """Corrupted input for the student when masking happens at the input (1.0 text: BERT
    80/10/10); None = the student reads `inputs` and masks at the token level."""


class StepOutput(NamedTuple):
    loss: Tensor
    """Scalar objective (mean over masked tokens, plus the weighted CLS term)."""
    metrics: dict[str, Tensor]
    """Detached scalars: loss_reg, loss_cls, target_std, pred_std, local_std, masked_tokens."""


@torch.no_grad()
def trunc_normal_(t: Tensor, std: float = 0.02) -> Tensor:
    """Normal(0, std) truncated at +-2 std, by inverting the CDF (torch's own is ~10x slower on CPU)."""
    lo = 0.5 * (1.0 + math.erf(-2.0 / math.sqrt(2.0)))
    t.uniform_(2 * lo - 1, 1 - 2 * lo).erfinv_().mul_(std * math.sqrt(2.0))
    return t


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_head(model: ModelConfig, frontend: Frontend) -> nn.Module:
    """The pretraining head: a linear (or 2-layer) regression head in 1.0, the conv decoder in 2.0."""
    dim = model.encoder.dim
    if model.version == 1:
        if model.head_layers == 1:
            return nn.Linear(dim, dim)
        return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
    return ConvDecoder(model.decoder, dim, frontend.grid if frontend.decoder_2d else None)


class Data2Vec(nn.Module):
    def __init__(
        self,
        model: ModelConfig,
        masking: MaskingConfig,
        teacher: TeacherConfig,
        targets: TargetConfig,
        loss: LossConfig,
    ) -> None:
        super().__init__()
        self.cfg, self.masking, self.target_cfg, self.loss_cfg = model, masking, targets, loss
        self.teacher_cfg = teacher
        self.frontend = build_frontend(model)
        self.encoder = Encoder(model.encoder, self.frontend.make_position_bias)
        self.head = build_head(model, self.frontend)
        self._init_weights()
        # Built last, from the initialised student: the teacher starts as an exact copy.
        self.teacher = EMATeacher(self.student_parts())

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Data2Vec:
        return cls(cfg.model, cfg.masking, cfg.teacher, cfg.targets, cfg.loss)

    @classmethod
    def from_parts(
        cls, cfg: RunConfig, frontend: Frontend, encoder: Encoder, head: nn.Module, teacher: EMATeacher
    ) -> Data2Vec:
        """A model made of existing modules, nothing built, copied or initialised: a view that
        shares its parts with another owner (`joint.JointData2Vec` shares one encoder and one
        teacher between several modalities this way)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.cfg, self.masking, self.target_cfg, self.loss_cfg = cfg.model, cfg.masking, cfg.targets, cfg.loss
        self.teacher_cfg = cfg.teacher
        self.frontend, self.encoder, self.head, self.teacher = frontend, encoder, head, teacher
        return self

    # ------------------------------------------------------------------ structure

    def _init_weights(self, encoder: bool = True) -> None:
        """Initialise the front-end and head, and (`encoder`) the encoder."""
        self.frontend.apply(_init_linear)
        if encoder:
            self.encoder.apply(_init_linear)
        if self.cfg.version == 1:
            self.head.apply(_init_linear)
        ctx = self.frontend.context
        if ctx.prefix is not None:
            trunc_normal_(ctx.prefix)
        if ctx.mask_emb is not None:
            trunc_normal_(ctx.mask_emb)
        if encoder and self.cfg.encoder.norm_order == "pre":
            # BEiT: scale the residual-branch outputs down with depth.
            for i, blk in enumerate(self.encoder.blocks):
                assert isinstance(blk, Block)
                layer_id = self.cfg.encoder.prenet_depth + i + 1
                blk.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
                blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))
        self.frontend.reset_parameters()

    def student_parts(self) -> dict[str, nn.Module]:
        """The student modules the teacher tracks, by `teacher.ema_scope`."""
        parts: dict[str, nn.Module] = {"encoder": self.encoder}
        if self.teacher_cfg.ema_scope in ("local", "context"):
            parts["context"] = self.frontend.context
        if self.teacher_cfg.ema_scope == "local":
            parts["local"] = self.frontend.local
        return parts

    def student_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def teacher_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("teacher.")}

    @torch.no_grad()
    def update_teacher(self, decay: float) -> None:
        """EMA step; call after each optimizer step."""
        self.teacher.update(self.student_parts(), decay)

    def compile_blocks(self) -> None:
        """`train.compile`: torch.compile the student's and the teacher's Transformer blocks."""
        compile_blocks(self.encoder, self.teacher.part("encoder"))

    @property
    def num_tokens(self) -> int:
        h, w = self.frontend.grid
        return h * w

    def draw_masks(
        self,
        batch: int,
        generator: torch.Generator,
        grid: tuple[int, int] | None = None,
        valid_lengths: Tensor | None = None,
    ) -> Tensor:
        """(B*M, T) masks from the masking config (what the data loader does in training).
        `grid` is the token layout: the front-end's patch grid by default, (1, T) for sequences;
        `valid_lengths` (B,) the unpadded token count of each sample (sequence maskers only)."""
        return masks_from_config(
            self.masking,
            batch,
            grid or self.frontend.grid,
            version=self.cfg.version,
            generator=generator,
            valid_lengths=valid_lengths,
        )

    # ------------------------------------------------------------------ forward passes

    @torch.no_grad()
    def teacher_targets(self, inputs: Tensor, student_tokens: Tokens) -> Tensor:
        """Targets from the teacher on the unmasked input: (B, T, D) float32, prefix removed."""
        t = self.teacher
        local, context = t.part("local"), t.part("context") or self.frontend.context
        if local is not None:
            tokens: Tokens = local(inputs)
        else:  # shared feature extractor: reuse the student's features, no gradient
            tokens = Tokens(student_tokens.x.detach(), student_tokens.padding_mask)
        enc_in = context(tokens, clean=True)
        out = t["encoder"](enc_in.x, enc_in.padding_mask, enc_in.positions, keep_layers=self.target_cfg.top_k)
        P = self.frontend.num_prefix
        feats = [(o.ffn_out if self.target_cfg.layer_source == "ffn" else o.x)[:, P:] for o in out.layers]
        return build_targets(
            feats,
            self.target_cfg.top_k,
            self.target_cfg.layer_norm,
            self.target_cfg.final_norm,
            tokens.padding_mask,
        )

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> StepOutput:
        """One pretraining objective evaluation (docs/design.md, 'The objective, step by step')."""
        if batch.mask is None:
            if generator is None:  # follow the global seed, but never the same masks twice
                generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
            drawn = self.frontend.input_masks(batch.inputs, self.masking, generator)
            if drawn is not None:  # masks that depend on the input (text), + the 1.0 corrupted input
                student = batch.student_inputs if batch.student_inputs is not None else drawn[1]
                batch = batch._replace(mask=drawn[0], student_inputs=student)
        tokens = self.frontend.local(batch.inputs, batch.padding_mask)  # once per sample
        local_std = relative_std(tokens.x if tokens.padding_mask is None else tokens.x[~tokens.padding_mask])
        B, T, D = tokens.x.shape
        M = self.masking.num_masks if self.cfg.version == 2 else 1
        mask = batch.mask
        if mask is None:
            if generator is None:  # follow the global seed, but never the same masks twice
                generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
            grid = self.frontend.grid if self.frontend.decoder_2d else (1, T)
            valid = None if tokens.padding_mask is None else (~tokens.padding_mask).sum(1).cpu()
            mask = self.draw_masks(B, generator, grid, valid).to(tokens.x.device)
        if mask.shape != (B * M, T):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(B * M, T)}")
        pad = tokens.padding_mask
        if pad is not None:
            pad_rows = pad.repeat_interleave(M, 0) if M > 1 else pad
            if self.cfg.version == 1:
                mask = mask & ~pad_rows  # padding is never predicted
            elif bool((mask & pad_rows).any()):
                raise ValueError("masks cover padded tokens; draw them from each row's valid length")
        y = self.teacher_targets(batch.inputs, tokens)  # (B, T, D) fp32, from the clean input
        P = self.frontend.num_prefix

        student_inputs = batch.student_inputs
        if student_inputs is None and self.cfg.version == 1:
            student_inputs = self.frontend.corrupt(batch.inputs, mask, generator)
        if self.cfg.version == 1 and student_inputs is not None:
            # Input-level masking (text): the student embeds the corrupted input.
            student_tokens = self.frontend.local(student_inputs, batch.padding_mask)
            enc_in = self.frontend.context(student_tokens)
            out = self.encoder(enc_in.x, enc_in.padding_mask, enc_in.positions)
            pred = self.head(out.x[:, P:][mask])
        elif self.cfg.version == 1:
            enc_in = self.frontend.context(tokens, mask=mask)
            out = self.encoder(enc_in.x, enc_in.padding_mask, enc_in.positions)
            pred = self.head(out.x[:, P:][mask])  # (N, D)
        else:
            if M > 1:
                pad = tokens.padding_mask
                tokens = Tokens(
                    tokens.x.repeat_interleave(M, 0), pad.repeat_interleave(M, 0) if pad is not None else None
                )
                y_rep = y.repeat_interleave(M, 0)
            else:
                y_rep = y
            ids_keep, ids_restore = mask_to_indices(mask)
            enc_in = self.frontend.context(tokens, mask=mask, ids_keep=ids_keep)
            out = self.encoder(enc_in.x, enc_in.padding_mask, enc_in.positions)
            pred = self.decode(out, ids_restore)[mask]
            y = y_rep

        target = y[mask]  # (N, D)
        scale = loss_scale(self.loss_cfg.scale, D)
        loss_reg = regression_loss(pred, target, self.loss_cfg.beta, scale).mean()
        loss = loss_reg
        loss_cls = loss_reg.new_zeros(())
        if self.cfg.version == 2 and P > 0 and self.loss_cfg.cls_weight > 0:
            # CLS regresses onto the mean over tokens of the final target (2.0 images).
            cls_target = y.mean(dim=1)
            loss_cls = regression_loss(out.x[:, 0], cls_target, 0.0, scale).mean()
            loss = loss + self.loss_cfg.cls_weight * loss_cls
        metrics = {
            "loss_reg": loss_reg.detach(),
            "loss_cls": loss_cls.detach(),
            "target_std": feature_std(target),
            "pred_std": feature_std(pred),
            "local_std": local_std,
            "masked_tokens": torch.tensor(float(target.shape[0])),
        }
        return StepOutput(loss, metrics)

    def decode(self, out: EncoderOutput, ids_restore: Tensor) -> Tensor:
        """2.0 decoder: visible outputs + noise for masked slots, original order, no positions."""
        P = self.frontend.num_prefix
        dcfg = self.cfg.decoder
        vis = nn.functional.dropout(out.x[:, P:], dcfg.input_dropout, training=self.training)
        B, Tk, D = vis.shape
        n_masked = ids_restore.shape[1] - Tk
        noise = torch.randn(B, n_masked, D, device=vis.device, dtype=vis.dtype) * dcfg.mask_noise_std
        result: Tensor = self.head(restore_tokens(vis, noise, ids_restore))
        return result

    # ------------------------------------------------------------------ inference

    def encode(
        self, inputs: Tensor, padding_mask: Tensor | None = None, keep_layers: int | None = None
    ) -> EncoderOutput:
        """Unmasked student forward: final output (B, P+T, D) and the last `keep_layers` blocks
        (all main blocks by default)."""
        tokens = self.frontend.local(inputs, padding_mask)
        enc_in = self.frontend.context(tokens, clean=True)
        keep = len(self.encoder.blocks) if keep_layers is None else keep_layers
        out: EncoderOutput = self.encoder(enc_in.x, enc_in.padding_mask, enc_in.positions, keep_layers=keep)
        return out


def no_weight_decay(name: str, param: Tensor) -> bool:
    """1-D parameters (norms, biases, LayerScale), tokens and position tables get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in (".prefix", "mask_emb", "position_bias"))
