"""Text for `vs_ssl.py`: SST-2 sentences, RoBERTa masked-language modelling with transformers'
`RobertaForMaskedLM` as the peer.

Data: the 67,349 SST-2 training sentences (labels unused), one byte-level BPE tokenizer trained
once on them by this library's text pipeline with the tiny preset's vocabulary size (`prepare`:
`WORK/text/corpus/tokenizer.json` and the packed token stream `tokens.bin`). Every arm uses that
tokenizer; the peer reads the same packed blocks of 128 tokens (<s> first, documents separated by
</s>, RoBERTa's FULL-SENTENCES packing) in the order our sampler draws them for the same seed.

RoBERTa as published (Liu et al., 2019), scaled to the tiny encoder (width, depth, heads, FFN,
128 positions, vocabulary and special ids of our tokenizer): post-LN, dropout and attention dropout
0.1, tied input/output embeddings; dynamic masking by transformers' `DataCollatorForLanguageModeling`
(15% of the non-special tokens, 80% <mask> / 10% random / 10% kept); AdamW betas (0.9, 0.98), eps
1e-6, weight decay 0.01 off biases and norms, no gradient clipping; linear warm-up then linear
decay to zero. Batch: 32 blocks of 128 tokens, our 1.0 tiny arm's (`--roberta-batch`). The loss
is `RobertaForMaskedLM`'s (cross-entropy over the masked tokens), its encoder and LM head called
separately so that the vocabulary projection runs on the masked positions only, as fairseq's
RoBERTa does (the model's forward projects every position: about twice the step time here).

Peak lr and warm-up: RoBERTa-base's 6e-4 with 24k warm-up steps of 500k (4.8%) belongs to batches
of 8k sequences of 512, and the paper gives no rule to carry it to other sizes (it re-tunes lr per
batch size). The closest published scaling is RoBERTa pretrained on corpora of 1M to 100M tokens
(the nyu-mll "miniBERTas", Warstadt et al., 2020): peak lr 5e-4 and 6% warm-up. The SST-2 training
sentences are 0.86M tokens with this tokenizer, so those are the defaults (`--roberta-lr`,
`--roberta-warmup`); 5e-4 is also our tiny text presets' peak lr.

The probe: the first 2,000 labelled SST-2 training sentences (`--labels`); scored on the 872 dev
sentences (or `--curve-test` of them) at the curve's points, and on dev + the 1,821 test sentences
(the GLUE test split, labelled in the copy read here) at the last point. Both are near-balanced:
the majority class is 50.9% of dev and 50.1% of dev + test.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from ssl_arms import autocast, calibrated_run, decay_groups, linear_lr, ours_config, save_as_ours

from data2vec.data.labelled import read_labelled
from data2vec.data.sampling import ResumableBatchSampler
from data2vec.data.text import PackedBlocks, TextPipeline, wrap_document
from data2vec.finetune import FinetuneConfig, LabelledSet, finetune_preset
from data2vec.interop import InteropError
from data2vec.interop.hf import hf_import
from data2vec.tokenizer import TextTokenizer

PRESET = "text-tiny"
PEER = "roberta"
PEER_NAME = "RoBERTa MLM (transformers)"
UNIT = "sentences"
SST2 = common.DATA / "sst2"
TRAIN_TSV = SST2 / "train.tsv"
DATA_OVERRIDES = [f"data.path={TRAIN_TSV}", "data.text.tsv_column=sentence"]


def corpus_dir(work: Path) -> Path:
    return work / "corpus"


def tokenizer_path(work: Path) -> Path:
    return corpus_dir(work) / "tokenizer.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--roberta-batch", type=int, default=32, help="RoBERTa: blocks of 128 tokens per step")
    p.add_argument("--roberta-lr", type=float, default=5e-4, help="RoBERTa: peak learning rate")
    p.add_argument("--roberta-warmup", type=float, default=0.06, help="RoBERTa: warm-up fraction of the steps")


def prepare(work: Path, args: argparse.Namespace) -> None:
    """Once per work folder: the BPE tokenizer trained on the SST-2 training sentences by this
    library's text pipeline, and the corpus tokenised and packed with it."""
    corpus = corpus_dir(work)
    if (corpus / "prepared").is_file():
        return
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True)
    cfg = TextPipeline().prepare(ours_config(PRESET, 2, DATA_OVERRIDES), corpus)
    (corpus / "prepared").write_text(f"vocabulary {cfg.model.text.vocab_size}\n")
    print(f"vs_ssl text: tokenizer ({cfg.model.text.vocab_size} types) and token stream in {corpus}", flush=True)


