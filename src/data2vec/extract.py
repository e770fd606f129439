"""Feature extraction: per-layer features of a pretrained encoder, with padding removed.

    from data2vec.extract import extract, load_model
    model = load_model("runs/speech")                     # anything data2vec.pretrained reads
    feats = extract(model, [wav1, wav2], layers=[6, 12], pool="none")
    feats[12][0].shape                                    # (frames of wav1, D)

Layers are numbered like transformers' `hidden_states`: 0 is the encoder's input (after the
input LayerNorm, if any), i (1..L) is the output of Transformer block i, counting prenet
blocks first; negative numbers count from the end (-1 = the last block). For pre-LN models
(data2vec 1.0 images) the final LayerNorm is not applied, as in `hidden_states`. Prefix
tokens (CLS) are dropped.

Inputs are grouped into batches by size: sorted by length, then cut so that no batch holds
more than `batch_size` inputs or more than `max_tokens` padded elements (samples for speech,
tokens for text). Padded positions are masked in attention and removed from the output, so
every input gets the features it gets alone (up to float rounding): `pool="none"` returns one
(T_i, D) array per input, `pool="mean"` an (N, D) array averaged over real tokens only.

`extract_path` reads a file or folder with the library's loaders (images resized to the
model's size and normalised with the run's mean/std; speech resampled and normalised per
utterance as in training; text tokenised with the run's tokenizer, one document per line or
per file as `data.text.document` says, with <s> ... </s> around each and cut to the model's
maximum length).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from data2vec.config import ConfigError, RunConfig
from data2vec.data.batch import EvalItem
from data2vec.data.eval_inputs import read_inputs as read_inputs  # re-export: extract.read_inputs
from data2vec.model import Data2Vec
from data2vec.pretrained import load_model as load_model
from data2vec.writes import write_text_atomic, writing

Pool = Literal["mean", "none"]
Features = dict[int, Any]
"""layer -> (N, D) array (pool='mean') or a list of N (T_i, D) arrays (pool='none')."""

DEFAULT_MAX_TOKENS = {"audio": 16_000 * 120, "text": 16_384, "image": 0}
"""Padded elements per batch by default: 120 s of 16 kHz speech, 16k text tokens (images: no cap)."""


# ============================================================================ the forward pass


def num_layers(model: Data2Vec) -> int:
    """Transformer blocks, prenet included."""
    return len(model.encoder.prenet) + len(model.encoder.blocks)


def resolve_layers(model: Data2Vec, layers: Sequence[int] | None) -> list[int]:
    """Layer numbers in 0..L (negative count from the end); the last block by default."""
    total = num_layers(model)
    if not layers:
        return [total]
    out: list[int] = []
    for layer in layers:
        n = total + 1 + layer if layer < 0 else layer
        if not 0 <= n <= total:
            raise ConfigError(
                f"layers: {layer} is not a layer: this model has layers 0 (encoder input) to {total} (last block), "
                f"or -1 to -{total + 1}"
            )
        if n not in out:
            out.append(n)
    return out


def _blocks(model: Data2Vec) -> list[nn.Module]:
    return [*model.encoder.prenet, *model.encoder.blocks]


@torch.no_grad()
def layer_features(
    model: Data2Vec, inputs: Tensor, padding_mask: Tensor | None, layers: Sequence[int]
) -> tuple[dict[int, Tensor], Tensor]:
    """One padded batch -> ({layer: (B, T, D) token features, prefix removed}, (B,) valid token counts).

    `padding_mask` is input-level (B, L), True = padding (speech); text marks padding with <pad>."""
    blocks = _blocks(model)
    captured: dict[int, Tensor] = {}
    handles = []

    def grab(n: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[n] = output.x

        return hook

    def grab_input(module: nn.Module, args: Any) -> None:
        captured[0] = args[0]

    try:
        for n in layers:
            if n == 0:
                handles.append(blocks[0].register_forward_pre_hook(grab_input))
            else:
                handles.append(blocks[n - 1].register_forward_hook(grab(n)))
        tokens = model.frontend.local(inputs, padding_mask)
        enc_in = model.frontend.context(tokens, clean=True)
        if 0 in layers and not blocks:
            raise ValueError("the model has no Transformer blocks")
        model.encoder(enc_in.x, enc_in.padding_mask, enc_in.positions)
    finally:
        for h in handles:
            h.remove()
    B, T = tokens.x.shape[:2]
    pad = tokens.padding_mask
    valid = torch.full((B,), T, dtype=torch.long) if pad is None else (~pad).sum(1).cpu()
    P = model.frontend.num_prefix
    return {n: captured[n][:, P:] for n in layers}, valid


# ============================================================================ batching


Item = EvalItem
"""The old name of `data2vec.data.batch.EvalItem` (kept for callers of `extract.Item`)."""


def plan_batches(lengths: Sequence[int], batch_size: int, max_tokens: int = 0) -> list[list[int]]:
    """Indices grouped into batches: longest first, at most `batch_size` per batch and at most
    `max_tokens` padded elements (count x longest) when `max_tokens` > 0; an input longer than
    `max_tokens` gets a batch of its own."""
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        too_many = len(current) + 1 > batch_size
        too_big = max_tokens > 0 and (len(current) + 1) * longest > max_tokens
        if current and (too_many or too_big):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(model: Data2Vec, samples: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Stack one modality's samples into a padded batch (+ speech's input padding mask)."""
    modality = model.cfg.modality
    if modality == "image":
        return torch.stack(samples), None
    lengths = [int(s.shape[0]) for s in samples]
    T = max(lengths)
    if modality == "text":
        ids = torch.full((len(samples), T), model.cfg.text.pad_id, dtype=torch.long)
        for i, s in enumerate(samples):
            ids[i, : len(s)] = s
        return ids, None
    wav = torch.zeros(len(samples), T)
    pad = torch.ones(len(samples), T, dtype=torch.bool)
    for i, s in enumerate(samples):
        wav[i, : len(s)] = s
        pad[i, : len(s)] = False
    return wav, pad if bool(pad.any()) else None


