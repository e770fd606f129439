"""The data layer's labelled sets (data/labelled.py) and evaluation inputs (data/eval_inputs.py),
and the one MaskingConfig reader (masking.masks_from_config)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from data2vec import extract
from data2vec.config import ConfigError
from data2vec.data.batch import EvalItem
from data2vec.data.eval_inputs import labelled_items, prepare_example, read_inputs
from data2vec.data.labelled import LabelledSet, load_text_tokenizer, read_labelled
from data2vec.data.text import wrap_document
from data2vec.finetune import finetune_preset
from data2vec.finetune import read_labelled as finetune_read_labelled
from data2vec.masking import draw_masks, masks_from_config
from helpers import tiny_audio_config
from test_finetune import image_config, text_config, write_audio_folder, write_images


def test_wrap_document_cuts_to_fit() -> None:
    assert wrap_document([5, 6, 7], 0, 2, 10) == [0, 5, 6, 7, 2]
    assert wrap_document(iter([5, 6, 7, 8]), 0, 2, 4) == [0, 5, 6, 2]


def test_extract_keeps_its_names() -> None:
    assert extract.Item is EvalItem and extract.read_inputs is read_inputs


def test_labelled_text_items_wrap_and_cut(tmp_path: Path) -> None:
    cfg = text_config(tmp_path)
    t = cfg.model.text
    long = list(range(10, 10 + 2 * t.max_positions))
    data = LabelledSet(lambda i: [[7, 8], long][i], [0, 1], ["a", "b"], "set")
    for preload in (False, True):
        items = labelled_items(cfg, data, preload=preload)
        assert [it.name for it in items] == ["set 0", "set 1"]
        assert [it.length for it in items] == [4, t.max_positions]
        assert items[0].load().tolist() == [t.bos_id, 7, 8, t.eos_id]
        cut = items[1].load()
        assert cut.dtype == torch.long and cut.tolist() == [t.bos_id, *long[: t.max_positions - 2], t.eos_id]
    assert len(labelled_items(cfg, data, 1)) == 1


def test_labelled_images_match_the_finetune_reader(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", n=3)
    cfg = image_config()
    data = read_labelled(tmp_path / "imgs", cfg)
    same = finetune_read_labelled(tmp_path / "imgs", finetune_preset("image_cls"), cfg)
    assert data.classes == same.classes == ["bright", "dark"] and data.targets == same.targets
    items = labelled_items(cfg, data)
    x = items[0].load()
    assert x.shape == (cfg.model.image.channels, *cfg.model.image.image_size) and items[0].length == 1
    assert torch.equal(x, prepare_example(cfg, data.load(0)))
    # An eval set maps class names to the training set's indices.
    assert read_labelled(tmp_path / "imgs", cfg, classes=["dark", "bright"]).classes == ["bright", "dark"]


def test_labelled_audio_folder_and_transcripts(tmp_path: Path) -> None:
    write_audio_folder(tmp_path / "wavs", n=2)
    cfg = tiny_audio_config()
    data = read_labelled(tmp_path / "wavs", cfg)
    assert data.classes == ["high", "low"] and data.targets == [0, 0, 1, 1]
    wav = data.load(0)
    assert wav.dtype == np.float32 and abs(float(wav.mean())) < 1e-3  # normalised
    items = labelled_items(cfg, data, 2)
    assert [it.length for it in items] == [len(data.load(0)), len(data.load(1))]
    with pytest.raises(ValueError, match="transcript"):
        read_labelled(tmp_path / "wavs", cfg, targets="transcript")
    (tmp_path / "wavs" / "list.tsv").write_text("path\tlabel\nhigh/0.wav\tup\nlow/1\tdown\n")
    listed = read_labelled(tmp_path / "wavs" / "list.tsv", cfg, classes=["down", "up"])
    assert listed.targets == [1, 0]
    # The evaluation reader lists the same files, with their lengths from the headers.
    inputs = read_inputs(cfg, tmp_path / "wavs")
    assert [Path(it.name).name for it in inputs] == ["0.wav", "1.wav", "0.wav", "1.wav"]
    assert inputs[0].length == len(inputs[0].load())


def test_labelled_text_needs_a_tokenizer(tmp_path: Path) -> None:
    cfg = text_config(tmp_path)
    (tmp_path / "t.tsv").write_text("sentence\tlabel\nthis movie is good\t1\nthis movie is bad\t0\n")
    data = read_labelled(tmp_path / "t.tsv", cfg)
    assert data.targets == [1, 0] and all(isinstance(i, int) for i in data.load(0))
    values = read_labelled(tmp_path / "t.tsv", cfg, targets="value")
    assert values.targets == [1.0, 0.0] and values.classes == []
    no_tok = replace(cfg, data=replace(cfg.data, text=replace(cfg.data.text, tokenizer="")))
    with pytest.raises(ConfigError, match="data.text.tokenizer"):
        load_text_tokenizer(no_tok)
    small = replace(cfg, model=replace(cfg.model, text=replace(cfg.model.text, vocab_size=10)))
    with pytest.raises(ValueError, match="more than the model's 10"):
        load_text_tokenizer(small)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("kind", ["inverse_block", "beit_block", "span", "block_1d", "random"])
def test_masks_from_config_is_draw_masks_with_the_config(kind: str, version: int) -> None:
    m = replace(image_config(version).masking, kind=kind, num_masks=3, mask_length=2, min_block_patches=2)
    valid = torch.tensor([30, 24]) if kind in ("span", "block_1d") else None
    grid = (1, 30) if valid is not None else (6, 6)
    gen = torch.Generator().manual_seed(3)
    got = masks_from_config(m, 2, grid, version=version, generator=gen, valid_lengths=valid)
    want = draw_masks(
        kind,
        2,
        grid,
        m.mask_prob,
        generator=torch.Generator().manual_seed(3),
        num_masks=3 if version == 2 else 1,
        mask_length=2,
        mask_prob_adjust=m.mask_prob_adjust,
        min_block_patches=2,
        valid_lengths=valid,
    )
    assert torch.equal(got, want) and got.shape[0] == (6 if version == 2 else 2)
