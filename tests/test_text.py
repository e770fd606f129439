"""Text: embeddings with RoBERTa's position offset, masking that never touches special tokens,
the tokenizer, the data pipeline (formats, errors, packing, resume), and the teacher's targets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from data2vec.config import ConfigError, MaskingConfig, RunConfig, TextConfig, from_dict
from data2vec.data.errors import BadInputError
from data2vec.data.text import PackedBlocks, TextPipeline, read_documents, tokenize_corpus
from data2vec.modalities.text import (
    TokenEmbedding,
    draw_text_masks,
    maskable_tokens,
    position_ids,
    special_ids,
)
from data2vec.model import Batch, Data2Vec
from data2vec.targets import build_targets
from data2vec.tokenizer import SPECIAL_TOKENS, TextTokenizer, TokenizerError

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
VOCAB = 64
TEXT = TextConfig(vocab_size=VOCAB, max_positions=32, pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK, mask_id=MASK)
SPECIALS = (BOS, PAD, EOS, UNK, MASK)


def text_config(version: int, **changes: Any) -> RunConfig:
    """A tiny text RunConfig (width 32, depth 3, 64 token types, up to 32 positions)."""
    masking: dict[str, Any] = (
        {"kind": "bert", "mask_prob": 0.3, "random_token_prob": 0.1, "leave_unmasked_prob": 0.1}
        if version == 1
        else {"kind": "random", "mask_prob": 0.5, "num_masks": 2}
    )
    data: dict[str, Any] = {
        "model": {
            "modality": "text",
            "version": version,
            "encoder": {
                "dim": 32,
                "depth": 3,
                "num_heads": 4,
                "mlp_ratio": 2.0,
                "norm_order": "post",
                "norm_eps": 1e-5,
            },
            "text": {**json.loads(json.dumps(TEXT.__dict__)), "embed_dropout": 0.0},
            "head_layers": 2 if version == 1 else 1,
            "decoder": {"dim": 32, "kernel_size": 3, "groups": 1, "layers": 2, "residual": False},
        },
        "masking": masking,
        "teacher": {"ema_scope": "encoder", "decay": 0.999, "end_decay": 0.9999},
        "targets": {
            "top_k": 2,
            "layer_source": "ffn",
            "layer_norm": "layer" if version == 1 else "instance",
            "final_norm": "none",
        },
        "loss": {"beta": 4.0 if version == 1 else 0.0, "scale": "one"},
        "data": {"batch_size": 4, "num_workers": 0, "text": {"block_size": 16, "vocab_size": 300}},
        "train": {"steps": 2, "precision": "fp32", "device": "cpu"},
    }
    for key, value in changes.items():
        node = data
        *path, last = key.split("__")
        for part in path:
            node = node[part]
        node[last] = value
    cfg: RunConfig = from_dict(RunConfig, data)
    return cfg


def make_model(cfg: RunConfig, seed: int = 0) -> Data2Vec:
    torch.manual_seed(seed)
    return Data2Vec.from_config(cfg)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_ids(batch: int = 6, length: int = 24, seed: int = 0, pad_rows: bool = True) -> torch.Tensor:
    """Blocks like the pipeline's: <s> first, </s> between documents, a few <unk>, right padding."""
    g = gen(seed)
    ids = torch.randint(MASK + 1, VOCAB, (batch, length), generator=g)
    ids[:, 0] = BOS
    ids[:, 7] = EOS
    ids[:, 15] = EOS
    ids[::2, 11] = UNK
    if pad_rows:
        ids[1, 18:] = PAD
        ids[3, 12:] = PAD
    return ids


# ------------------------------------------------------------------ embeddings


def test_position_ids_start_after_padding_index() -> None:
    ids = torch.tensor([[0, 9, 9, 9, 2, 9], [0, 9, 9, 2, 1, 1], [1, 1, 0, 9, 2, 1]])
    # HF/fairseq make_positions: real tokens get pad+1, pad+2, ...; pads get pad.
    assert position_ids(ids, 1).tolist() == [[2, 3, 4, 5, 6, 7], [2, 3, 4, 5, 1, 1], [1, 1, 2, 3, 4, 1]]
    emb = TokenEmbedding(VOCAB, 8, max_positions=6, pad_id=1)
    assert emb.embed_positions.num_embeddings == 6 + 1 + 1  # RoBERTa: 514 rows for 512 tokens
    emb.reset_parameters()
    assert emb.embed_positions.weight[1].abs().sum() == 0 and emb.embed_tokens.weight[1].abs().sum() == 0
    assert emb.embed_positions.weight[2].abs().sum() > 0
    with pytest.raises(ValueError, match="longer than model.text.max_positions 6"):
        emb(torch.full((1, 7), 9))