def _check_sample(model: Data2Vec, x: Tensor, name: str) -> None:
    modality = model.cfg.modality
    if modality == "image" and x.ndim != 3:
        raise ValueError(f"{name}: expected an image tensor (C, H, W), got shape {tuple(x.shape)}")
    if modality == "audio" and (x.ndim != 1 or not x.is_floating_point()):
        raise ValueError(f"{name}: expected a waveform (samples,), got {tuple(x.shape)} {x.dtype}")
    if modality == "text" and (x.ndim != 1 or x.is_floating_point()):
        raise ValueError(f"{name}: expected token ids (tokens,), got {tuple(x.shape)} {x.dtype}")


def extract_items(
    model: Data2Vec,
    items: Sequence[EvalItem],
    layers: Sequence[int] | None = None,
    pool: Pool = "mean",
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = False,
    precision: Literal["fp32", "bf16"] = "fp32",
) -> Features:
    """`extract` for lazily loaded inputs (see `EvalItem`)."""
    if pool not in ("mean", "none"):
        raise ConfigError(f"pool: must be 'mean' or 'none', got {pool!r}")
    wanted = resolve_layers(model, layers)
    cap = DEFAULT_MAX_TOKENS[model.cfg.modality] if max_tokens is None else max_tokens
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_layer: dict[int, list[Any]] = {n: [None] * len(items) for n in wanted}
    bar = tqdm(total=len(items), disable=not progress, unit="input", dynamic_ncols=True)
    try:
        for batch in plan_batches([it.length for it in items], batch_size, cap):
            samples = []
            for i in batch:
                x = items[i].load()
                _check_sample(model, x, items[i].name)
                samples.append(x)
            x, pad = collate(model, samples)
            x = x.to(device)
            pad = None if pad is None else pad.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                feats, valid = layer_features(model, x, pad, wanted)
            for n, h in feats.items():
                h = h.float().cpu()
                for row, i in enumerate(batch):
                    tok = h[row, : int(valid[row])]
                    per_layer[n][i] = tok.mean(0).numpy() if pool == "mean" else tok.numpy().copy()
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    if pool == "mean":
        D = model.cfg.encoder.dim
        return {n: np.stack(v) if v else np.zeros((0, D), np.float32) for n, v in per_layer.items()}
    return dict(per_layer)


def extract(
    model: Data2Vec,
    inputs: Sequence[Tensor],
    layers: Sequence[int] | None = None,
    pool: Pool = "mean",
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = False,
    precision: Literal["fp32", "bf16"] = "fp32",
) -> Features:
    """Per-layer features of `inputs`, one tensor per input: images (C, H, W) at the model's size,
    waveforms (samples,), or token ids (tokens,) with <s>/</s> included.

    Returns {layer: (N, D) array} for pool='mean' (average over real tokens), or {layer: list of
    N (T_i, D) arrays} for pool='none'; padding is removed and the order is the input order.
    `max_tokens` caps padded elements per batch (None: the modality's default, 0: no cap)."""
    items = [
        EvalItem(f"input {i}", 1 if x.ndim == 3 else int(x.shape[0]), partial(_same, x)) for i, x in enumerate(inputs)
    ]
    return extract_items(model, items, layers, pool, batch_size, max_tokens, progress, precision)


