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
per file as `data.text.document` says, with <s> ... </s> around each).

Long inputs run in overlapping windows (`window`, `overlap`): a clip longer than the window
(default 30 s) is cut into windows starting every `window - overlap` samples (default overlap:
a sixth of the window, 5 s), the last one ending at the clip's end. Consecutive windows hand
over in the middle of their overlap, each frame coming from one window, so the output has one
row per frame, as an unchunked run would. Text longer than the model's positions runs in
windows of <s> + (max_positions - 2) tokens + </s> overlapping by a quarter of the window,
stitched the same way: one row per token plus <s> and </s>. The windows of an input are
batched like short inputs (`batch_size`, `max_tokens`), so memory is that of one batch of
windows, whatever the input's length. `window=0` turns this off (a clip runs whole; a document
is cut to the model's positions, as before windows existed).

Input names are written beside the features (`<stem>.files.txt`, one line per row) and read back
exactly by `read_names` (see `name_line` for the escaping of unusual names).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from data2vec.config import ConfigError, RunConfig
from data2vec.data.batch import EvalItem
from data2vec.data.eval_inputs import check_exists
from data2vec.data.eval_inputs import read_inputs as read_inputs  # re-export: extract.read_inputs
from data2vec.data.labelled import load_text_tokenizer
from data2vec.data.text import list_text_files, read_documents
from data2vec.modalities.audio import conv_output_length
from data2vec.model import Data2Vec
from data2vec.pretrained import load_model as load_model
from data2vec.tokenizer import TextTokenizer
from data2vec.writes import writing

Pool = Literal["mean", "none"]
Features = dict[int, Any]
"""layer -> (N, D) array (pool='mean') or a list of N (T_i, D) arrays (pool='none')."""

DEFAULT_MAX_TOKENS = {"audio": 16_000 * 120, "text": 16_384, "image": 0}
"""Padded elements per batch by default: 120 s of 16 kHz speech, 16k text tokens (images: no cap)."""

DEFAULT_WINDOW_SECONDS = 30.0
"""Speech windows: 30 s (`window` is in samples: 30 s x the sample rate, 480,000 at 16 kHz)."""
AUDIO_OVERLAP_FRACTION = 6
"""Default overlap of speech windows: a sixth of the window (5 s of 30 s)."""
TEXT_OVERLAP_FRACTION = 4
"""Default overlap of text windows: a quarter of the window (128 tokens of 512 positions)."""
TEXT_PIECE_CHARS = 1 << 16
"""Documents longer than this many characters are tokenised this many at a time (`encode_long`)."""


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


class Window(NamedTuple):
    """One window of a long input: its slice of the input and the rows of its output that are kept."""

    start: int
    """First sample (speech) or text token (text, not counting <s>) of the window."""
    end: int
    offset: int
    """Global output row of the window's local row 0."""
    keep: tuple[int, int]
    """Local rows [a, b) of the window's output that go into the stitched output."""