def test_padding_does_not_change_embeddings() -> None:
    model = make_model(text_config(2))
    ids = sample_ids(pad_rows=False)[:2, :10]
    padded = torch.cat([ids, torch.full((2, 5), PAD)], dim=1)
    a, b = model.frontend.local(ids), model.frontend.local(padded)
    assert a.padding_mask is None
    assert b.padding_mask is not None and b.padding_mask[:, 10:].all() and not b.padding_mask[:, :10].any()
    torch.testing.assert_close(b.x[:, :10], a.x)
    # left padding too: positions count real tokens, so they do not move
    left = model.frontend.local(torch.cat([torch.full((2, 3), PAD), ids], dim=1)).x[:, 3:]
    torch.testing.assert_close(left, a.x)
    # ... while the same token at two positions does get two embeddings
    same = model.frontend.local(torch.full((1, 2), 9)).x
    assert not torch.allclose(same[0, 0], same[0, 1])


# ------------------------------------------------------------------ masking


@pytest.mark.parametrize(
    "masking",
    [
        MaskingConfig(kind="bert", mask_prob=0.3, random_token_prob=0.1, leave_unmasked_prob=0.1),
        MaskingConfig(kind="span", mask_prob=0.35, mask_length=4, random_token_prob=0.0, leave_unmasked_prob=0.0),
        MaskingConfig(kind="span", mask_prob=0.5, mask_length=4, random_token_prob=0.2, leave_unmasked_prob=0.1),
    ],
    ids=["bert", "span", "span-random"],
)
def test_v1_masks_never_touch_special_tokens(masking: MaskingConfig) -> None:
    seen_masked = seen_random = 0
    for seed in range(30):
        ids = sample_ids(seed=seed)
        m = draw_text_masks(ids, masking, TEXT, 1, gen(seed))
        special = ~maskable_tokens(ids, special_ids(TEXT))
        assert m.student_inputs is not None
        assert not (m.mask & special).any()
        # specials reach the student unchanged; masked positions hold <mask>, nothing else does
        assert torch.equal(m.student_inputs[special], ids[special])
        assert (m.student_inputs[m.mask] == MASK).all()
        assert not (m.student_inputs[~m.mask] == MASK).any()
        changed = (m.student_inputs != ids) & ~m.mask  # random replacements (no loss there)
        assert not torch.isin(m.student_inputs[changed], torch.tensor(SPECIALS)).any()
        assert not (changed & special).any()
        seen_masked += int(m.mask.sum())
        seen_random += int(changed.sum())
    assert seen_masked > 0
    assert (seen_random > 0) == (masking.random_token_prob > 0)


def test_bert_proportions() -> None:
    """15% selected; of those 80% <mask> (loss), 10% random (no loss), 10% unchanged."""
    ids = torch.randint(MASK + 1, VOCAB, (400, 200), generator=gen(1))
    masking = MaskingConfig(kind="bert", mask_prob=0.15, random_token_prob=0.1, leave_unmasked_prob=0.1)
    m = draw_text_masks(ids, masking, TEXT, 1, gen(2))
    assert m.student_inputs is not None
    n = ids.numel()
    random_share = float(((m.student_inputs != ids) & ~m.mask).sum()) / n
    assert abs(float(m.mask.sum()) / n - 0.12) < 0.005
    # 1.5% chosen for random replacement; a random token equals the original 1/59 of the time
    assert abs(random_share - 0.015 * (1 - 1 / 59)) < 0.002


def test_span_masks_are_runs_of_four() -> None:
    ids = torch.randint(MASK + 1, VOCAB, (200, 64), generator=gen(3))
    masking = MaskingConfig(kind="span", mask_prob=0.35, mask_length=4, random_token_prob=0.0, leave_unmasked_prob=0.0)
    m = draw_text_masks(ids, masking, TEXT, 1, gen(4)).mask
    # every masked run that does not touch the end is at least 4 long
    for row in m.tolist():
        runs, cur = [], 0
        for v in [*row, False]:
            if v:
                cur += 1
            elif cur:
                runs.append(cur)
                cur = 0
        if row[-1]:
            runs = runs[:-1]
        assert runs and min(runs) >= 4
    share = float(m.float().mean())
    assert 0.25 < share < 0.35  # 0.35 * n / 4 starts of 4, overlaps allowed (1 - (1 - 0.0875)^4 = 0.31)