# ============================================================================ reading inputs


def _same(x: Tensor) -> Tensor:
    return x


def extract_path(
    model: Data2Vec,
    cfg: RunConfig,
    path: str | Path,
    layers: Sequence[int] | None = None,
    pool: Pool = "mean",
    tokenizer: str | Path | None = None,
    **kwargs: Any,
) -> tuple[list[str], Features]:
    """Read the inputs under `path` and extract their features: (input names in order, features)."""
    items = read_inputs(cfg, path, tokenizer)
    return [it.name for it in items], extract_items(model, items, layers, pool, **kwargs)


# ============================================================================ writing results


def sidecar_path(out: Path) -> Path:
    """features.npy -> features.files.txt"""
    return out.with_name(f"{out.stem}.files.txt")


def write_features(out: str | Path, names: Sequence[str], feats: Features, pool: Pool) -> list[Path]:
    """Save features by the suffix of `out`:

    - .npy, pool='mean': one (layers, N, D) array (layers in the order given);
    - .npy, pool='none': an .npz beside it (same stem) with one array per input and layer,
      named `layer{L}_{index:06d}`;
    - .npz: pool='mean' -> one (N, D) array per layer named `layer{L}`; 'none' as above;
    - .parquet (needs pyarrow): one row per input, a column `input` and one column `layer{L}`
      per layer (a list of D floats, or T lists of D floats for pool='none').

    A `<stem>.files.txt` beside it lists the inputs in order. Returns the files written."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".npy", ".npz", ".parquet"):
        raise ValueError(f"{out}: the output must end in .npy, .npz or .parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    layers = list(feats)
    written: list[Path] = []
    if suffix == ".parquet":
        with writing(out, "features"):
            written.append(_write_parquet(out, names, feats, pool))
    elif suffix == ".npy" and pool == "mean":
        with writing(out, "features"):
            np.save(out, np.stack([feats[n] for n in layers]).astype(np.float32))
        written.append(out)
    else:
        target = out.with_suffix(".npz")
        arrays: dict[str, np.ndarray] = {}
        for n in layers:
            if pool == "mean":
                arrays[f"layer{n}"] = np.asarray(feats[n], dtype=np.float32)
            else:
                for i, a in enumerate(feats[n]):
                    arrays[f"layer{n}_{i:06d}"] = np.asarray(a, dtype=np.float32)
        with writing(target, "features"):
            np.savez(target, **arrays)  # type: ignore[arg-type]
        written.append(target)
    side = sidecar_path(written[0])
    write_text_atomic(side, "".join(f"{name}\n" for name in names), "the file names")
    written.append(side)
    return written


def _write_parquet(out: Path, names: Sequence[str], feats: Features, pool: Pool) -> Path:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"{out}: writing .parquet needs pyarrow (pip install pyarrow), which is not installed; "
            "use .npy or .npz instead"
        ) from None
    columns: dict[str, Any] = {"input": pa.array(list(names), pa.string())}
    for n, value in feats.items():
        if pool == "mean":
            arr = np.ascontiguousarray(value, dtype=np.float32)
            columns[f"layer{n}"] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
        else:
            mats = [np.ascontiguousarray(a, dtype=np.float32) for a in value]
            D = mats[0].shape[1] if mats else 0
            flat = np.concatenate([m.reshape(-1) for m in mats]) if mats else np.zeros(0, np.float32)
            rows = pa.FixedSizeListArray.from_arrays(pa.array(flat), D)
            offsets = np.concatenate([[0], np.cumsum([m.shape[0] for m in mats])]).astype(np.int32)
            columns[f"layer{n}"] = pa.ListArray.from_arrays(pa.array(offsets), rows)
    pq.write_table(pa.table(columns), out)
    return out


def describe(names: Sequence[str], feats: Features, pool: Pool) -> str:
    layers = list(feats)
    if pool == "mean":
        n, d = next(iter(feats.values())).shape if feats else (0, 0)
        return f"{len(layers)} layer(s) {layers} x {n} input(s) x {d} dims (mean over tokens)"
    tokens = sum(int(a.shape[0]) for a in next(iter(feats.values()))) if feats else 0
    return f"{len(layers)} layer(s) {layers} x {len(names)} input(s), {tokens} tokens in all (per token)"
