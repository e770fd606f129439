"""Parquet and arrow data (data/tables.py): the Hugging Face layouts for each modality, streamed
by row group, exact resume, rank sharding, bad rows and files, extraction and fine-tuning."""

from __future__ import annotations

import io
import json
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from data2vec.cli import main
from data2vec.config import ConfigError, apply_overrides
from data2vec.data.batch import PretrainBatch
from data2vec.data.errors import BadInputError
from data2vec.data.images import digits_array
from data2vec.data.pipeline import build_pretrain_loader
from data2vec.data.tables import RowGroupBatchSampler, RowSpec, TableFile, TableRows, find_column
from data2vec.tiny import tiny_config
from data2vec.training import train

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
RUN = ["data.num_workers=0", "train.log_every=1", "train.precision=fp32", "train.ckpt_every=2"]


def _hub_metadata(features: dict[str, Any]) -> dict[bytes, bytes]:
    """The schema metadata `datasets` writes into its parquet files."""
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_images(path: Path, n: int = 48, group: int = 8, bad: tuple[int, ...] = ()) -> Path:
    """Digits as PNG bytes in the hub's Image layout ({bytes, path} struct) with a ClassLabel."""
    images, labels = digits_array(32)
    cells = [{"bytes": b"not an image" if i in bad else _png(images[i]), "path": f"{i}.png"} for i in range(n)]
    table = pa.table({"image": pa.array(cells, type=IMAGE_STRUCT), "label": pa.array(labels[:n], pa.int64())})
    names = [f"digit {d}" for d in range(10)]
    table = table.replace_schema_metadata(
        _hub_metadata({"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}})
    )
    pq.write_table(table, path, row_group_size=group)
    return path


def _wav(n: int, rate: int, seed: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 0.1, rate, format="WAV")
    return buf.getvalue()


def write_audio(path: Path, n: int = 24, group: int = 6, bad: tuple[int, ...] = ()) -> Path:
    cells = [
        {"bytes": b"RIFF....junk" if i in bad else _wav(6000 + 200 * i, 16000, i), "path": f"{i}.wav"} for i in range(n)
    ]
    table = pa.table({"audio": pa.array(cells, type=IMAGE_STRUCT), "label": pa.array([i % 3 for i in range(n)])})
    pq.write_table(
        table.replace_schema_metadata(_hub_metadata({"audio": {"_type": "Audio"}})), path, row_group_size=group
    )
    return path


SENTENCES = [
    "a gripping and moving film",
    "the plot is thin and the jokes fall flat",
    "one of the best performances of the year",
    "tedious , overlong and dull",
    "warm , funny and smart",
    "nothing in it works",
]


def write_text(path: Path, n: int = 60, group: int = 10, empty: tuple[int, ...] = ()) -> Path:
    texts = ["" if i in empty else f"{SENTENCES[i % 6]} {i}" for i in range(n)]
    table = pa.table({"idx": list(range(n)), "sentence": texts, "label": [int(i % 6 in (0, 2, 4)) for i in range(n)]})
    pq.write_table(table, path, row_group_size=group)
    return path


# ---------------------------------------------------------------------- order and resume


def _batches(sampler: RowGroupBatchSampler, count: int) -> list[list[tuple[int, int]]]:
    it = iter(sampler)
    return [next(it) for _ in range(count)]


def test_row_group_order_is_a_pure_function_of_the_batch_counter() -> None:
    groups = np.array([7, 9, 8, 8, 5, 9, 7, 10, 6, 8], dtype=np.int64)
    sampler = RowGroupBatchSampler(groups, batch_size=4, seed=3, buffer_rows=16)
    per_epoch = sampler.batches_per_epoch
    assert per_epoch == int(groups.sum()) // 4
    full = _batches(sampler, 3 * per_epoch)
    for start in (1, per_epoch - 1, per_epoch, 2 * per_epoch + 3):
        resumed = RowGroupBatchSampler(groups, batch_size=4, seed=3, start_batch=start, buffer_rows=16)
        assert _batches(resumed, 5) == full[start : start + 5], start
    starts = np.concatenate([[0], np.cumsum(groups)])
    for epoch in range(3):
        rows = [i for b in full[epoch * per_epoch : (epoch + 1) * per_epoch] for i, _ in b]
        assert len(rows) == len(set(rows)), "a row read twice in one epoch"
        # Each batch reads few row groups (the window), never a random row of the whole data.
        for b in full[epoch * per_epoch : (epoch + 1) * per_epoch]:
            touched = {int(np.searchsorted(starts, i, side="right")) - 1 for i, _ in b}
            assert len(touched) <= sampler.cache_groups
    assert [i for i, _ in full[0]] != [i for i, _ in full[per_epoch]], "epochs must be shuffled anew"


def test_ranks_read_disjoint_row_groups_and_the_same_number_of_batches() -> None:
    groups = np.array([6, 6, 7, 5, 6, 8, 6, 4, 6], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(groups)])
    samplers = [RowGroupBatchSampler(groups, 3, seed=0, rank=r, world_size=3, buffer_rows=6) for r in range(3)]
    assert len({s.batches_per_epoch for s in samplers}) == 1
    n = samplers[0].batches_per_epoch
    owned = []
    for s in samplers:
        rows = [i for b in _batches(s, n) for i, _ in b]
        owned.append({int(np.searchsorted(starts, i, side="right")) - 1 for i in rows})
    assert not (owned[0] & owned[1]) and not (owned[0] & owned[2]) and not (owned[1] & owned[2])
    with pytest.raises(ValueError, match="row group"):
        RowGroupBatchSampler(groups[:2], 1, seed=0, world_size=3)


def test_image_run_from_parquet_resumes_exactly(tmp_path: Path) -> None:
    data = write_images(tmp_path / "train-00000-of-00001.parquet")
    cfg = tiny_config(
        "image", 2, *RUN, f"data.path={data}", "data.batch_size=8", "train.steps=4", "data.shuffle_buffer=16"
    )
    full = train(cfg, tmp_path / "full", progress=False, quiet=True)
    part = train(cfg, tmp_path / "part", progress=False, quiet=True, stop_after=2)
    assert part.step == 2
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False, quiet=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    notes = (tmp_path / "full" / "train.log").read_text()
    assert "48 samples" in notes


def test_loader_batches_come_from_the_rows_of_a_window(tmp_path: Path) -> None:
    data = write_images(tmp_path / "d.parquet", n=48, group=8)
    cfg = tiny_config("image", 2, *RUN, f"data.path={data}", "data.batch_size=8", "data.shuffle_buffer=16")
    it, n = build_pretrain_loader(cfg, 0)
    assert n == 48
    b: PretrainBatch = next(it)
    assert b.inputs.shape == (8, 1, 32, 32) and not b.skipped


# ---------------------------------------------------------------------- columns and bad input


def test_columns_are_found_from_the_schema_or_named(tmp_path: Path) -> None:
    images = TableFile(str(write_images(tmp_path / "i.parquet", n=8)))
    assert find_column(images, "image") == "image"
    texts = TableFile(str(write_text(tmp_path / "t.parquet", n=8)))
    assert find_column(texts, "text") == "sentence"
    two = tmp_path / "two.parquet"
    pq.write_table(pa.table({"title": ["a"], "body": ["b"]}), two)
    with pytest.raises(
        BadInputError, match=r"several columns could hold the text data \(title, body\); set data.column"
    ):
        find_column(TableFile(str(two)), "text")
    assert find_column(TableFile(str(two)), "text", "body") == "body"
    with pytest.raises(BadInputError, match=r"no column 'nope' \(columns: title, body\)"):
        find_column(TableFile(str(two)), "text", "nope")
    with pytest.raises(BadInputError, match="no column holds image data"):
        find_column(texts, "image")


def test_bad_rows_are_named_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_images(tmp_path / "d.parquet", n=32, group=8, bad=(11,))
    args = ["pretrain", "--preset", "digits-tiny", "--data", str(data), "--no-progress"]
    sets = [f"--set={s}" for s in [*tiny_shape("image"), *RUN, "data.batch_size=32", "train.steps=1"]]
    assert main([*args, *sets, "--out", str(tmp_path / "fail")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"data2vec: error: {data}: row group 1, row 3: not a readable image"), (
        err
    )
    assert main([*args, *sets, "--on-bad-input", "skip", "--out", str(tmp_path / "skip")]) == 0
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_inputs"] == 1
    assert summary["skipped_input_files"][0].startswith(f"{data}: row group 1, row 3: ")


def tiny_shape(modality: str) -> list[str]:
    from data2vec import tiny

    return list(tiny.SHAPES[modality])


def test_a_cut_file_is_one_line_and_left_out_under_skip(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    write_images(folder / "train-00000-of-00002.parquet", n=16)
    whole = write_images(folder / "train-00001-of-00002.parquet", n=16).read_bytes()
    (folder / "train-00001-of-00002.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BadInputError, match=r"train-00001-of-00002.parquet: not a readable parquet file"):
        TableRows(str(folder), RowSpec("image"))
    rows = TableRows(str(folder), RowSpec("image"), on_bad_input="skip")
    assert len(rows) == 16 and len(rows.problems) == 1 and "00001" in rows.problems[0]


def test_missing_pyarrow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_text(tmp_path / "t.parquet", n=8)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ConfigError, match=r"pip install 'data2vec\[parquet\]'"):
        TableRows(str(data), RowSpec("text"))


def test_memory_is_flat_in_the_row_count(tmp_path: Path) -> None:
    """100,000 rows: the index holds row-group sizes only, and reading in the sampler's order
    keeps at most `cache_groups` row groups decoded."""
    path = tmp_path / "big.parquet"
    n = 100_000
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(n)]}), path, row_group_size=1_000)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        rows = TableRows(str(path), RowSpec("text"))
        index_growth = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(rows) == n and len(rows.group_rows) == 100
    assert index_growth < 256 * 1024, f"{index_growth} bytes to index {n} rows"  # ~100 groups, not 100k rows
    sampler = RowGroupBatchSampler(rows.group_rows, 64, seed=0, buffer_rows=2_000)
    rows.cache_groups = sampler.cache_groups
    before = pa.total_allocated_bytes()
    for k, batch in zip(range(200), sampler, strict=False):
        for i, _ in batch:
            assert rows.row(i) == f"row {i}"
        assert len(rows._cache) <= sampler.cache_groups, k
    assert pa.total_allocated_bytes() - before < 8 * 1024 * 1024