def test_v2_random_masks_equal_counts_and_skip_specials() -> None:
    masking = MaskingConfig(kind="random", mask_prob=0.5, num_masks=3)
    for seed in range(10):
        ids = sample_ids(seed=seed)
        m = draw_text_masks(ids, masking, TEXT, 2, gen(seed))
        assert m.student_inputs is None and m.mask.shape == (6 * 3, 24)
        maskable = maskable_tokens(ids, special_ids(TEXT)).repeat_interleave(3, 0)
        assert not (m.mask & ~maskable).any()
        n_min = int(maskable.sum(1).min())  # row 3: 12 tokens, minus <s>, </s> -> 10
        assert n_min == 9 or n_min == 10
        assert m.mask.sum(1).tolist() == [n_min - int(n_min * 0.5)] * 18
        assert not torch.equal(m.mask[0], m.mask[1])  # each of the M masks of a sample is its own draw


def test_text_masks_deterministic_given_generator() -> None:
    ids = sample_ids()
    masking = MaskingConfig(kind="bert", mask_prob=0.3)
    a = draw_text_masks(ids, masking, TEXT, 1, gen(7))
    torch.manual_seed(123)  # the global RNG must not matter
    b = draw_text_masks(ids, masking, TEXT, 1, gen(7))
    c = draw_text_masks(ids, masking, TEXT, 1, gen(8))
    assert torch.equal(a.mask, b.mask) and a.student_inputs is not None and b.student_inputs is not None
    assert torch.equal(a.student_inputs, b.student_inputs)
    assert not torch.equal(a.mask, c.mask)


@pytest.mark.parametrize("version", [1, 2])
def test_model_draws_text_masks_without_specials_in_the_loss(version: int) -> None:
    """With no mask given, the model draws text masks itself: the loss covers exactly the
    maskable positions chosen, never <s>, </s>, <unk> or padding."""
    cfg = text_config(version)
    model = make_model(cfg)
    ids = sample_ids()
    masks = draw_text_masks(ids, cfg.masking, cfg.model.text, version, gen(5))
    out = model(Batch(ids), generator=gen(5))
    assert float(out.metrics["masked_tokens"]) == float(masks.mask.sum()) > 0
    out.loss.backward()
    assert model.frontend.local.embed_tokens.weight.grad is not None


def test_text_masking_kinds_are_checked() -> None:
    with pytest.raises(ConfigError, match="masking.kind: 'inverse_block' does not apply to data2vec 2.0 text"):
        text_config(2, masking={"kind": "inverse_block"})
    with pytest.raises(ConfigError, match="masking.kind: 'random' does not apply to data2vec 1.0 text"):
        text_config(1, masking={"kind": "random"})
    with pytest.raises(ConfigError, match="data.text.block_size: 40 is larger than model.text.max_positions 32"):
        text_config(2, data={"text": {"block_size": 40}})


# ------------------------------------------------------------------ teacher and targets


@pytest.mark.parametrize("version", [1, 2])
def test_padded_batch_gives_same_targets_as_single_runs(version: int) -> None:
    model = make_model(text_config(version)).eval()
    ids = sample_ids(batch=4, length=20)
    lengths = [int(row.ne(PAD).sum()) for row in ids]
    assert min(lengths) < 20  # the batch really is padded
    with torch.no_grad():
        tokens = model.frontend.local(ids)
        batch_y = model.teacher_targets(ids, tokens)
        for b, n in enumerate(lengths):
            single = ids[b : b + 1, :n]
            y = model.teacher_targets(single, model.frontend.local(single))
            torch.testing.assert_close(batch_y[b, :n], y[0], rtol=1e-4, atol=1e-5)


def test_targets_come_from_the_ffn_before_the_residual() -> None:
    cfg = text_config(2)
    model = make_model(cfg).eval()
    ids = sample_ids(pad_rows=False)
    fc2_out: list[torch.Tensor] = []
    hooks = [
        blk.mlp.fc2.register_forward_hook(lambda _m, _i, o: fc2_out.append(o.detach()))
        for blk in model.teacher["encoder"].blocks
    ]
    with torch.no_grad():
        y = model.teacher_targets(ids, model.frontend.local(ids))
    for h in hooks:
        h.remove()
    assert len(fc2_out) == 3
    expected = build_targets(fc2_out, 2, "instance", "none")
    torch.testing.assert_close(y, expected)
    with torch.no_grad():
        out = model.teacher["encoder"](model.frontend.local(ids).x, keep_layers=2)
    block_end = build_targets([o.x for o in out.layers], 2, "instance", "none")
    assert not torch.allclose(y, block_end, atol=1e-3)  # block outputs (after residual + LN) differ


