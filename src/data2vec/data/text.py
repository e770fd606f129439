"""Text data: documents from plain text, JSONL or TSV files, tokenised once and packed into blocks.

Inputs (`data.path` is a file or a folder, searched recursively, files in sorted order;
hidden files and folders, names starting with ".", are left out):

- plain text (.txt, .text, .md, .rst, or any other file given by name): one document
  per line (blank lines are skipped) or one per file (`data.text.document`);
- JSONL (.jsonl, .ndjson): one JSON object per line, its text in `data.text.jsonl_field`;
- TSV (.tsv): a header line, then one document per row in column `data.text.tsv_column`;
- parquet or arrow (.parquet, .arrow: the Hugging Face formats, data/tables.py): one document
  per row of the string column (`data.column`, or the one string column, or `text`), read a
  row group at a time; a folder or glob of them works like a folder of text files.

Files are read line by line in binary and decoded as strict UTF-8, so memory stays flat
and a bad byte is reported with its file and line. A bad file (not UTF-8, no text, no such
column) or a bad record (invalid JSON, empty document) raises `BadInputError` naming it
under `data.on_bad_input=fail`; under `skip` it is left out (a file entirely: what it had
already added is rolled back) and counted in the run's summary.

The tokenizer (training and encoding) sees a long document in pieces of at most
`PIECE_CHARS` characters, cut where a run of whitespace starts (pre-tokenisation splits
there anyway, so the ids are unchanged) or, inside a longer run without one, hard. So a
10 MB single-line file costs time and memory in proportion to its size, where the whole
line at once took gigabytes (and a long word, superlinear time).

`prepare` (once per run, before the model exists): train or load the tokenizer, save it as
`tokenizer.json` in the run directory, and stream the corpus through it into
`tokens.bin`, a flat file of token ids (uint16 below 65,536 types), each document
followed by </s>. Training reads that file through a memory map: block k is
[<s>] + the ids at [k (N-1), (k+1) (N-1)) for block size N (fairseq's 'none' break mode:
documents run across block boundaries, separated by </s>). A trailing partial block is
dropped unless the corpus is shorter than one block (then it is padded). Blocks are random
access, so `ResumableBatchSampler` applies: batch k is a pure function of (seed, k).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from data2vec.config import MaskingConfig, RunConfig, TextConfig, TextDataConfig
from data2vec.data.batch import PretrainBatch
from data2vec.data.errors import BadInputError, check_file
from data2vec.data.index import sorted_table, walk_files
from data2vec.data.sampling import ResumableBatchSampler, batch_generator
from data2vec.data.tables import TABLE_SUFFIXES, RowSpec, TableRows, table_files
from data2vec.data.workers import ignore_stop_signals
from data2vec.modalities.text import draw_text_masks
from data2vec.tokenizer import TextTokenizer
from data2vec.writes import write_text_atomic, writing

PLAIN_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TSV_SUFFIXES = (".tsv",)
TEXT_SUFFIXES = PLAIN_SUFFIXES + JSONL_SUFFIXES + TSV_SUFFIXES + TABLE_SUFFIXES
ENCODE_CHUNK = 2_000
"""Pieces tokenised per call (the Rust tokenizer encodes a chunk in parallel)."""
ENCODE_CHARS = 1_000_000
"""Characters per call, at most about (the tokenizer's output per character is ~100x larger)."""
PIECE_CHARS = 1_000
"""The longest piece of a document handed to the tokenizer at once."""

RecordError = Callable[[BadInputError], None]


def list_text_files(path: str | Path) -> list[Path]:
    """The file itself, every text/JSONL/TSV/parquet/arrow file under a folder (recursive,
    sorted), or the parquet/arrow files a glob matches."""
    if any(ch in str(path) for ch in "*?["):
        return [Path(f) for f in table_files(path)]
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if p.is_file():
        return [p]
    # Hidden files and folders under `path` are left out (data/index.py); a hidden folder above it is not.
    files = [Path(f) for f in sorted_table(walk_files(p, TEXT_SUFFIXES), sep=os.sep)]
    if not files:
        raise ValueError(f"{path}: no text files found (looked for {', '.join(TEXT_SUFFIXES)})")
    return files


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line without its newline), strict UTF-8 (a leading BOM is dropped)."""
    check_file(path, empty_ok=True)  # missing, a looping symbolic link, a folder: said plainly
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise BadInputError(str(path), f"cannot be read ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadInputError(
                    str(path), f"not UTF-8 text (line {lineno}, byte 0x{raw[e.start]:02x}: {e.reason})"
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            yield lineno, line.rstrip("\r\n")


def split_long(text: str, limit: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `limit` characters. A piece ends where a run of
    whitespace begins (the last such run in the second half of its window): byte-level BPE
    pre-tokenises there anyway, so the pieces' ids are the whole text's. Without one (a long
    run of letters, say) it is cut at `limit`. Short texts come back whole."""
    start, n = 0, len(text)
    while n - start > limit:
        end = start + limit
        ws = max(text.rfind(c, start + limit // 2, end + 1) for c in " \n\t\r")
        cut = start + len(text[start:ws].rstrip()) if ws > start else start  # start of ws's run
        if cut > start:
            end = cut
        yield text[start:end]
        start = end
    yield text[start:]


def _fail(error: BadInputError) -> None:
    raise error


def _table_documents(path: Path, column: str, on_record_error: RecordError) -> Iterator[str]:
    """The documents of a parquet/arrow file, a row group at a time (data/tables.py)."""
    try:
        rows = TableRows(str(path), RowSpec("text", column))
    except BadInputError:
        raise
    except ValueError:  # no rows at all
        raise BadInputError(str(path), "empty: no documents") from None
    for index, value in rows.iter_values():
        if isinstance(value, BadInputError):
            on_record_error(value)
        elif not isinstance(value, str) or not value.strip():
            on_record_error(BadInputError(rows.name(index), "empty document" if value is not None else "null value"))
        else:
            yield value.strip()


def read_documents(
    path: str | Path, dcfg: TextDataConfig, on_record_error: RecordError = _fail, column: str = ""
) -> Iterator[str]:
    """The documents of one file, by its suffix. File-level problems raise `BadInputError`;
    bad records (JSONL/TSV/parquet rows) go to `on_record_error`, which raises or records them.
    `column`: a parquet/arrow file's text column ("" = found from its schema)."""
    p = Path(path)
    suffix = p.suffix.lower()
    count = 0
    if suffix in TABLE_SUFFIXES:
        for doc in _table_documents(p, column, on_record_error):
            count += 1
            yield doc
    elif suffix in JSONL_SUFFIXES:
        field = dcfg.jsonl_field
        for lineno, line in _lines(p):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                on_record_error(BadInputError(where, f"not valid JSON ({e.msg})"))
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                on_record_error(BadInputError(where, f"no string field {field!r} (set data.text.jsonl_field)"))
            elif not text.strip():
                on_record_error(BadInputError(where, "empty document"))
            else:
                count += 1
                yield text.strip()
    elif suffix in TSV_SUFFIXES:
        lines = _lines(p)
        header = next(lines, None)
        if header is None:
            raise BadInputError(str(p), "empty file (no header line)")
        columns = header[1].split("\t")
        if dcfg.tsv_column not in columns:
            raise BadInputError(
                str(p),
                f"no column {dcfg.tsv_column!r} in the header (columns: {', '.join(columns)}); "
                "set data.text.tsv_column",
            )
        col = columns.index(dcfg.tsv_column)
        for lineno, line in lines:
            if not line.strip():
                continue
            cells = line.split("\t")
            text = cells[col].strip() if col < len(cells) else ""
            if not text:
                on_record_error(BadInputError(f"{p}:{lineno}", "empty document"))
                continue
            count += 1
            yield text
    elif dcfg.document == "file":
        text = "\n".join(line for _, line in _lines(p)).strip()
        if not text:
            raise BadInputError(str(p), "empty document")
        count += 1
        yield text
    else:
        for _, line in _lines(p):
            if line.strip():
                count += 1
                yield line.strip()
    if count == 0:
        raise BadInputError(str(p), "empty: no documents")


def wrap_document(ids: Iterable[int], bos_id: int, eos_id: int, max_len: int) -> list[int]:
    """One document's token ids as the model reads it alone: <s> + ids + </s>, the ids cut so
    that the whole fits in `max_len` positions (fine-tuning, probes, feature extraction)."""
    return [bos_id, *list(ids)[: max_len - 2], eos_id]


class CorpusStats(NamedTuple):
    tokens: int
    documents: int
    files: int
    skipped: list[str]


def tokenize_corpus(
    files: Iterable[Path],
    tokenizer: TextTokenizer,
    dcfg: TextDataConfig,
    on_bad_input: str,
    out: Path,
    column: str = "",
) -> CorpusStats:
    """Stream every document through the tokenizer into `out` (flat token ids, each document
    followed by </s>), reading lazily so memory stays flat; metadata goes to out.json."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    skipped: list[str] = []
    n_tokens = n_docs = n_files = 0

    def record_error(e: BadInputError) -> None:
        if on_bad_input == "fail":
            raise e
        skipped.append(str(e))

    eos = tokenizer.eos_id
    with writing(out, "the token cache"), open(out, "wb") as f:
        for path in files:
            start, file_tokens, file_docs, file_skipped = f.tell(), 0, 0, len(skipped)
            try:
                # (piece, last piece of its document?): long documents go to the tokenizer in pieces
                pieces = (
                    (piece, last)
                    for doc in read_documents(path, dcfg, record_error, column)
                    for piece, last in _with_last(split_long(doc))
                )
                chunk: list[tuple[str, bool]] = []
                doc_tokens = 0
                while True:
                    chunk.clear()
                    chars = 0
                    for item in pieces:
                        chunk.append(item)
                        chars += len(item[0])
                        if len(chunk) == ENCODE_CHUNK or chars >= ENCODE_CHARS:
                            break
                    if not chunk:
                        break
                    encoded = tokenizer.encode_batch([piece for piece, _ in chunk])
                    for ids, (_, last) in zip(encoded, chunk, strict=True):
                        arr = np.asarray([*ids, eos] if last else ids, dtype=dtype)
                        if last and doc_tokens + len(ids) == 0:  # e.g. a tokenizer that drops every character
                            file_docs += 1
                            record_error(BadInputError(str(path), f"document {file_docs} has no tokens"))
                            continue
                        arr.tofile(f)
                        file_tokens += len(arr)
                        doc_tokens += len(ids)
                        if last:
                            file_docs += 1
                            doc_tokens = 0
            except BadInputError as e:
                if on_bad_input == "fail":
                    raise
                f.seek(start)  # skip the whole file: forget what it had added
                f.truncate()
                del skipped[file_skipped:]
                skipped.append(str(e))
                continue
            n_tokens += file_tokens
            n_docs += file_docs
            n_files += 1
    stats = CorpusStats(n_tokens, n_docs, n_files, skipped)
    meta = {"dtype": np.dtype(dtype).name, **stats._asdict()}
    write_text_atomic(out.with_suffix(".json"), json.dumps(meta, indent=1) + "\n", "the token cache")
    return stats


def _with_last(items: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """Each item with whether it is the last one."""
    it = iter(items)
    prev = next(it, None)
    if prev is None:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def _training_texts(files: list[Path], dcfg: TextDataConfig, on_bad_input: str, column: str) -> Iterator[str]:
    """Documents (long ones in pieces) for tokenizer training, up to `tokenizer_train_bytes` of text."""
    budget = dcfg.tokenizer_train_bytes
    for path in files:
        try:
            for doc in read_documents(path, dcfg, _fail if on_bad_input == "fail" else lambda e: None, column):
                for piece in split_long(doc):
                    yield piece
                    budget -= len(piece)
                    if budget <= 0:
                        return
        except BadInputError:
            if on_bad_input == "fail":
                raise
            # under skip the tokenisation pass reports it


class PackedBlocks:
    """Random access to blocks of `block_size` ids: [<s>] + the next block_size - 1 ids of the stream."""

    def __init__(self, cache: str | Path, block_size: int, bos_id: int, pad_id: int) -> None:
        self.cache = Path(cache)
        meta_path = self.cache.with_suffix(".json")
        if not self.cache.is_file() or not meta_path.is_file():
            raise FileNotFoundError(f"{self.cache}: the tokenised corpus is missing (was the run prepared?)")
        meta = json.loads(meta_path.read_text())
        self.meta: dict[str, Any] = meta
        self.dtype = np.dtype(meta["dtype"])
        self.n_tokens = int(meta["tokens"])
        self.skipped: list[str] = list(meta.get("skipped", []))
        if self.n_tokens == 0:
            raise ValueError(f"{self.cache}: the corpus has no tokens")
        self.block_size, self.bos_id, self.pad_id = block_size, bos_id, pad_id
        self.span = block_size - 1
        self.num_blocks = max(1, self.n_tokens // self.span)
        self._ids: np.ndarray | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.num_blocks

    def _memmap(self) -> np.ndarray:
        if self._ids is None or self._pid != os.getpid():  # a fresh map in each loader worker
            self._ids = np.memmap(self.cache, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
            self._pid = os.getpid()
        return self._ids

    def __getitem__(self, k: int) -> Tensor:
        if not 0 <= k < self.num_blocks:
            raise IndexError(f"block {k} out of range ({self.num_blocks} blocks)")
        ids = self._memmap()[k * self.span : (k + 1) * self.span].astype(np.int64)
        out = torch.full((self.block_size,), self.pad_id, dtype=torch.long)
        out[0] = self.bos_id
        out[1 : 1 + len(ids)] = torch.from_numpy(ids)
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ids": None, "_pid": -1}


class _Item(NamedTuple):
    ids: Tensor
    seed: int


class BlockDataset(Dataset[_Item]):
    def __init__(self, blocks: PackedBlocks) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, item: tuple[int, int]) -> _Item:
        index, seed = item
        return _Item(self.blocks[index], seed)


class TextCollate:
    """Blocks -> PretrainBatch(clean ids, masks, [], padding or None, corrupted ids (1.0))."""

    def __init__(self, masking: MaskingConfig, text: TextConfig, version: int) -> None:
        self.masking, self.text, self.version = masking, text, version

    def __call__(self, items: list[_Item]) -> PretrainBatch:
        ids = torch.stack([it.ids for it in items])
        pad = ids.eq(self.text.pad_id)
        g = batch_generator([it.seed for it in items])
        m = draw_text_masks(ids, self.masking, self.text, self.version, g)
        return PretrainBatch(ids, m.mask, [], pad if bool(pad.any()) else None, m.student_inputs)


class TextBatches:
    """The loader's batches. Inputs skipped while tokenising ride on the first batch of a fresh
    run (so the run's summary counts them once); `notes` describes the corpus for the log."""

    def __init__(self, batches: Iterator[PretrainBatch], skipped: list[str], notes: list[str]) -> None:
        self.batches, self.skipped, self.notes = batches, skipped, notes

    def __iter__(self) -> TextBatches:
        return self

    def __next__(self) -> PretrainBatch:
        batch = next(self.batches)
        if self.skipped:
            batch = batch._replace(skipped=[*self.skipped, *batch.skipped])
            self.skipped = []
        return batch


class TextPipeline:
    """The text modality's `PretrainPipeline`."""

    def check(self, cfg: RunConfig) -> None:
        if not cfg.data.path:
            raise FileNotFoundError("data.path: no data given (pass --data PATH)")
        list_text_files(cfg.data.path)
        tok = cfg.data.text.tokenizer
        if tok and not Path(tok).exists():
            raise FileNotFoundError(f"{tok}: no such tokenizer file or folder (data.text.tokenizer)")

    def prepare(self, cfg: RunConfig, run_dir: Path) -> RunConfig:
        """Tokenizer (loaded or trained) and tokenised corpus into `run_dir`; the model's
        vocabulary and special ids come from the tokenizer."""
        self.check(cfg)
        dcfg = cfg.data.text
        files = list_text_files(cfg.data.path)
        run_dir = run_dir.resolve()
        if dcfg.tokenizer:
            tokenizer = TextTokenizer.load(dcfg.tokenizer)
        else:
            texts = _training_texts(files, dcfg, cfg.data.on_bad_input, cfg.data.column)
            tokenizer = TextTokenizer.train(texts, dcfg.vocab_size)
        tok_path = run_dir / "tokenizer.json"
        with writing(tok_path, "the tokenizer"):
            tokenizer.save(tok_path)
        cache = run_dir / "tokens.bin"
        stats = tokenize_corpus(files, tokenizer, dcfg, cfg.data.on_bad_input, cache, cfg.data.column)
        if stats.tokens == 0:  # a BadInputError: one line, as for the other modalities
            why = (
                f"{len(stats.skipped)} bad input(s) skipped, the first: {stats.skipped[0]}"
                if stats.skipped
                else "its files hold no tokens"
            )
            raise BadInputError(cfg.data.path, f"no usable text ({why})")
        text = replace(
            cfg.model.text,
            vocab_size=tokenizer.vocab_size,
            bos_id=tokenizer.bos_id,
            pad_id=tokenizer.pad_id,
            eos_id=tokenizer.eos_id,
            unk_id=tokenizer.unk_id,
            mask_id=tokenizer.mask_id,
        )
        data_text = replace(dcfg, tokenizer=str(tok_path), token_cache=str(cache))
        return replace(cfg, model=replace(cfg.model, text=text), data=replace(cfg.data, text=data_text))

    def loader(
        self, cfg: RunConfig, start_batch: int, rank: int, world_size: int
    ) -> tuple[Iterator[PretrainBatch], int]:
        tcfg, dcfg = cfg.model.text, cfg.data
        if not dcfg.text.token_cache:
            raise ValueError("data.text.token_cache: not set; the text pipeline's prepare() builds it")
        blocks = PackedBlocks(dcfg.text.token_cache, dcfg.text.block_size, tcfg.bos_id, tcfg.pad_id)
        sampler = ResumableBatchSampler(
            len(blocks), dcfg.batch_size, cfg.train.seed, start_batch, rank=rank, world_size=world_size
        )
        loader_kwargs: dict[str, Any] = {}
        if dcfg.num_workers > 0:
            loader_kwargs = {"persistent_workers": True, "prefetch_factor": 4}
            # Workers never tokenise; this keeps `tokenizers` quiet about forking after it ran threads.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = DataLoader(
            BlockDataset(blocks),
            batch_sampler=sampler,
            collate_fn=TextCollate(cfg.masking, tcfg, cfg.model.version),
            num_workers=dcfg.num_workers,
            worker_init_fn=ignore_stop_signals,
            generator=torch.Generator().manual_seed(cfg.train.seed),
            **loader_kwargs,
        )
        meta = blocks.meta
        notes = [
            f"text: {len(blocks)} blocks of {blocks.block_size} tokens from {meta['tokens']:,} tokens, "
            f"{meta['documents']:,} documents in {meta['files']} file(s); vocabulary {tcfg.vocab_size:,}"
        ]
        skipped = blocks.skipped if start_batch == 0 else []
        return TextBatches(iter(loader), skipped, notes), len(blocks)
