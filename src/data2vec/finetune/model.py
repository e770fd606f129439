"""The fine-tuning model (pretrained front-end + encoder + task head), its optimiser groups
with layer-wise lr decay, and saving/loading it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from data2vec.checkpoint import replace_folder
from data2vec.config import RunConfig
from data2vec.finetune.config import FinetuneConfig
from data2vec.masking import span_mask
from data2vec.modalities.base import Tokens
from data2vec.model import Data2Vec, no_weight_decay, trunc_normal_
from data2vec.pretrained import load_student_weights


class FinetuneModel(nn.Module):
    """A pretrained front-end and encoder with a task head."""

    def __init__(self, backbone: Data2Vec, task: str, num_outputs: int, head_norm: str = "layer") -> None:
        super().__init__()
        self.task = task
        self.version = backbone.cfg.version
        self.frontend = backbone.frontend
        self.encoder = backbone.encoder
        dim = backbone.cfg.encoder.dim
        self.head: nn.Module
        if task in ("text_cls", "text_reg"):
            self.head = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, num_outputs))
            for m in self.head:
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight)
                    nn.init.zeros_(m.bias)
        elif task == "audio_ctc":
            letters = nn.Linear(dim, num_outputs)
            trunc_normal_(letters.weight)
            nn.init.zeros_(letters.bias)
            # "batch": each frame's features standardised (BatchNorm over the valid frames) first
            self.head = letters if head_norm == "layer" else nn.Sequential(nn.BatchNorm1d(dim, affine=False), letters)
        else:
            norm = nn.LayerNorm(dim, eps=1e-6) if head_norm == "layer" else nn.BatchNorm1d(dim, affine=False)
            self.head = nn.Sequential(norm, nn.Linear(dim, num_outputs))
            lin = self.head[1]
            assert isinstance(lin, nn.Linear)
            trunc_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.mask_prob = 0.0
        self.mask_length = 10
        self.mask_channel_prob = 0.0
        self.mask_channel_length = 64

    @property
    def num_layers(self) -> int:
        return len(self.encoder.prenet) + len(self.encoder.blocks)

    def _mask_frames(self, tokens: Tokens, generator: torch.Generator | None) -> tuple[Tokens, Tensor | None]:
        """Fine-tuning masks (speech, training only): time spans and channel spans."""
        x, pad = tokens
        B, T, D = x.shape
        mask = None
        gen = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        if self.mask_prob > 0:
            valid = torch.full((B,), T) if pad is None else (~pad).sum(1).cpu()
            length = max(1, min(self.mask_length, int(valid.min()) - 1))
            mask = span_mask(B, T, self.mask_prob, generator=gen, mask_length=length, valid_lengths=valid)
            mask = mask.to(x.device)
            if pad is not None:
                mask = mask & ~pad
            if self.version == 2:  # v2: N(0, 0.01) noise in place of masked frames, all frames kept
                noise = torch.randn(x.shape, generator=None, device=x.device, dtype=x.dtype) * 0.01
                x = torch.where(mask[..., None], noise, x)
                mask = None
        if self.mask_channel_prob > 0:
            length = max(1, min(self.mask_channel_length, D - 1))
            ch = span_mask(B, D, self.mask_channel_prob, generator=gen, mask_length=length)
            x = x.masked_fill(ch.to(x.device)[:, None, :], 0.0)
        return Tokens(x, pad), mask

    def features(
        self, inputs: Tensor, padding_mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Encoder output (B, P + T, D) and the (B, P + T) token padding (True = pad)."""
        tokens = self.frontend.local(inputs, padding_mask)
        mask = None
        if self.training and (self.mask_prob > 0 or self.mask_channel_prob > 0):
            tokens, mask = self._mask_frames(tokens, generator)
        enc_in = self.frontend.context(tokens, mask=mask)
        out = self.encoder(enc_in.x, enc_in.padding_mask, enc_in.positions)
        return out.x, enc_in.padding_mask

    def _letters(self, x: Tensor, pad: Tensor | None) -> Tensor:
        """CTC head: (B, T, D) frames -> (B, T, letters); a BatchNorm head normalises the valid
        frames only (padded ones are zero before the letter layer)."""
        if not isinstance(self.head, nn.Sequential):
            return self.head(x)  # type: ignore[no-any-return]
        norm, letters = self.head
        B, T, D = x.shape
        flat = x.reshape(B * T, D).float()
        if pad is None:
            normed = norm(flat)
        else:
            keep = ~pad.reshape(-1)
            normed = flat.new_zeros(flat.shape)
            normed[keep] = norm(flat[keep])
        y: Tensor = letters(normed.to(x.dtype)).reshape(B, T, -1)
        return y

    def forward(self, inputs: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Task outputs: (B, classes) logits, (B,) regression values, or (B, T, letters) CTC
        log-probabilities with the (B, T) frame padding."""
        x, pad = self.features(inputs, padding_mask)
        P = self.frontend.num_prefix
        if self.task in ("text_cls", "text_reg"):
            y: Tensor = self.head(x[:, 0])
            return (y[:, 0] if self.task == "text_reg" else y), None
        x, pad = x[:, P:], None if pad is None else pad[:, P:]
        if self.task == "audio_ctc":
            return self._letters(x, pad).float().log_softmax(-1), pad
        if pad is None:
            pooled = x.mean(1)
        else:
            keep = (~pad).unsqueeze(-1).to(x.dtype)
            pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        if self.training and pooled.shape[0] == 1 and isinstance(self.head, nn.Sequential):
            norm, linear = self.head
            if isinstance(norm, nn.BatchNorm1d):  # a batch of one has no batch statistics: use the running ones
                pooled = nn.functional.batch_norm(pooled, norm.running_mean, norm.running_var, training=False)
                return linear(pooled), None
        return self.head(pooled), None


def layer_id(name: str, num_layers: int, num_prenet: int = 0) -> int:
    """BEiT layer of a parameter: front-end, prefix tokens and the encoder's input norm and
    position bias are 0; block i (1-based, prenet blocks first) is i; the head and the final
    norm are L + 1."""
    if name.startswith("frontend."):
        return 0
    if name.startswith("encoder."):
        parts = name.split(".")
        if parts[1] == "prenet":
            return int(parts[2]) + 1
        if parts[1] == "blocks":
            return num_prenet + int(parts[2]) + 1
        if parts[1] == "final_norm":
            return num_layers + 1
        return 0
    return num_layers + 1


def param_groups(model: FinetuneModel, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups by (layer, decay or not); each carries `lr_scale` = decay^(L + 1 - layer)."""
    L = model.num_layers
    n_prenet = len(model.encoder.prenet)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, L, n_prenet)
        nd = no_weight_decay(name, p)
        g = groups.setdefault(
            (lid, nd),
            {"params": [], "weight_decay": 0.0 if nd else weight_decay, "lr_scale": layer_decay ** (L + 1 - lid)},
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def save_finetuned(path: Path, model: FinetuneModel, rcfg: RunConfig, meta: dict[str, Any]) -> None:
    """`path/` = model.safetensors + config.json (the encoder's RunConfig) + finetune.json."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(rcfg.to_dict(), indent=2) + "\n")
        (tmp / "finetune.json").write_text(json.dumps(meta, indent=2) + "\n")

    replace_folder(path, write, "the fine-tuned model")


def load_finetuned(path: str | Path) -> tuple[FinetuneModel, RunConfig, dict[str, Any]]:
    """A fine-tuned model saved by `finetune` (its `best/` folder), in eval mode, with its
    encoder config and `finetune.json` (config, classes or letters, metric)."""
    from data2vec.interop.common import read_safetensors

    p = Path(path)
    if (p / "best").is_dir():
        p = p / "best"
    if not (p / "finetune.json").is_file():
        raise FileNotFoundError(f"{path}: not a fine-tuned model (no finetune.json)")
    rcfg = RunConfig.load(p / "config.json")
    meta = json.loads((p / "finetune.json").read_text())
    cfg = FinetuneConfig.from_dict(meta["config"])
    model = FinetuneModel(Data2Vec.from_config(rcfg), cfg.task, int(meta["num_outputs"]), cfg.head_norm)
    model.load_state_dict(read_safetensors(p / "model.safetensors"), strict=True)
    return model.eval(), rcfg, meta


def build_finetune_model(
    rcfg: RunConfig, weights: dict[str, Tensor] | None, cfg: FinetuneConfig, num_outputs: int
) -> tuple[FinetuneModel, RunConfig]:
    """The backbone (drop-path / layerdrop from `cfg`) with `weights` loaded, plus the head;
    for audio, the fine-tuning masks of `cfg` set and the CNN frozen if `cfg.freeze_cnn`."""
    enc = replace(rcfg.model.encoder, drop_path=cfg.drop_path, layerdrop=cfg.layerdrop)
    rcfg = replace(rcfg, model=replace(rcfg.model, encoder=enc))
    torch.manual_seed(cfg.seed)
    backbone = Data2Vec.from_config(rcfg)
    if weights is not None:  # the front-end and encoder; the pretraining head is not used here
        load_student_weights(backbone, weights, "the pretrained weights", skip=("head.", "teacher."))
    model = FinetuneModel(backbone, cfg.task, num_outputs, cfg.head_norm)
    if cfg.modality == "audio":
        model.mask_prob, model.mask_length = cfg.mask_prob, cfg.mask_length
        model.mask_channel_prob, model.mask_channel_length = cfg.mask_channel_prob, cfg.mask_channel_length
        cnn = getattr(model.frontend.local, "cnn", None)
        if cfg.freeze_cnn and cnn is not None:
            cnn.requires_grad_(False)
    return model, rcfg