def test_teacher_pass_has_no_embedding_dropout() -> None:
    cfg = text_config(2, model__text__embed_dropout=0.5)
    model = make_model(cfg).train()
    clean = make_model(text_config(2)).eval()  # same seed and weights, no dropout anywhere
    ids = sample_ids()
    tokens = model.frontend.local(ids)
    # the student's context pass does drop embeddings ...
    assert not torch.equal(model.frontend.context(tokens).x, model.frontend.context(tokens).x)
    # ... the teacher's never does: repeatable, and equal to a model without dropout
    y1 = model.teacher_targets(ids, tokens)
    y2 = model.teacher_targets(ids, tokens)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(y1, clean.teacher_targets(ids, clean.frontend.local(ids)))


def test_teacher_tracks_encoder_only() -> None:
    model = make_model(text_config(1))
    assert set(model.teacher.parts) == {"encoder"}  # embeddings are shared with the student


# ------------------------------------------------------------------ tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Unicode: naïve café, 日本語, emoji 🙂 and\ttabs\nnewlines.",
    "Special-looking text like <s>, </s> and <mask> stays text.",
] * 20


def test_trained_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = TextTokenizer.train(CORPUS, vocab_size=400)
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    for text in CORPUS[:3] + ["  leading spaces", "unseen wörds Ω ∑"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not set(ids) & {0, 1, 2, 3, 4}  # "<s>" in the text is not the <s> token
    tok.save(tmp_path / "tokenizer.json")
    again = TextTokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(CORPUS[2]) == tok.encode(CORPUS[2])
    assert TextTokenizer.load(tmp_path).vocab_size == tok.vocab_size  # a folder with tokenizer.json


def test_vocab_and_merges_tokenizer(tmp_path: Path) -> None:
    tok = TextTokenizer.train(CORPUS, vocab_size=400)
    tok.tok.model.save(str(tmp_path))  # RoBERTa-style vocab.json + merges.txt
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    loaded = TextTokenizer.load(tmp_path)
    assert (loaded.bos_id, loaded.pad_id, loaded.eos_id, loaded.unk_id, loaded.mask_id) == (0, 1, 2, 3, 4)
    for text in CORPUS[:3]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert TextTokenizer.load(tmp_path / "vocab.json").vocab_size == tok.vocab_size
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(TokenizerError, match="merges.txt"):
        TextTokenizer.load(tmp_path / "vocab.json")


def test_tokenizer_without_special_tokens_is_refused(tmp_path: Path) -> None:
    vocab = {"a": 0, "b": 1, "<s>": 2}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match=r"has no pad token \(looked for <pad>, \[PAD\]\)"):
        TextTokenizer.load(tmp_path)
    assert SPECIAL_TOKENS[0] == "<s>"


# ------------------------------------------------------------------ data


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def data_cfg(**changes: Any) -> Any:
    cfg = text_config(2)
    return cfg.data.text.__class__(**{**cfg.data.text.__dict__, **changes})


def test_document_formats(tmp_path: Path) -> None:
    txt = write(tmp_path / "a.txt", "first line\n\n  second line  \n")
    assert list(read_documents(txt, data_cfg())) == ["first line", "second line"]
    assert list(read_documents(txt, data_cfg(document="file"))) == ["first line\n\n  second line"]
    jsonl = write(tmp_path / "b.jsonl", '{"text": "one"}\n\n{"body": "x", "text": "two"}\n')
    assert list(read_documents(jsonl, data_cfg())) == ["one", "two"]
    tsv = write(tmp_path / "c.tsv", 'sentence\tlabel\nit\'s "good" \t1\nbad\t0\n')
    assert list(read_documents(tsv, data_cfg(tsv_column="sentence"))) == ['it\'s "good"', "bad"]
    bom = write(tmp_path / "d.txt", "\ufeffwith a BOM\n".encode())
    assert list(read_documents(bom, data_cfg())) == ["with a BOM"]


@pytest.mark.parametrize(
    ("name", "content", "changes", "expected"),
    [
        ("latin1.txt", "fine line\ncaf\xe9\n".encode("latin-1"), {}, "not UTF-8 text (line 2, byte 0xe9"),
        ("empty.txt", "\n  \n", {}, "empty: no documents"),
        ("blank.txt", "   \n", {"document": "file"}, "empty document"),
        ("rows.jsonl", '{"text": "ok"}\n{"text": "  "}\n', {}, "rows.jsonl:2: empty document"),
        ("broken.jsonl", '{"text": "ok"}\n{"text": \n', {}, "broken.jsonl:2: not valid JSON"),
        ("field.jsonl", '{"body": "ok"}\n', {}, "field.jsonl:1: no string field 'text'"),
        ("cols.tsv", "sentence\tlabel\nok\t1\n", {}, "no column 'text' in the header (columns: sentence, label)"),
    ],
)
def test_bad_text_inputs_name_the_file(
    tmp_path: Path, name: str, content: bytes | str, changes: dict[str, Any], expected: str
) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(BadInputError) as err:
        list(read_documents(path, data_cfg(**changes)))
    assert str(path) in str(err.value) and expected in str(err.value)