def ours_overrides(work: Path) -> list[str]:
    return [*DATA_OVERRIDES, f"data.text.tokenizer={tokenizer_path(work)}"]


def roberta_config(work: Path) -> Any:
    """RoBERTa at our tiny text encoder's size, with our tokenizer's vocabulary and special ids."""
    from transformers import RobertaConfig

    cfg = ours_config(PRESET, 2, ours_overrides(work))
    e, block = cfg.model.encoder, cfg.data.text.block_size
    tok = TextTokenizer.load(tokenizer_path(work))
    return RobertaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=e.dim,
        num_hidden_layers=e.depth,
        num_attention_heads=e.num_heads,
        intermediate_size=int(e.dim * e.mlp_ratio),
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        # RoBERTa numbers positions from pad_id + 1 (514 = 512 + 2 for the published model)
        max_position_embeddings=block + tok.pad_id + 1,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        tie_word_embeddings=True,
    )


def hf_tokenizer(work: Path) -> Any:
    """Our tokenizer.json as a transformers tokenizer (for the masking collator only)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_path(work)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def blocks_of(work: Path, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of packed blocks, in the order our sampler draws them for `seed`."""
    block = ours_config(PRESET, 2, ours_overrides(work)).data.text.block_size
    tok = TextTokenizer.load(tokenizer_path(work))
    blocks = PackedBlocks(corpus_dir(work) / "tokens.bin", block, tok.bos_id, tok.pad_id)
    for idx in ResumableBatchSampler(len(blocks), batch, seed):
        yield torch.stack([blocks[i] for i, _ in idx])


def run_peer(budget_s: float, points: int, work: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import DataCollatorForLanguageModeling, RobertaForMaskedLM

    rcfg = roberta_config(work)
    tok = hf_tokenizer(work)
    batch, peak = args.roberta_batch, args.roberta_lr
    State = tuple[Any, torch.optim.Optimizer, Any, Iterator[torch.Tensor]]

    def build() -> State:
        torch.manual_seed(seed)
        model = RobertaForMaskedLM(rcfg).train()
        opt = torch.optim.AdamW(decay_groups(model, 0.01), lr=peak, betas=(0.9, 0.98), eps=1e-6)
        collate = DataCollatorForLanguageModeling(
            tok, mlm=True, mlm_probability=0.15, mask_replace_prob=0.8, random_replace_prob=0.1, seed=seed
        )
        return model, opt, collate, blocks_of(work, batch, seed)

    def step(state: State, k: int, total: int) -> float:
        model, opt, collate, data = state
        for g in opt.param_groups:
            g["lr"] = linear_lr(k, total, peak, max(1, round(total * args.roberta_warmup)))
        ids = next(data)
        masked = collate(list(ids))
        labels = masked["labels"]
        chosen = labels.ne(-100)
        with autocast():
            # RobertaForMaskedLM's own modules; its vocabulary head only at the masked positions
            h = model.roberta(input_ids=masked["input_ids"], attention_mask=ids.ne(rcfg.pad_token_id))
            logits = model.lm_head(h.last_hidden_state[chosen])
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[chosen])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.item())

    def save(state: State, path: Path) -> None:
        torch.save({"config": state[0].config.to_dict(), "encoder": state[0].roberta.state_dict()}, path)

    result = calibrated_run(PEER, build, step, save, budget_s, points, work)
    result["recipe"] = (
        f"batch {batch} x 128 tokens, lr {peak:.1e}, {args.roberta_warmup:.0%} warm-up then linear decay, "
        f"{result['steps']} steps ({result['per_step']:.3f} s/step calibrated); MLM 15% (80/10/10)"
    )
    return result