# ---------------------------------------------------------------------- speech and text


def test_audio_pretraining_from_hub_and_array_layouts(tmp_path: Path) -> None:
    hub = write_audio(tmp_path / "hub.parquet", bad=(4,))
    arrays = tmp_path / "arrays.parquet"
    rng = np.random.default_rng(0)
    waves = [list(rng.standard_normal(3000 + 100 * i).astype(np.float32)) for i in range(12)]
    pq.write_table(pa.table({"samples": waves, "sampling_rate": [8000] * 12}), arrays, row_group_size=4)
    for data, steps in ((hub, 4), (arrays, 2)):
        cfg = tiny_config(
            "audio", 2, *RUN, f"data.path={data}", "data.on_bad_input=skip", f"train.steps={steps}",
            "data.audio.min_sample_size=2000", "data.audio.max_sample_size=6000", "data.audio.batch_seconds=2.25",
        )  # fmt: skip
        result = train(cfg, tmp_path / data.stem, progress=False, quiet=True)  # batches of 6 clips
        assert result.step == steps
        if data == hub:  # 4 batches of 6: every row of the epoch was read
            assert len(result.skipped_inputs) == 1
            assert result.skipped_inputs[0].startswith(f"{hub}: row group 0, row 4: not a readable audio file")
        else:
            assert not result.skipped_inputs