def test_skip_bad_files_and_pack_documents_with_end_tokens(tmp_path: Path) -> None:
    tok = TextTokenizer.train(CORPUS, vocab_size=400)
    good = write(tmp_path / "corpus" / "a.txt", "alpha beta\ngamma\n")
    # a file that fails half-way: what it had added must be rolled back
    write(tmp_path / "corpus" / "b.txt", b"delta epsilon\n" * 3000 + b"\xff\n")
    write(tmp_path / "corpus" / "c.jsonl", '{"text": "zeta"}\n{"text": ""}\n')
    files = sorted((tmp_path / "corpus").iterdir())
    with pytest.raises(BadInputError, match="b.txt: not UTF-8"):
        tokenize_corpus(files, tok, data_cfg(), "fail", tmp_path / "fail.bin")
    stats = tokenize_corpus(files, tok, data_cfg(), "skip", tmp_path / "tokens.bin")
    assert stats.files == 2 and stats.documents == 3
    assert len(stats.skipped) == 2 and "b.txt: not UTF-8" in stats.skipped[0] and "c.jsonl:2" in stats.skipped[1]
    stream = np.fromfile(tmp_path / "tokens.bin", dtype=np.uint16).tolist()
    docs = ["alpha beta", "gamma", "zeta"]
    expected = [t for d in docs for t in (*tok.encode(d), tok.eos_id)]
    assert stream == expected  # documents back to back, each followed by </s>, nothing from b.txt
    assert str(good) not in " ".join(stats.skipped)

    span = 4  # blocks of 5: <s> + 4 ids of the stream
    blocks = PackedBlocks(tmp_path / "tokens.bin", 5, tok.bos_id, tok.pad_id)
    assert len(blocks) == len(expected) // span
    for k in range(len(blocks)):
        assert blocks[k].tolist() == [tok.bos_id, *expected[k * span : (k + 1) * span]]
    assert sum(b.tolist().count(tok.eos_id) for b in (blocks[k] for k in range(len(blocks)))) >= 2
    short = PackedBlocks(tmp_path / "tokens.bin", 64, tok.bos_id, tok.pad_id)  # corpus < one block: padded
    assert len(short) == 1 and short[0].tolist() == [tok.bos_id, *expected] + [tok.pad_id] * (63 - len(expected))


def _prepared(tmp_path: Path, version: int) -> RunConfig:
    lines = [f"document number {i} says {' '.join(['word'] * (i % 7 + 1))} and more" for i in range(200)]
    corpus = write(tmp_path / "corpus.txt", "\n".join(lines) + "\n")
    return TextPipeline().prepare(text_config(version, data__path=str(corpus)), tmp_path / "run")


@pytest.mark.parametrize("version", [1, 2])
def test_prepare_sets_vocabulary_and_loader_resumes_exactly(tmp_path: Path, version: int) -> None:
    (tmp_path / "run").mkdir()
    cfg = _prepared(tmp_path, version)
    tok = TextTokenizer.load(cfg.data.text.tokenizer)
    assert Path(cfg.data.text.tokenizer) == (tmp_path / "run" / "tokenizer.json").resolve()
    assert cfg.model.text.vocab_size == tok.vocab_size <= 300 and cfg.model.text.mask_id == 4
    pipe = TextPipeline()
    it, n = pipe.loader(cfg, 0, 0, 1)
    first = [next(it) for _ in range(6)]
    assert n > 6
    for b in first:
        assert b.inputs.shape == (4, 16) and (b.inputs[:, 0] == cfg.model.text.bos_id).all()
        assert (b.student_inputs is not None) == (version == 1)
    resumed, _ = pipe.loader(cfg, 3, 0, 1)
    for k in range(3, 6):
        b = next(resumed)
        assert torch.equal(b.inputs, first[k].inputs) and torch.equal(b.mask, first[k].mask)
        if version == 1:
            assert b.student_inputs is not None and first[k].student_inputs is not None
            assert torch.equal(b.student_inputs, first[k].student_inputs)
    assert not torch.equal(first[0].inputs, first[1].inputs)