def peer_features(path: str, data: LabelledSet) -> np.ndarray:
    """Mean over the non-pad tokens (<s> and </s> included, as ours) of the last hidden state."""
    from transformers import RobertaConfig, RobertaModel

    saved = torch.load(path, weights_only=True)
    rcfg = RobertaConfig.from_dict(saved["config"])
    model = RobertaModel(rcfg, add_pooling_layer=False).eval()
    model.load_state_dict(saved["encoder"])
    bos, eos, pad = rcfg.bos_token_id, rcfg.eos_token_id, rcfg.pad_token_id
    limit = rcfg.max_position_embeddings - pad - 1
    out = []
    with torch.inference_mode():
        for a in range(0, len(data), 64):
            seqs = [wrap_document(data.load(i), bos, eos, limit) for i in range(a, min(len(data), a + 64))]
            ids = torch.full((len(seqs), max(map(len, seqs))), pad, dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, : len(s)] = torch.tensor(s)
            valid = ids.ne(pad)
            h = model(input_ids=ids, attention_mask=valid).last_hidden_state
            m = valid.unsqueeze(-1).float()
            out.append(((h * m).sum(1) / m.sum(1)).numpy())
    return np.concatenate(out)


def probe_sets(args: argparse.Namespace) -> tuple[LabelledSet, LabelledSet, LabelledSet]:
    """(the first `--labels` (2,000) labelled training sentences, dev + test or `--test-limit` of
    them, a fixed subset of `--curve-test` dev sentences (at most all 872) for the curve)."""
    work = Path(args.work) / "text"
    cfg = ours_config(PRESET, 2, ours_overrides(work))
    tok = TextTokenizer.load(tokenizer_path(work))
    train = read_labelled(TRAIN_TSV, cfg, modality="text", tokenizer=tok)
    labels = args.labels or 2000
    train_set = train.subset(range(labels))
    train_set.name = f"SST-2 train (first {labels} labelled)"
    dev = read_labelled(SST2 / "dev.tsv", cfg, modality="text", tokenizer=tok, classes=train.classes)
    test = read_labelled(SST2 / "test.tsv", cfg, modality="text", tokenizer=tok, classes=train.classes)
    n_dev = len(dev)
    both = LabelledSet(
        lambda i: dev.load(i) if i < n_dev else test.load(i - n_dev),
        [*dev.targets, *test.targets],
        train.classes,
        "SST-2 dev + test",
    )
    limit = min(args.test_limit or len(both), len(both))
    full = both.subset(np.sort(np.random.default_rng(0).permutation(len(both))[:limit]))
    curve = min(args.curve_test, n_dev)
    sub = dev.subset(np.sort(np.random.default_rng(0).permutation(n_dev)[:curve]))
    sub.name = f"SST-2 dev ({curve})"
    return train_set, full, sub


# ---------------------------------------------------------------------- fine-tuning


def finetune_sets(args: argparse.Namespace) -> tuple[LabelledSet, LabelledSet]:
    """benchmarks/sst2.py's fine-tuning sets: the first `--labels` (2,000) labelled training
    sentences; scored on dev + test (2,693 sentences, or `--test-limit` of them), the probe's
    final set, tokenised by the arms' shared tokenizer."""
    train, full, _ = probe_sets(argparse.Namespace(**{**vars(args), "curve_test": 1}))
    return train, full


def finetune_config(epochs: int) -> FinetuneConfig:
    """The recipe of BENCHMARKS.md's longest SST-2 run of benchmarks/sst2.py, the same for every
    arm: the text_cls preset (first-token tanh head), lr 5e-4, batch 32, bf16 (`sst2.py --lr 5e-4`;
    10 epochs there)."""
    return finetune_preset("text_cls", epochs=epochs, lr=5e-4, batch_size=32, log_every=10, precision="bf16")


def roberta_to_ours(config: dict[str, Any], encoder: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """A RoBERTa encoder (its config as `to_dict()` gives it, and the `RobertaModel` state dict)
    as our pretrained-model folder. transformers' data2vec-text model is RoBERTa's architecture with the same weight
    names, so the encoder goes through this library's transformers importer (`hf_import`) as a
    `data2vec-text` checkpoint; tests/test_vs_ssl_convert.py checks the result token for token
    against `RobertaModel`."""
    if config.get("model_type") != "roberta":
        raise InteropError(f"roberta_to_ours: model_type {config.get('model_type')!r}, expected 'roberta'")
    hf = {**json.loads(json.dumps(config)), "model_type": "data2vec-text", "architectures": ["Data2VecTextModel"]}
    imp = hf_import(hf, encoder, "a RoBERTa encoder")
    return save_as_ours(imp.config, imp.state_dict, out_dir, "a RoBERTa encoder")


def peer_to_ours(path: str, out_dir: Path) -> Path:
    """The peer snapshot at `path` (run_peer's) as our pretrained-model folder (vs_ssl_finetune.py)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return roberta_to_ours(saved["config"], saved["encoder"], out_dir)
