"""Text end to end through the command line: `pretrain --modality text` and the text demo (shrunken)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data2vec.cli import main
from data2vec.config import RunConfig
from data2vec.tokenizer import TextTokenizer

SHRINK = [
    "model.encoder.dim=32",
    "model.encoder.depth=2",
    "model.encoder.num_heads=2",
    "model.decoder.dim=32",
    "model.decoder.layers=1",
    "model.text.max_positions=32",
    "targets.top_k=2",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.text.block_size=32",
    "data.text.vocab_size=400",
    "train.precision=fp32",
]


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _corpus(folder: Path) -> Path:
    folder.mkdir(parents=True)
    lines = [
        f"sentence {i} is about {['cats', 'dogs', 'trains', 'rivers'][i % 4]} and nothing else" for i in range(120)
    ]
    (folder / "a.txt").write_text("\n".join(lines) + "\n")
    (folder / "b.jsonl").write_text(
        "".join(json.dumps({"text": f"record {i} of the json lines"}) + "\n" for i in range(30))
    )
    (folder / "bad.txt").write_bytes(b"ok line\n\xff\xfe not utf-8\n")
    return folder


@pytest.mark.parametrize("version", [1, 2])
def test_pretrain_text_tiny_two_steps(capsys: pytest.CaptureFixture[str], tmp_path: Path, version: int) -> None:
    data = _corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    args = ["pretrain", "--modality", "text", "--data", str(data), "--preset", "text-tiny", "--version", str(version)]
    sets = _sets([*SHRINK, "train.steps=2"])
    assert main([*args, *sets, "--on-bad-input", "skip", "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "finished at step 2" in out and "skipped 1 bad input" in out
    cfg = RunConfig.load(run / "config.json")
    tok = TextTokenizer.load(run / "tokenizer.json")
    assert cfg.model.modality == "text" and cfg.model.version == version
    assert cfg.model.text.vocab_size == tok.vocab_size and cfg.model.text.mask_id == tok.mask_id == 4
    assert cfg.data.text.tokenizer == str((run / "tokenizer.json").resolve())
    assert (run / "checkpoints" / "step_00000002").is_dir()
    assert "bad.txt: not UTF-8" in (run / "train.log").read_text()
    # the same corpus under on_bad_input=fail stops at once, naming the file
    assert main([*args, *_sets([*SHRINK, "train.steps=2"]), "--out", str(tmp_path / "run2"), "--no-progress"]) == 2
    assert "bad.txt: not UTF-8 text (line 2" in capsys.readouterr().err


def test_pretrain_text_reuses_a_saved_tokenizer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = _corpus(tmp_path / "corpus")
    (data / "bad.txt").unlink()
    base = ["pretrain", "--modality", "text", "--data", str(data), "--preset", "text-tiny", "--no-progress"]
    assert main([*base, *_sets([*SHRINK, "train.steps=1"]), "--out", str(tmp_path / "a")]) == 0
    tok_file = tmp_path / "a" / "tokenizer.json"
    sets = _sets([*SHRINK, "train.steps=1", f"data.text.tokenizer={tok_file}"])
    assert main([*base, *sets, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "tokenizer.json").read_text() == tok_file.read_text()
    assert (tmp_path / "b" / "tokens.bin").read_bytes() == (tmp_path / "a" / "tokens.bin").read_bytes()
    capsys.readouterr()
    sets = _sets([*SHRINK, f"data.text.tokenizer={tmp_path / 'missing.json'}"])
    assert main([*base, *sets, "--out", str(tmp_path / "c")]) == 2
    assert "missing.json: no such tokenizer" in capsys.readouterr().err


def test_text_demo_runs_and_reports(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sets = _sets([*SHRINK, "data.batch_size=8"])
    code = main(["demo", "--modality", "text", "--out", str(tmp_path), "--steps", "3", "--no-progress", *sets])
    assert code == 0
    out = capsys.readouterr().out
    assert "data2vec 2.0 pretrained encoder" in out and "TF-IDF words" in out and "module family" in out
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["steps"] == 3 and len(probe["families"]) == 8
    chance = probe["majority_class"]
    for key in ("pretrained", "random_init", "tfidf"):
        assert 0.0 < probe[key] <= 1.0
    assert chance < probe["tfidf"] < 0.9  # a real but imperfect baseline
    assert probe["probe_test_docstrings"] > 500 and probe["held_out_modules"]
    corpus = (tmp_path / "corpus" / "stdlib_docs.jsonl").read_text().splitlines()
    assert len(corpus) == probe["pretraining_documents"] > 1000
    held_out_doc = json.loads(corpus[0])["text"]
    assert isinstance(held_out_doc, str) and held_out_doc
    for name in ("loss.png", "metrics.jsonl", "config.json", "tokenizer.json", "tokens.bin"):
        assert (tmp_path / name).stat().st_size > 0