def test_text_pretraining_from_parquet(tmp_path: Path) -> None:
    data = write_text(tmp_path / "sst2.parquet", n=60, empty=(7,))
    cfg = tiny_config(
        "text", 2, *RUN, f"data.path={data}", "data.batch_size=4", "train.steps=2", "data.text.vocab_size=300"
    )
    with pytest.raises(BadInputError, match=rf"{data}: row group 0, row 7: empty document"):
        train(cfg, tmp_path / "fail", progress=False, quiet=True)
    cfg = apply_overrides(cfg, ["data.on_bad_input=skip"])
    result = train(cfg, tmp_path / "skip", progress=False, quiet=True)
    assert result.step == 2
    assert result.skipped_inputs == [f"{data}: row group 0, row 7: empty document"]
    meta = json.loads((tmp_path / "skip" / "tokens.json").read_text())
    assert meta["documents"] == 59


# ---------------------------------------------------------------------- extraction and fine-tuning


def test_extract_and_finetune_read_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train_set = write_images(tmp_path / "train.parquet", n=40)
    eval_set = write_images(tmp_path / "eval.parquet", n=16)
    probe = ["probe.every=2", f"probe.train_data={train_set}", f"probe.eval_data={eval_set}", "probe.knn_k=3"]
    cfg = tiny_config("image", 2, *RUN, f"data.path={train_set}", "data.batch_size=8", "train.steps=2", *probe)
    result = train(cfg, tmp_path / "run", progress=False, quiet=True)
    assert {"probe_linear_layer2", "probe_knn_layer2"} <= set(result.history[-1])
    out = tmp_path / "feats.npy"
    assert (
        main(
            [
                "extract",
                "--checkpoint",
                str(tmp_path / "run"),
                "--input",
                str(eval_set),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert np.load(out).shape == (1, 16, 32)
    names = (tmp_path / "feats.files.txt").read_text().splitlines()
    assert names[0] == f"{eval_set}: row group 0, row 0"
    ft = tmp_path / "ft"
    code = main([
        "finetune", "--checkpoint", str(tmp_path / "run"), "--task", "image_cls", "--train", str(train_set),
        "--eval", str(eval_set), "--out", str(ft), "--epochs", "1", "--batch-size", "8", "--no-progress",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (ft / "metrics.jsonl").read_text().strip()
    written = "\n".join(p.read_text() for p in ft.rglob("*.json"))
    assert '"digit 9"' in written, "the ClassLabel names should be the classes"


def test_python_api_takes_datasets_objects(tmp_path: Path) -> None:
    """A `datasets.Dataset` (a shuffled view) and an `IterableDataset` are written once into the
    run directory as parquet with their feature types; the run resumes from the directory alone."""
    datasets = pytest.importorskip("datasets")
    images, labels = digits_array(32)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in images[:40]], "label": labels[:40].tolist()}, features=features
    )
    cfg = tiny_config("image", 2, *RUN, "data.batch_size=8", "train.steps=3")
    part = train(cfg, tmp_path / "view", progress=False, quiet=True, stop_after=2, data=ds.shuffle(seed=1))
    copy = tmp_path / "view" / "data" / "data.parquet"
    assert part.step == 2 and copy.is_file()
    assert TableFile(str(copy)).features()["image"]["_type"] == "Image"
    resumed = train(cfg, tmp_path / "view", resume=True, progress=False, quiet=True)
    assert resumed.step == 3
    streamed = train(cfg, tmp_path / "stream", progress=False, quiet=True, data=ds.to_iterable_dataset(num_shards=2))
    assert streamed.step == 3
    with pytest.raises(TypeError, match="expected a datasets.Dataset or IterableDataset"):
        train(cfg, tmp_path / "list", progress=False, quiet=True, data=[1, 2, 3])


def test_save_to_disk_arrow_folder_and_text_extraction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A `Dataset.save_to_disk` folder (arrow files, memory-mapped) pretrains text; `extract`
    reads the same rows back, one document per row."""
    datasets = pytest.importorskip("datasets")
    texts = [f"{SENTENCES[i % 6]} {i}" for i in range(40)]
    datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(40)]}).save_to_disk(
        str(tmp_path / "saved"), num_shards=2
    )
    assert len(list((tmp_path / "saved").glob("*.arrow"))) > 1
    cfg = tiny_config(
        "text", 2, *RUN, f"data.path={tmp_path / 'saved'}", "data.batch_size=4", "train.steps=2",
        "data.text.vocab_size=300",
    )  # fmt: skip
    result = train(cfg, tmp_path / "run", progress=False, quiet=True)
    assert json.loads((tmp_path / "run" / "tokens.json").read_text())["documents"] == 40 and result.step == 2
    out = tmp_path / "f.npy"
    args = ["extract", "--checkpoint", str(tmp_path / "run"), "--input", str(tmp_path / "saved"), "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0, capsys.readouterr().err
    assert np.load(out).shape == (1, 40, 32)
