"""Data in the Hugging Face formats, read in place with pyarrow: parquet files (the hub's
`data/train-00000-of-00042.parquet`) and the arrow files of a `datasets` cache or a
`Dataset.save_to_disk` folder (`data-00000-of-00003.arrow`).

`data.path` is a file, a folder (searched recursively for .parquet and .arrow files, sorted), or
a glob. pyarrow is an optional extra (`pip install 'data2vec[parquet]'`).

A table is read one row group at a time (for arrow files: one record batch, memory-mapped),
never whole: `TableRows` indexes only the row counts of the row groups (a few bytes per
group, whatever the row count), and keeps the last few decoded groups of the column it reads
in a small cache. The pretraining order (`RowGroupBatchSampler`) is built for that: each
epoch shuffles the row groups, deals them to the ranks in turn (rank-sharded by row group),
and shuffles rows within a window of consecutive groups of at least `data.shuffle_buffer` rows
(the shuffle buffer). Micro-batch k is still a pure function of (seed, k), so resume is exact.

Columns are found from the table's schema (the `datasets` feature types recorded in the file
when there are any, else the arrow types): images from an `Image` feature or a struct
`{bytes, path}` or a binary column; audio from an `Audio` feature, a struct `{bytes, path}`
(wav/flac/ogg bytes) or `{array, sampling_rate}`, or a list-of-floats column with a
sampling-rate column; text from a string column. When more than one column fits,
`data.column` names it. A label column (`label` unless named) serves fine-tuning and probes;
class names recorded as a `ClassLabel` feature are used.

Bad rows (undecodable bytes, a null or empty value) and bad files (not parquet, cut short, no
such column, a row group that does not decode) raise `BadInputError` naming the file, row
group and row; under `data.on_bad_input=skip` they are left out and counted like bad files.
"""

from __future__ import annotations

import glob
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data2vec.config import ConfigError
from data2vec.data.errors import BadInputError, file_problem, stable_reason
from data2vec.data.index import sorted_table, walk_files
from data2vec.data.sampling import sample_seed
from data2vec.writes import writing

TABLE_SUFFIXES = (".parquet", ".arrow")
EXTRA_HINT = "pip install 'data2vec[parquet]'"
RATE_COLUMNS = ("sampling_rate", "sample_rate", "sr")
LABEL_COLUMNS = ("label", "labels")


def pyarrow_modules() -> tuple[Any, Any]:
    """(pyarrow, pyarrow.parquet), or a ConfigError naming the extra to install."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"data.path: parquet and arrow data need pyarrow: {EXTRA_HINT}") from None
    return pa, pq


def is_table_path(path: str | os.PathLike[str], own_suffixes: Sequence[str] = ()) -> bool:
    """Whether `path` names parquet/arrow data: such a file, a glob matching one, or a folder
    holding them and no file of the modality's own kinds (`own_suffixes`)."""
    p = str(path)
    if any(ch in p for ch in "*?["):
        return any(m.lower().endswith(TABLE_SUFFIXES) for m in glob.glob(p))
    if p.lower().endswith(TABLE_SUFFIXES):
        return True
    if not os.path.isdir(p):
        return False
    if own_suffixes and next(walk_files(p, tuple(own_suffixes)), None) is not None:
        return False
    return next(walk_files(p, TABLE_SUFFIXES), None) is not None