def _receptive_field(conv_layers: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
    """(samples one frame sees, samples between frames) of a speech CNN."""
    field, stride = 1, 1
    for _, k, s in conv_layers:
        field += (k - 1) * stride
        stride *= s
    return field, stride


def window_settings(model: Data2Vec, window: int | None, overlap: int | None) -> tuple[int, int]:
    """(window, overlap) in input units (speech samples; text positions / tokens), defaults filled
    in and checked; (0, 0) when inputs run whole (images, or `window=0`)."""
    cfg = model.cfg
    if cfg.modality == "image" or window == 0:
        return 0, 0
    if cfg.modality == "audio":
        field, stride = _receptive_field(cfg.audio.conv_layers)
        size = round(16_000 * DEFAULT_WINDOW_SECONDS) if window is None else window
        over = max(size // AUDIO_OVERLAP_FRACTION, field - stride) if overlap is None else overlap
        if size < field:
            raise ConfigError(f"window: {size} samples is too short: one frame of this model needs {field} samples")
        if not 0 <= over < size:
            raise ConfigError(
                f"overlap: {over} samples: must be smaller than the window ({size} samples), and not negative"
            )
        if over < field - stride:
            raise ConfigError(
                f"overlap: {over} samples is too short: windows must overlap by at least {field - stride} samples "
                "so that every frame is computed whole"
            )
        if size - over < stride:
            raise ConfigError(
                f"overlap: {over} samples leaves less than one frame ({stride} samples) between windows of {size}"
            )
        return size, over
    positions = cfg.text.max_positions
    size = positions if window is None else window
    over = size // TEXT_OVERLAP_FRACTION if overlap is None else overlap
    if not 3 <= size <= positions:
        raise ConfigError(f"window: {size} tokens: must be between 3 and the model's {positions} positions")
    if not 0 <= over < size - 2:
        raise ConfigError(
            f"overlap: {over} tokens: must be smaller than the window's {size - 2} tokens "
            f"({size} positions with <s> and </s>), and not negative"
        )
    return size, over


def _window_starts(length: int, size: int, hop: int, align: int) -> list[int]:
    """Starts of windows of `size` covering [0, length): every `hop`; the last one is moved back
    to end at `length` (its start rounded up to a multiple of `align`)."""
    starts = [0]
    while starts[-1] + size < length:
        nxt = starts[-1] + hop
        if nxt + size >= length:
            nxt = min(nxt, -(-(length - size) // align) * align)
        starts.append(nxt)
    return starts


def _stitch(spans: list[tuple[int, int, int, int, int]]) -> list[Window]:
    """(start, end, offset, first row, end row) per window, in global output rows -> Windows whose
    kept rows tile the output: consecutive windows meet in the middle of their overlap."""
    out: list[Window] = []
    lo = spans[0][3]
    for k, (start, end, offset, _, g1) in enumerate(spans):
        if k + 1 < len(spans):
            g0_next = spans[k + 1][3]
            if g0_next > g1:
                raise AssertionError(f"windows leave rows {g1}..{g0_next} uncovered")  # window_settings prevents it
            hi = (g0_next + g1) // 2
        else:
            hi = g1
        out.append(Window(start, end, offset, (lo - offset, hi - offset)))
        lo = hi
    return out


def plan_windows(model: Data2Vec, length: int, window: int, overlap: int) -> list[Window]:
    """The windows of one input of `length` (samples; text: tokens with <s> and </s>) under
    `window_settings`; a single window when it fits in one."""
    cfg = model.cfg
    if cfg.modality == "audio":
        _, stride = _receptive_field(cfg.audio.conv_layers)
        hop = (window - overlap) // stride * stride
        spans = []
        for s in _window_starts(length, window, hop, stride):
            e = min(s + window, length)
            spans.append(
                (s, e, s // stride, s // stride, s // stride + conv_output_length(e - s, cfg.audio.conv_layers))
            )
        return _stitch(spans)
    n = length - 2
    size = window - 2
    starts = _window_starts(n, size, size - overlap, 1)
    spans = []
    for k, s in enumerate(starts):
        e = min(s + size, n)
        last = k == len(starts) - 1
        spans.append((s, e, s, s + (k > 0), e + (2 if last else 1)))
    return _stitch(spans)


def _window_input(model: Data2Vec, x: Tensor, w: Window) -> Tensor:
    if model.cfg.modality == "audio":
        return x[w.start : w.end]
    return torch.cat([x[:1], x[1 + w.start : 1 + w.end], x[-1:]])


def _forward(
    model: Data2Vec, samples: list[Tensor], wanted: list[int], device: torch.device, precision: str
) -> tuple[dict[int, Tensor], Tensor]:
    x, pad = collate(model, samples)
    x = x.to(device)
    pad = None if pad is None else pad.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        feats, valid = layer_features(model, x, pad, wanted)
    return {n: h.float().cpu() for n, h in feats.items()}, valid


def _windowed(
    model: Data2Vec,
    x: Tensor,
    wanted: list[int],
    pool: Pool,
    windows: list[Window],
    batch_size: int,
    cap: int,
    device: torch.device,
    precision: str,
) -> dict[int, np.ndarray]:
    """One long input's features: its windows run in batches, their kept rows stitched in order
    (pool='none') or summed into the mean (pool='mean'), so only one batch of windows is held."""
    pieces = [_window_input(model, x, w) for w in windows]
    parts: dict[int, list[Tensor | None]] = {n: [None] * len(windows) for n in wanted}
    sums = {n: torch.zeros(model.cfg.encoder.dim, dtype=torch.float64) for n in wanted}
    rows = 0
    for batch in plan_batches([int(p.shape[0]) for p in pieces], batch_size, cap):
        feats, valid = _forward(model, [pieces[i] for i in batch], wanted, device, precision)
        for row, i in enumerate(batch):
            a, b = windows[i].keep
            if not 0 <= a <= b <= int(valid[row]):
                raise AssertionError(f"window {i} keeps rows {a}..{b} of {int(valid[row])}")
            rows += b - a
            for n, h in feats.items():
                tok = h[row, a:b]
                if pool == "mean":
                    sums[n] += tok.double().sum(0)
                else:
                    parts[n][i] = tok.clone()
    if pool == "mean":
        return {n: (sums[n] / max(rows, 1)).float().numpy() for n in wanted}
    return {n: torch.cat([p for p in parts[n] if p is not None]).numpy() for n in wanted}


def extract_items(
    model: Data2Vec,
    items: Sequence[EvalItem],
    layers: Sequence[int] | None = None,
    pool: Pool = "mean",
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = False,
    precision: Literal["fp32", "bf16"] = "fp32",
    window: int | None = None,
    overlap: int | None = None,
) -> Features:
    """`extract` for lazily loaded inputs (see `EvalItem`)."""
    if pool not in ("mean", "none"):
        raise ConfigError(f"pool: must be 'mean' or 'none', got {pool!r}")
    wanted = resolve_layers(model, layers)
    cap = DEFAULT_MAX_TOKENS[model.cfg.modality] if max_tokens is None else max_tokens
    W, O = window_settings(model, window, overlap)
    text = model.cfg.modality == "text"
    positions = model.cfg.text.max_positions
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_layer: dict[int, list[Any]] = {n: [None] * len(items) for n in wanted}
    cut = 0

    def run_long(i: int, x: Tensor) -> None:
        feats = _windowed(model, x, wanted, pool, plan_windows(model, len(x), W, O), batch_size, cap, device, precision)
        for n, v in feats.items():
            per_layer[n][i] = v
        bar.update(1)

    bar = tqdm(total=len(items), disable=not progress, unit="input", dynamic_ncols=True)
    try:
        short = [i for i, it in enumerate(items) if not W or it.length <= W]
        for i in (i for i, it in enumerate(items) if W and it.length > W):  # longest inputs, one at a time
            x = items[i].load()
            _check_sample(model, x, items[i].name)
            run_long(i, x)
        for batch in plan_batches([items[i].length for i in short], batch_size, cap):
            samples, rows = [], []
            for i in (short[j] for j in batch):
                x = items[i].load()
                _check_sample(model, x, items[i].name)
                if W and x.shape[0] > W:  # longer than its announced length
                    run_long(i, x)
                    continue
                if text and not W and x.shape[0] > positions:  # window=0: cut, as before windows
                    x = torch.cat([x[: positions - 1], x[-1:]])
                    cut += 1
                samples.append(x)
                rows.append(i)
            if not samples:
                continue
            feats, valid = _forward(model, samples, wanted, device, precision)
            for n, h in feats.items():
                for row, i in enumerate(rows):
                    tok = h[row, : int(valid[row])]
                    per_layer[n][i] = tok.mean(0).numpy() if pool == "mean" else tok.numpy().copy()
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    if cut:
        warnings.warn(f"{cut} document(s) longer than the model's {positions} positions were cut", stacklevel=2)
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
    window: int | None = None,
    overlap: int | None = None,
) -> Features:
    """Per-layer features of `inputs`, one tensor per input: images (C, H, W) at the model's size,
    waveforms (samples,), or token ids (tokens,) with <s>/</s> included.

    Returns {layer: (N, D) array} for pool='mean' (average over real tokens), or {layer: list of
    N (T_i, D) arrays} for pool='none'; padding is removed and the order is the input order.
    `max_tokens` caps padded elements per batch (None: the modality's default, 0: no cap).
    Longer inputs run in windows (see the module doc): `window` in samples (speech; default 30 s
    at 16 kHz) or positions (text; default and at most the model's max_positions), `overlap` in
    samples or tokens (default a sixth / a quarter of the window); `window=0` runs inputs whole."""
    items = [
        EvalItem(f"input {i}", 1 if x.ndim == 3 else int(x.shape[0]), partial(_same, x)) for i, x in enumerate(inputs)
    ]
    return extract_items(model, items, layers, pool, batch_size, max_tokens, progress, precision, window, overlap)


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
    """Read the inputs under `path` (`extract_inputs`) and extract their features: (input names
    in order, features); `kwargs` go to `extract_items`."""
    items = extract_inputs(cfg, path, tokenizer)
    return [it.name for it in items], extract_items(model, items, layers, pool, **kwargs)


def _cut_before_space(text: str, lo: int, hi: int) -> int:
    """The last p in (lo, hi] with text[p] a space after a non-space (no token spans it), else hi."""
    p = text.rfind(" ", lo + 1, hi + 1)
    while p > lo and text[p - 1].isspace():
        p = text.rfind(" ", lo + 1, p)
    return p if p > lo else hi


def encode_long(tok: TextTokenizer, text: str, piece: int = TEXT_PIECE_CHARS) -> np.ndarray:
    """Token ids (int32) of `text`, tokenised about `piece` characters at a time so that memory
    stays small for a huge document. Pieces are cut just before a space that follows a
    non-space, where byte-level BPE (GPT-2 / RoBERTa pre-tokenisation) always splits, so the ids
    are those of the whole text; a stretch of `piece` characters without such a space is cut
    where it ends (the tokens at that cut may then differ from the whole text's)."""
    parts: list[np.ndarray] = []
    i, n = 0, len(text)
    while i < n:
        j = n if n - i <= piece else _cut_before_space(text, i, i + piece)
        parts.append(np.asarray(tok.encode(text[i:j]), dtype=np.int32))
        i = j
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _ids_tensor(seq: np.ndarray) -> Tensor:
    return torch.from_numpy(seq).long()


def extract_inputs(cfg: RunConfig, path: str | Path, tokenizer: str | Path | None = None) -> list[EvalItem]:
    """The inputs `extract` reads from a file or folder: `read_inputs`, except that each text
    document is kept whole (<s> + all its tokens + </s>, long documents tokenised in pieces by
    `encode_long`) rather than cut to the model's positions: `extract_items` runs it in windows."""
    if cfg.model.modality != "text":
        return read_inputs(cfg, path, tokenizer)
    p = Path(path)
    check_exists(p)
    tok = load_text_tokenizer(cfg, tokenizer)
    bos, eos = cfg.model.text.bos_id, cfg.model.text.eos_id
    items: list[EvalItem] = []
    for f in list_text_files(p):
        docs = list(read_documents(f, cfg.data.text, column=cfg.data.column))
        single = len(docs) == 1 and cfg.data.text.document == "file"
        short = [k for k, d in enumerate(docs) if len(d) <= TEXT_PIECE_CHARS]
        encoded = dict(zip(short, tok.encode_batch([docs[k] for k in short]), strict=True))
        for k, doc in enumerate(docs):
            ids = np.asarray(encoded.pop(k), np.int32) if k in encoded else encode_long(tok, doc)
            seq = np.concatenate([np.array([bos], np.int32), ids, np.array([eos], np.int32)])
            name = str(f) if single else f"{f}#{k + 1}"
            items.append(EvalItem(name, len(seq), partial(_ids_tensor, seq)))
        del docs
    return items


# ============================================================================ writing results


def sidecar_path(out: str | Path) -> Path:
    """features.npy -> features.files.txt"""
    out = Path(out)
    return out.with_name(f"{out.stem}.files.txt")


_LINE_BREAK = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
"""Every character that `str.splitlines` splits on."""


def name_line(name: str) -> str:
    """How `name` is written in `<stem>.files.txt` (and the Parquet `input` column): as it is,
    unless it is not valid UTF-8 (a file name whose bytes os.fsdecode turned into surrogates),
    holds a line break of any kind, or starts with a double quote; such a name is written as an
    ASCII JSON string (`json.dumps`), bytes that are not UTF-8 as \\udcXX (PEP 383), so that
    `json.loads` gives back the name and `os.fsencode` its exact bytes."""
    if name.startswith('"') or _LINE_BREAK.search(name):
        return json.dumps(name)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(name)
    return name


def _read_line(line: str) -> str:
    if line.startswith('"'):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            return line  # a list written before names were escaped
        if isinstance(value, str):
            return value
    return line


def read_names(path: str | Path) -> list[str]:
    """The input names of extracted features, in row order, exactly as they were: `path` is the
    features file (.npy, .npz, .parquet) or its `<stem>.files.txt`. A name is a str as Python's
    os functions use it (os.fsencode(name) gives a file name's original bytes). Lists written
    before names were escaped read the same, except a name that starts with a double quote and
    is itself a JSON string."""
    p = Path(path)
    side = p if p.name.endswith(".files.txt") else sidecar_path(p)
    try:
        data = side.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{side}: no such file (the list of input names beside {p.name})") from None
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [_read_line(line) for line in lines]


def _rows(feats: Features, pool: Pool) -> int:
    value = next(iter(feats.values()), None)
    if value is None:
        return 0
    return int(np.shape(value)[0]) if pool == "mean" else len(value)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_features(out: str | Path, names: Sequence[str], feats: Features, pool: Pool) -> list[Path]:
    """Save features by the suffix of `out`:

    - .npy, pool='mean': one (layers, N, D) array (layers in the order given);
    - .npy, pool='none': an .npz beside it (same stem) with one array per input and layer,
      named `layer{L}_{index:06d}`;
    - .npz: pool='mean' -> one (N, D) array per layer named `layer{L}`; 'none' as above;
    - .parquet (needs pyarrow): one row per input, a column `input` (`name_line` of the name) and
      one column `layer{L}` per layer (a list of D floats, or T lists of D floats for pool='none').

    A `<stem>.files.txt` beside it lists the inputs in row order, one line each (`name_line`;
    read it back with `read_names`). Both files are written to temporary files first and renamed
    into place together, so a failed write leaves the previous ones as they were. Returns the
    files written."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".npy", ".npz", ".parquet"):
        raise ValueError(f"{out}: the output must end in .npy, .npz or .parquet")
    rows = _rows(feats, pool)
    if len(names) != rows:
        raise ValueError(f"{out}: {len(names)} names for {rows} rows of features")
    lines = [name_line(n) for n in names]
    out.parent.mkdir(parents=True, exist_ok=True)
    layers = list(feats)
    target = out if suffix == ".parquet" or (suffix == ".npy" and pool == "mean") else out.with_suffix(".npz")
    side = sidecar_path(target)
    tmp, tmp_side = _temporary(target), _temporary(side)
    try:
        with writing(target, "features"):
            if suffix == ".parquet":
                _write_parquet(tmp, out, lines, feats, pool)
            elif target.suffix == ".npy":
                with open(tmp, "wb") as f:
                    np.save(f, np.stack([feats[n] for n in layers]).astype(np.float32))
            else:
                arrays: dict[str, np.ndarray] = {}
                for n in layers:
                    if pool == "mean":
                        arrays[f"layer{n}"] = np.asarray(feats[n], dtype=np.float32)
                    else:
                        for i, a in enumerate(feats[n]):
                            arrays[f"layer{n}_{i:06d}"] = np.asarray(a, dtype=np.float32)
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)  # type: ignore[arg-type]
        with writing(side, "the file names"):
            tmp_side.write_bytes("".join(f"{line}\n" for line in lines).encode("utf-8"))
        with writing(target, "features"):
            os.replace(tmp, target)
        with writing(side, "the file names"):
            os.replace(tmp_side, side)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_side.unlink(missing_ok=True)
    return [target, side]


def _write_parquet(tmp: Path, out: Path, lines: Sequence[str], feats: Features, pool: Pool) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"{out}: writing .parquet needs pyarrow (pip install 'data2vec[parquet]'), which is not installed; "
            "use .npy or .npz instead"
        ) from None
    columns: dict[str, Any] = {"input": pa.array(list(lines), pa.string())}
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
    pq.write_table(pa.table(columns), str(tmp))


def describe(names: Sequence[str], feats: Features, pool: Pool) -> str:
    layers = list(feats)
    if pool == "mean":
        n, d = next(iter(feats.values())).shape if feats else (0, 0)
        return f"{len(layers)} layer(s) {layers} x {n} input(s) x {d} dims (mean over tokens)"
    tokens = sum(int(a.shape[0]) for a in next(iter(feats.values()))) if feats else 0
    return f"{len(layers)} layer(s) {layers} x {len(names)} input(s), {tokens} tokens in all (per token)"
