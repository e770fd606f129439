"""Speech for `vs_ssl.py`: FSDD digits plus synthetic many-voice speech, wav2vec 2.0 with
transformers' `Wav2Vec2ForPreTraining` as the peer.

Pretraining audio (no labels), prepared once under the work folder: the FSDD recordings of the
four training speakers and `--synthetic` eSpeak NG sentences read by many voices at FSDD's 8 kHz
(`speech.py`'s synthesiser), one manifest every arm reads through this library's audio loader,
so every arm sees the same crops and batches (the tiny preset's 3 s crops, 24 s per batch).

wav2vec 2.0 as published (Baevski et al., 2020), scaled to the tiny encoder: the tiny preset's
CNN front-end (channels, kernels, strides; no bias, layer-norm mode), width, depth, heads and
feed-forward size, post-norm blocks, no dropout (as the tiny preset); the published positional
convolution (kernel 128, 16 groups). Span masking with probability 0.65 and span 10 on the CNN
frames; a Gumbel product quantiser of 2 groups x `--w2v-codevectors` entries (80 by default:
320, the published size, stayed at chance in a 3-minute trial) with 64-d codevectors projected
to 64-d; contrastive loss against 100 negatives from the same utterance's masked frames (fewer
when a batch's shortest crop has too few masked frames to draw from) at temperature 0.1, plus 0.1
x the diversity loss, normalised by the masked-frame count. Gumbel temperature from 2 to 0.5,
decaying by 0.999995 per update over 400k updates as published, compressed onto the run's steps.
AdamW betas (0.9, 0.98), eps 1e-6, weight decay 0.01 off biases and norms, peak lr `--w2v-lr`
(1e-3), 8% linear warm-up then linear decay to zero. Masks and negatives are drawn with
transformers' own `_compute_mask_indices` and `_sample_negative_indices`.

The probe: the 2,000 clips of FSDD's four training speakers (jackson, nicolas, theo, yweweler);
test, all 1,000 clips of speakers george and lucas, held out of pretraining and probe training.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from speech import HELD_OUT, synthetic_speech
from ssl_arms import autocast, calibrated_run, decay_groups, linear_lr, ours_config, save_as_ours

from data2vec.config import RunConfig
from data2vec.data.audio import load_audio, normalize_waveform
from data2vec.data.batch import PretrainBatch
from data2vec.data.pipeline import build_pretrain_loader
from data2vec.finetune import FinetuneConfig, LabelledSet, finetune_preset
from data2vec.interop import InteropError
from data2vec.interop.hf import hf_import

PRESET = "audio-tiny"
PEER = "wav2vec2"
PEER_NAME = "wav2vec 2.0 (transformers)"
UNIT = "clips"
FSDD = common.DATA / "fsdd" / "recordings"
MANIFEST = "pretrain.tsv"

MASK_PROB, MASK_LENGTH, NEGATIVES = 0.65, 10, 100
GUMBEL = (2.0, 0.5, 0.999995, 400_000)  # start, floor, decay per update, the published update count


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--synthetic", type=int, default=2500, help="eSpeak NG sentences added to the pretraining audio (0: FSDD only)"
    )
    p.add_argument("--w2v-lr", type=float, default=1e-3, help="wav2vec 2.0 peak learning rate")
    p.add_argument("--w2v-codevectors", type=int, default=80, help="wav2vec 2.0 codevectors per quantiser group")


def fsdd_files(train: bool) -> list[Path]:
    files = sorted(FSDD.glob("*.wav"))
    return [f for f in files if (f.stem.split("_")[1] in HELD_OUT) != train]


def prepare(work: Path, args: argparse.Namespace) -> None:
    """The pretraining manifest (FSDD training speakers + synthetic speech), once per work folder
    and `--synthetic` count (a different count rewrites it)."""
    manifest, made_for = work / MANIFEST, work / f"{MANIFEST}.synthetic"
    if manifest.is_file() and made_for.is_file() and made_for.read_text() == str(args.synthetic):
        return
    clips = fsdd_files(train=True) + synthetic_speech(args.synthetic, work)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text("".join(f"{f}\n" for f in clips))
    tmp.replace(manifest)
    made_for.write_text(str(args.synthetic))
    print(f"vs_ssl audio: {len(clips)} pretraining clips listed in {manifest}", flush=True)


def ours_overrides(work: Path) -> list[str]:
    return [f"data.path={work / MANIFEST}"]


def w2v_config(cfg: RunConfig, codevectors: int = 80) -> Any:
    from transformers import Wav2Vec2Config

    e, a = cfg.model.encoder, cfg.model.audio
    return Wav2Vec2Config(
        hidden_size=e.dim,
        num_hidden_layers=e.depth,
        num_attention_heads=e.num_heads,
        intermediate_size=int(e.dim * e.mlp_ratio),
        hidden_act="gelu",
        layer_norm_eps=e.norm_eps,
        do_stable_layer_norm=False,  # post-norm blocks, as the tiny preset's
        feat_extract_norm="layer",
        feat_extract_activation="gelu",
        conv_dim=[c for c, _, _ in a.conv_layers],
        conv_kernel=[k for _, k, _ in a.conv_layers],
        conv_stride=[s for _, _, s in a.conv_layers],
        conv_bias=a.conv_bias,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
        feat_quantizer_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=MASK_PROB,  # also makes the model hold its learned mask embedding
        mask_time_length=MASK_LENGTH,
        mask_time_min_masks=2,
        num_codevector_groups=2,
        num_codevectors_per_group=codevectors,
        codevector_dim=64,
        proj_codevector_dim=64,
        num_negatives=NEGATIVES,
        contrastive_logits_temperature=0.1,
        diversity_loss_weight=0.1,
    )


def gumbel_temperature(step: int, total: int) -> float:
    start, floor, decay, published = GUMBEL
    return max(floor, start * decay ** (step * published / max(1, total)))


def run_peer(budget_s: float, points: int, work: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import Wav2Vec2ForPreTraining
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    cfg = ours_config(PRESET, 2, [*ours_overrides(work), f"train.seed={seed}"])
    wcfg = w2v_config(cfg, args.w2v_codevectors)
    peak = args.w2v_lr
    negatives_used: list[int] = []

    def build() -> tuple[Any, torch.optim.Optimizer, Iterator[PretrainBatch]]:
        torch.manual_seed(seed)
        np.random.seed(seed)  # transformers draws masks and negatives with numpy's global generator
        model = Wav2Vec2ForPreTraining(wcfg).train()
        opt = torch.optim.AdamW(decay_groups(model, 0.01), lr=peak, betas=(0.9, 0.98), eps=1e-6)
        batches, _ = build_pretrain_loader(cfg, 0)  # the loader our arms read, from its first batch
        return model, opt, batches

    def step(state: tuple[Any, torch.optim.Optimizer, Iterator[PretrainBatch]], k: int, total: int) -> float:
        model, opt, batches = state
        for g in opt.param_groups:
            g["lr"] = linear_lr(k, total, peak, max(1, round(total * 0.08)))
        model.set_gumbel_temperature(gumbel_temperature(k, total))
        x = next(batches).inputs
        frames = int(model._get_feat_extract_output_lengths(x.shape[1]))
        mask = _compute_mask_indices((x.shape[0], frames), MASK_PROB, MASK_LENGTH, min_masks=2)
        n_neg = max(1, min(NEGATIVES, int(mask.sum(1).min()) - 1))
        negatives_used.append(n_neg)
        neg = _sample_negative_indices((x.shape[0], frames), n_neg, mask_time_indices=mask)
        mask_t = torch.from_numpy(mask)
        with autocast():
            out = model(x, mask_time_indices=mask_t, sampled_negative_indices=torch.from_numpy(neg).long())
        loss = out.loss / mask_t.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.item())

    def save(state: tuple[Any, torch.optim.Optimizer, Iterator[PretrainBatch]], path: Path) -> None:
        torch.save(state[0].wav2vec2.state_dict(), path)

    result = calibrated_run(PEER, build, step, save, budget_s, points, work)
    used = negatives_used[-result["steps"] :]
    a = cfg.data.audio
    result["recipe"] = (
        f"batches of our loader ({a.batch_seconds:g} s, crops {a.max_sample_size / a.sample_rate:g} s), "
        f"lr {peak:g}, {result['steps']} steps ({result['per_step']:.3f} s/step calibrated); "
        f"quantiser 2 x {wcfg.num_codevectors_per_group}, mask {MASK_PROB} x {MASK_LENGTH}, "
        f"negatives {min(used)}-{max(used)} (median {int(np.median(used))})"
    )
    return result


def peer_features(path: str, data: LabelledSet, batch_size: int = 32) -> np.ndarray:
    """Mean-pooled last hidden state of the frozen `Wav2Vec2Model` over each clip's own frames.
    Clips are batched by length, zero-padded with an attention mask: a frame inside a clip's
    length never sees the padding (the CNN's frames lie within the input, padded frames are zeroed
    before the positional convolution and masked in attention), so each clip gets its own features."""
    from transformers import Wav2Vec2Model

    cfg = ours_config(PRESET, 2, [])
    model = Wav2Vec2Model(w2v_config(cfg)).eval()  # the encoder only: the quantiser's size does not matter
    model.load_state_dict(torch.load(path, weights_only=True))
    wavs = [np.asarray(data.load(i), dtype=np.float32) for i in range(len(data))]
    order = np.argsort([len(w) for w in wavs], kind="stable")
    out = np.zeros((len(wavs), cfg.model.encoder.dim), dtype=np.float32)
    with torch.inference_mode():
        for a in range(0, len(order), batch_size):
            idx = order[a : a + batch_size]
            lengths = torch.tensor([len(wavs[i]) for i in idx])
            x = torch.zeros(len(idx), int(lengths.max()))
            for j, i in enumerate(idx):
                x[j, : len(wavs[i])] = torch.from_numpy(wavs[i])
            attn = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
            h = model(x, attention_mask=attn).last_hidden_state
            frames = model._get_feat_extract_output_lengths(lengths)
            valid = (torch.arange(h.shape[1])[None] < frames[:, None]).to(h.dtype)
            out[idx] = ((h * valid[..., None]).sum(1) / frames[:, None].to(h.dtype)).float().numpy()
    return out


@functools.cache
def _fsdd(train: bool) -> LabelledSet:
    files = fsdd_files(train)
    wavs = [normalize_waveform(load_audio(f, 16_000)) for f in files]
    name = "fsdd training speakers" if train else "fsdd george+lucas"
    return LabelledSet(lambda i: wavs[i], [int(f.stem.split("_")[0]) for f in files], [str(d) for d in range(10)], name)


def _subset(data: LabelledSet, n: int, name: str) -> LabelledSet:
    """A fixed random `n` of `data` (all of it when n is 0 or covers it), in the original order."""
    if not n or n >= len(data):
        return data
    idx = np.sort(np.random.default_rng(0).permutation(len(data))[:n]).tolist()
    load = data.load
    return LabelledSet(lambda i: load(idx[i]), [data.targets[i] for i in idx], data.classes, name)


def probe_sets(args: argparse.Namespace) -> tuple[LabelledSet, LabelledSet, LabelledSet]:
    """(FSDD's training speakers or `--labels` of them, speakers george and lucas or `--test-limit` of
    them, a fixed subset of `--curve-test` of those for the curve's inner points)."""
    train_set = _subset(_fsdd(True), args.labels, f"fsdd training speakers ({args.labels} labelled)")
    full = _subset(_fsdd(False), args.test_limit, "fsdd george+lucas")
    n_sub = min(args.curve_test, len(full))
    return train_set, full, _subset(full, n_sub, f"fsdd george+lucas ({n_sub})")


# ---------------------------------------------------------------------- fine-tuning


def finetune_sets(args: argparse.Namespace) -> tuple[LabelledSet, LabelledSet]:
    """benchmarks/speech.py's fine-tuning sets: FSDD's four training speakers (or `--labels` of
    their clips), scored on all of george's and lucas's clips (or `--test-limit` of them)."""
    train, full, _ = probe_sets(argparse.Namespace(**{**vars(args), "curve_test": 1}))
    return train, full


def finetune_config(epochs: int) -> FinetuneConfig:
    """The recipe BENCHMARKS.md's FSDD runs of benchmarks/speech.py settled on, the same for every
    arm: the audio_cls preset (mean-pooled head, CNN frozen) with a BatchNorm head, layer decay
    0.5, lr 1e-3, batch 32, bf16 (`speech.py --lr 1e-3 --ft head_norm=batch --ft layer_decay=0.5`;
    4 epochs there)."""
    return finetune_preset(
        "audio_cls",
        epochs=epochs,
        lr=1e-3,
        batch_size=32,
        log_every=10,
        precision="bf16",
        head_norm="batch",
        layer_decay=0.5,
    )


def w2v_to_ours(model: Any, out_dir: Path) -> Path:
    """A `Wav2Vec2Model` (post-norm, layer-norm CNN) as our pretrained-model folder.

    transformers' data2vec-audio model is wav2vec 2.0's architecture with the same weight names
    except the positional convolution: data2vec stacks convolutions each followed by a LayerNorm,
    wav2vec 2.0 has one weight-normalised convolution (kernel 128). So the encoder goes through
    this library's transformers importer as a data2vec-audio checkpoint with one positional layer
    of wav2vec 2.0's kernel, the weight norm folded into the plain weight it computes, and the
    result is built with `audio.pos_conv_norm=false` (no LayerNorm after that layer).
    tests/test_vs_ssl_convert.py checks it frame for frame against `Wav2Vec2Model`."""
    wcfg = model.config
    if wcfg.do_stable_layer_norm or wcfg.feat_extract_norm != "layer":
        raise InteropError("w2v_to_ours: only post-norm wav2vec 2.0 with a layer-norm CNN maps onto our model")
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.pos_conv_embed.")}
    pos = model.encoder.pos_conv_embed.conv
    sd["encoder.pos_conv_embed.layers.0.conv.weight"] = pos.weight.detach()  # g * v / |v|, computed
    sd["encoder.pos_conv_embed.layers.0.conv.bias"] = pos.bias.detach()
    hf = {
        **json.loads(wcfg.to_json_string()),  # config.json's form (string label keys)
        "model_type": "data2vec-audio",
        "architectures": ["Data2VecAudioModel"],
        "num_conv_pos_embeddings": 1,  # data2vec's layer count; wav2vec 2.0's kernel goes to conv_pos_kernel_size
        "conv_pos_kernel_size": wcfg.num_conv_pos_embeddings,
    }
    imp = hf_import(hf, sd, "a wav2vec 2.0 encoder")
    m = imp.config.model
    cfg = replace(imp.config, model=replace(m, audio=replace(m.audio, pos_conv_norm=False)))
    return save_as_ours(cfg, imp.state_dict, out_dir, "a wav2vec 2.0 encoder")


def peer_to_ours(path: str, out_dir: Path) -> Path:
    """The peer snapshot at `path` (run_peer's) as our pretrained-model folder (vs_ssl_finetune.py)."""
    from transformers import Wav2Vec2Model

    model = Wav2Vec2Model(w2v_config(ours_config(PRESET, 2, []))).eval()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return w2v_to_ours(model, out_dir)