def table_files(path: str | os.PathLike[str]) -> list[str]:
    """The parquet/arrow files of a file, folder (recursive, sorted) or glob."""
    p = str(path)
    if any(ch in p for ch in "*?["):
        files = sorted(m for m in glob.glob(p) if m.lower().endswith(TABLE_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"{p}: no parquet or arrow files match")
        return files
    if os.path.isdir(p):
        files = list(sorted_table(walk_files(p, TABLE_SUFFIXES), sep=os.sep))
        if not files:
            raise ValueError(f"{p}: no parquet or arrow files found")
        return files
    if not os.path.lexists(p):
        raise FileNotFoundError(f"{p}: no such file or folder")
    return [p]


# ---------------------------------------------------------------------- one file


class TableFile:
    """One parquet or arrow file: its schema and row-group sizes, read from the footer (parquet)
    or the record-batch headers of a memory map (arrow); groups are decoded on demand."""

    def __init__(self, path: str) -> None:
        pa, _ = pyarrow_modules()
        self.path = path
        self.arrow = path.lower().endswith(".arrow")
        problem = file_problem(path)
        if problem is not None:
            raise BadInputError(path, problem)
        try:
            handle = self._open()
            if self.arrow:
                self.schema = handle.schema
                self.group_rows = [b.num_rows for b in handle.to_batches()]
            else:
                self.schema = handle.schema_arrow
                meta = handle.metadata
                self.group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        except (pa.ArrowException, OSError) as e:
            kind = "arrow" if self.arrow else "parquet"
            raise BadInputError(path, f"not a readable {kind} file ({stable_reason(e)})") from None
        self._handle: Any = handle
        self._pid = os.getpid()

    def _open(self) -> Any:
        pa, pq = pyarrow_modules()
        if not self.arrow:
            return pq.ParquetFile(self.path, memory_map=True)
        source = pa.memory_map(self.path)
        try:  # `datasets` writes the IPC stream format; the file format has a footer
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()

    def handle(self) -> Any:
        if self._pid != os.getpid():  # file handles do not survive a fork into loader workers
            self._handle, self._pid = self._open(), os.getpid()
        return self._handle

    def read_group(self, group: int, columns: list[str]) -> Any:
        """Row group `group`, only `columns`, as a pyarrow Table; BadInputError if it does not decode."""
        pa, _ = pyarrow_modules()
        try:
            if self.arrow:
                start = sum(self.group_rows[:group])
                return self.handle().select(columns).slice(start, self.group_rows[group])
            return self.handle().read_row_group(group, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise BadInputError(self.path, f"row group {group} does not decode ({stable_reason(e)})") from None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_pid": -1}

    def features(self) -> dict[str, Any]:
        """The `datasets` feature types recorded in the schema ({} when there are none)."""
        meta = self.schema.metadata or {}
        raw = meta.get(b"huggingface")
        if not raw:
            return {}
        try:
            info = json.loads(raw)
        except ValueError:
            return {}
        feats = (info.get("info") or {}).get("features") if isinstance(info, dict) else None
        return feats if isinstance(feats, dict) else {}


# ---------------------------------------------------------------------- columns


def _field_kind(field: Any, feature: Any) -> str:
    """'image', 'audio', 'audio-array', 'text', 'binary', 'label' or '' for one column."""
    import pyarrow as pa

    ftype = feature.get("_type") if isinstance(feature, dict) else None
    if ftype == "Image":
        return "image"
    if ftype == "Audio":
        return "audio"
    if ftype == "ClassLabel":
        return "label"
    t = field.type
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        if {"array", "sampling_rate"} <= names:
            return "audio-array"
        if "bytes" in names:
            return "binary"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_floating(t.value_type):
        return "array"
    return ""


_KINDS_FOR = {
    "image": ("image", "binary"),
    "audio": ("audio", "audio-array", "binary", "array"),
    "text": ("text",),
}


def find_column(file: TableFile, modality: str, column: str = "") -> str:
    """The column holding the `modality`'s data: `column` if given (it must exist), else the one
    column of a fitting type (a `datasets` feature of the modality's type wins)."""
    names = list(file.schema.names)
    if column:
        if column not in names:
            raise BadInputError(file.path, f"no column {column!r} (columns: {', '.join(names)}); set data.column")
        return column
    feats = file.features()
    kinds = {n: _field_kind(file.schema.field(n), feats.get(n)) for n in names}
    wanted = _KINDS_FOR[modality]
    for kind in wanted:  # the most specific kind first: an Image feature over any binary column
        fits = [n for n in names if kinds[n] == kind]
        if modality == "text" and len(fits) > 1 and "text" in fits:
            return "text"
        if len(fits) == 1:
            return str(fits[0])
        if len(fits) > 1:
            raise BadInputError(
                file.path, f"several columns could hold the {modality} data ({', '.join(fits)}); set data.column"
            )
    raise BadInputError(
        file.path,
        f"no column holds {modality} data (columns: {', '.join(f'{n}: {file.schema.field(n).type}' for n in names)}); "
        "set data.column",
    )


def find_rate_column(file: TableFile, column: str) -> str | None:
    """For a list-of-floats audio column: the column giving each row's sampling rate."""
    if _field_kind(file.schema.field(column), None) != "array":
        return None
    for name in RATE_COLUMNS:
        if name in file.schema.names:
            return name
    raise BadInputError(
        file.path,
        f"column {column!r} holds waveforms but no sampling-rate column was found "
        f"(looked for {', '.join(RATE_COLUMNS)})",
    )


def class_names(file: TableFile, column: str) -> list[str]:
    """Class names recorded for `column` as a `datasets` ClassLabel feature ([] when none)."""
    feat = file.features().get(column)
    if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" and isinstance(feat.get("names"), list):
        return [str(n) for n in feat["names"]]
    return []


def find_label_column(file: TableFile, column: str = "", names: Sequence[str] = LABEL_COLUMNS) -> str:
    """`column` (it must exist), or else the first of `names` the file has."""
    if column:
        if column not in file.schema.names:
            raise BadInputError(file.path, f"no label column {column!r} (columns: {', '.join(file.schema.names)})")
        return column
    for name in names:
        if name in file.schema.names:
            return name
    raise BadInputError(
        file.path, f"no label column (looked for {', '.join(names)}; columns: {', '.join(file.schema.names)})"
    )


# ---------------------------------------------------------------------- rows of many files


@dataclass(frozen=True)
class RowSpec:
    """Which columns a reader wants, by role: the data column (found per modality unless named),
    optional extra columns (a label, a sampling rate) and the modality."""

    modality: str
    column: str = ""
    label: bool = False
    label_column: str = ""
    label_names: tuple[str, ...] = LABEL_COLUMNS
    """Where `label_column` is "": the names a label column may have, in order of preference."""


class TableRows:
    """Random access to the rows of many parquet/arrow files, by a global row index, through a
    small cache of decoded row groups. Only the row-group sizes are indexed (memory flat in the
    row count). Files that cannot be used raise under on_bad_input=fail; under skip they are
    left out and listed in `problems`."""

    def __init__(self, path: str, spec: RowSpec, on_bad_input: str = "fail", cache_groups: int = 4) -> None:
        self.location, self.spec, self.cache_groups = path, spec, cache_groups
        self.files: list[TableFile] = []
        self.columns: list[dict[str, str]] = []
        """Per file: role -> column name ('data', and 'label', 'rate' where they apply)."""
        self.problems: list[str] = []
        self.classes: list[str] = []
        sizes: list[int] = []
        file_ids: list[int] = []
        groups: list[int] = []
        for name in table_files(path):
            try:
                f = TableFile(name)
                roles = {"data": find_column(f, spec.modality, spec.column)}
                if spec.modality == "audio":
                    rate = find_rate_column(f, roles["data"])
                    if rate:
                        roles["rate"] = rate
                if spec.label:
                    roles["label"] = find_label_column(f, spec.label_column, spec.label_names)
                    self.classes = self.classes or class_names(f, roles["label"])
            except BadInputError as e:
                if on_bad_input == "fail":
                    raise
                self.problems.append(str(e))
                continue
            for g, n in enumerate(f.group_rows):
                if n:
                    sizes.append(n)
                    file_ids.append(len(self.files))
                    groups.append(g)
            self.files.append(f)
            self.columns.append(roles)
        self.group_rows = np.asarray(sizes, dtype=np.int64)
        self.group_file = np.asarray(file_ids, dtype=np.int32)
        self.group_index = np.asarray(groups, dtype=np.int32)
        self.group_start = np.concatenate([[0], np.cumsum(self.group_rows)]).astype(np.int64)
        if not len(self):
            why = f" ({'; '.join(self.problems)})" if self.problems else ""
            raise ValueError(f"{path}: no rows found in the parquet/arrow file(s){why}")
        self._cache: OrderedDict[int, dict[str, list[Any]]] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.group_start[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(group id, row within the group) of global row `index`."""
        gid = int(np.searchsorted(self.group_start, index, side="right")) - 1
        return gid, index - int(self.group_start[gid])

    def name(self, index: int) -> str:
        gid, row = self.locate(index)
        return f"{self.files[int(self.group_file[gid])].path}: row group {int(self.group_index[gid])}, row {row}"

    def _group(self, gid: int) -> dict[str, list[Any]]:
        if self._pid != os.getpid():
            self._cache, self._pid = OrderedDict(), os.getpid()
        hit = self._cache.get(gid)
        if hit is not None:
            self._cache.move_to_end(gid)
            return hit
        fid = int(self.group_file[gid])
        roles = self.columns[fid]
        table = self.files[fid].read_group(int(self.group_index[gid]), sorted(set(roles.values())))
        values = {role: table.column(col).to_pylist() for role, col in roles.items()}
        self._cache[gid] = values
        while len(self._cache) > max(1, self.cache_groups):
            self._cache.popitem(last=False)
        return values

    def row(self, index: int, role: str = "data") -> Any:
        """The value of row `index` in its `role` column ('data', 'label', 'rate'); a row group
        that does not decode raises BadInputError naming the file, group and row."""
        gid, row = self.locate(index)
        try:
            return self._group(gid)[role][row]
        except BadInputError as e:
            raise BadInputError(self.name(index), e.reason) from None

    def iter_values(self, role: str = "data") -> Iterator[tuple[int, Any]]:
        """(global index, value) of every row in order, a row group at a time (the cache is not
        used: a pass over everything keeps one group in memory)."""
        for gid in range(len(self.group_rows)):
            fid = int(self.group_file[gid])
            start = int(self.group_start[gid])
            try:
                table = self.files[fid].read_group(int(self.group_index[gid]), [self.columns[fid][role]])
            except BadInputError as e:
                for r in range(int(self.group_rows[gid])):
                    yield start + r, BadInputError(self.name(start + r), e.reason)
                continue
            for r, value in enumerate(table.column(0).to_pylist()):
                yield start + r, value

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": OrderedDict(), "_pid": -1}


def row_bytes(value: Any, where: str) -> bytes:
    """The encoded bytes of an image/audio cell: plain binary, or the `{bytes, path}` struct (when
    the bytes are null, the file at `path` is read, as `datasets` does)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and path:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise BadInputError(
                    where, f"no bytes in the row and its path {path!r} cannot be read ({e.strerror})"
                ) from None
        value = data
    if value is None:
        raise BadInputError(where, "null value (no data in the row)")
    if not isinstance(value, (bytes, bytearray)):
        raise BadInputError(where, f"expected encoded bytes, found {type(value).__name__}")
    if not value:
        raise BadInputError(where, "empty value (0 bytes)")
    return bytes(value)


def write_dataset(data: Any, folder: str | os.PathLike[str], rows_per_group: int = 1000) -> str:
    """A `datasets.Dataset` or `IterableDataset` (duck-typed: any object with `to_parquet`) written
    once as `folder/data.parquet`, in row groups of `rows_per_group` rows, with its feature
    types; returns the file's path. A run reads the copy, so it resumes exactly even when the
    object cannot be rebuilt (a shuffled or filtered view, a stream). An IterableDataset is
    consumed to its end: cap an endless stream with `.take(n)` first."""
    to_parquet = getattr(data, "to_parquet", None)
    if not callable(to_parquet):
        raise TypeError(
            "data: expected a datasets.Dataset or IterableDataset (an object with to_parquet), "
            f"got {type(data).__name__}"
        )
    out = Path(folder) / "data.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with writing(tmp, "the dataset's parquet copy"):
        to_parquet(str(tmp), batch_size=rows_per_group)
    os.replace(tmp, out)
    return str(out)


# ---------------------------------------------------------------------- pretraining order


class RowGroupBatchSampler:
    """Micro-batches of (row index, sample seed) forever, from micro-batch `start_batch`, reading
    row groups in order (see the module doc): per epoch the groups are shuffled and dealt to
    the ranks in turn, and rows are shuffled within windows of consecutive groups holding at
    least `buffer_rows` rows. Batch k is a pure function of (seed, k). Every rank has the same
    number of batches per epoch: what the smallest possible share of groups holds."""

    def __init__(
        self,
        group_rows: np.ndarray,
        batch_size: int,
        seed: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_rows: int = 4096,
    ) -> None:
        self.group_rows = np.asarray(group_rows, dtype=np.int64)
        self.batch_size, self.seed, self.buffer_rows = batch_size, seed, max(1, buffer_rows)
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        n_groups = len(self.group_rows)
        if n_groups < world_size:
            raise ValueError(
                f"the data has {n_groups} row group(s), fewer than the {world_size} processes (data is "
                "sharded by row group); write the files with smaller row groups"
            )
        smallest_share = np.sort(self.group_rows)[: n_groups // world_size]
        self.batches_per_epoch = int(smallest_share.sum()) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the data has {int(self.group_rows.sum())} rows, fewer than one batch of {batch_size} "
                f"per process; lower data.batch_size or add data"
            )
        self.group_start = np.concatenate([[0], np.cumsum(self.group_rows)])
        # The most groups one window can hold, twice (a batch can straddle two windows): the
        # row cache each loader worker needs.
        ascending = np.cumsum(np.sort(self.group_rows))
        self.cache_groups = 2 * (int(np.searchsorted(ascending, self.buffer_rows)) + 1)

    def _windows(self, epoch: int) -> list[np.ndarray]:
        """This rank's groups for `epoch`, cut into windows (arrays of group ids)."""
        rng = np.random.default_rng(sample_seed(self.seed, epoch, 0x7FFFFFFE))
        mine = rng.permutation(len(self.group_rows))[self.rank :: self.world_size]
        windows, cur, rows = [], [], 0
        for g in mine.tolist():
            cur.append(g)
            rows += int(self.group_rows[g])
            if rows >= self.buffer_rows:
                windows.append(np.asarray(cur))
                cur, rows = [], 0
        if cur:
            windows.append(np.asarray(cur))
        return windows

    def _window_rows(self, epoch: int, w: int, groups: np.ndarray) -> np.ndarray:
        rows = np.concatenate([np.arange(self.group_start[g], self.group_start[g + 1]) for g in groups])
        return np.random.default_rng(sample_seed(self.seed, epoch, w)).permutation(rows)

    def _epoch(self, epoch: int, first: int) -> Iterator[list[tuple[int, int]]]:
        """Batches `first`, `first` + 1, ... of `epoch`, producing only the windows they need."""
        windows = self._windows(epoch)
        sizes = np.asarray([int(self.group_rows[w].sum()) for w in windows])
        ends = np.cumsum(sizes)
        pos = first * self.batch_size
        w = int(np.searchsorted(ends, pos, side="right"))
        offset = pos - (int(ends[w - 1]) if w else 0)
        pending = np.empty(0, dtype=np.int64)
        for _ in range(first, self.batches_per_epoch):
            while len(pending) < self.batch_size:
                rows = self._window_rows(epoch, w, windows[w])
                pending = np.concatenate([pending, rows[offset:]])
                w, offset = w + 1, 0
            batch, pending = pending[: self.batch_size], pending[self.batch_size :]
            yield [(int(i), sample_seed(self.seed, epoch, int(i))) for i in batch]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, j = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            yield from self._epoch(epoch, j)
            epoch, j = epoch + 1, 0
