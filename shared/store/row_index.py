"""The row index: a consolidated copy of a split's row records, so that opening a split costs a few
requests, not one per row (docs/architecture.md, "The row index").

The per-row records (``rows``, one chunk per row, each row's commit) stay the truth. The index is an
optimisation kept by the processes that know the records, each in its own *part* (no process ever
rewrites another's part, so concurrent writers lose no update):

    <split>/row_index/<part>   (N, len(ROW_FIELDS)) int64, INDEX_CHUNK rows per chunk
                               attrs: shard [i, n] (the rows it covers: i, i+n, ...), n_rows, written_ns

``extract`` writes the part of its shard (``shard-i-of-n``) from the records it read at planning plus
the ones it committed, every ``FLUSH_S`` seconds while it works and when a split is done;
``store verify`` writes part ``verify``. A reader merges the parts: for each row the record with the
highest generation (ties: the part written last); rows no part covers (appended since, or a split
without index) are read from their own records.

Staleness: a part lags the commits of a running extract by at most ``FLUSH_S`` (and those of one
killed with -9 until the next extract plans the split and rewrites its part), so a reader may miss
rows completed meanwhile and may list a row rewritten or cleared meanwhile. The second is harmless:
every read checks the row's own record after reading its chunks (``SplitStore.read_row``), so an
index entry is never trusted for content. Extract plans from the records themselves.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import numpy as np
import zarr
from zarr.errors import ContainsArrayError, ContainsGroupError

from boxrefine.shared.store.codecs import compressors, require_group
from boxrefine.shared.store.location import store_access
from boxrefine.shared.store.schema import FIELD, INDEX_CHUNK, ROW_FIELDS


class IndexedSplit(Protocol):
    """What the row index needs of a split: ``shared/store/split.py``'s SplitStore has this shape (it
    reads its records through this module, so this module does not import it)."""

    group: zarr.Group
    name: str
    store_path: str

    @property
    def n_rows(self) -> int: ...

    def read_rows(self, rows: np.ndarray | None = None) -> np.ndarray: ...


INDEX = "row_index"
FLUSH_S = 30.0  # a running extract rewrites its part at least this often (when it committed rows)


def part_name(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]}-of-{shard[1]}"


def _covered(shard: tuple[int, int], n_rows: int, n: int) -> np.ndarray:
    rows = np.arange(n)
    return (rows < n_rows) & (rows % shard[1] == shard[0])


def read_index(split: IndexedSplit) -> tuple[np.ndarray, np.ndarray] | None:
    """(merged records N×F, covered N bool) from the split's index parts, or None when it has none.
    A part that cannot be read is ignored (its rows are then read from their records)."""
    try:
        with store_access(split.store_path, f"read the row index of {split.name}"):
            grp = split.group[INDEX]
            parts = list(grp.arrays())
    except KeyError:
        return None
    n = split.n_rows
    merged = np.zeros((n, len(ROW_FIELDS)), np.int64)
    best = np.full((n, 2), -1, np.int64)  # (generation, written_ns) of the record taken for each row
    covered = np.zeros(n, bool)
    for _, arr in parts:
        try:
            attrs = arr.attrs.asdict()
            shard, n_rows, written = tuple(attrs["shard"]), int(attrs["n_rows"]), int(attrs["written_ns"])
            if arr.shape[1] != len(ROW_FIELDS):
                continue
            m = min(n, int(arr.shape[0]), n_rows)
            recs = np.asarray(arr[:m])
        except Exception:  # a damaged or half-written part is only a missed optimisation
            continue
        cov = _covered(shard, n_rows, m)
        gen = recs[:, FIELD["generation"]]
        take = cov & ((gen > best[:m, 0]) | ((gen == best[:m, 0]) & (written > best[:m, 1])))
        merged[:m][take] = recs[take]
        best[:m][take] = np.stack([gen[take], np.full(int(take.sum()), written)], axis=1)
        covered[:m] |= cov
    return merged, covered


class IndexPart:
    """What one process knows of the records of the rows it covers (``shard``): set from the records it
    read, updated on every commit (thread-safe), written as its part of the index by :meth:`flush`."""
    def __init__(self, split: IndexedSplit, shard: tuple[int, int], name: str | None = None):
        self.split, self.shard, self.name = split, shard, name or part_name(shard)
        self.known = np.zeros((split.n_rows, len(ROW_FIELDS)), np.int64)
        self.dirty, self.last_flush = False, time.monotonic()
        self.lock = threading.Lock()

    def load(self, records: np.ndarray) -> None:
        """Start from ``records`` (all rows, read from their records); dirty when the index differs."""
        cov = _covered(self.shard, len(records), len(records))
        self.known = np.array(records, np.int64)
        index = read_index(self.split)
        self.dirty = index is None or not (index[1][cov].all() and np.array_equal(index[0][cov], self.known[cov]))

    def grow(self, split: IndexedSplit, marked: dict[int, np.ndarray]) -> np.ndarray:
        """Bring what this process knows up to date with ``split`` (laid out again): rows added since are
        read from their records, ``marked`` records (rows the layout marked stale) taken, and records of
        the index with a newer generation (another process marked the row: ``store verify --repair``)
        taken. Returns all the records."""

        self.split = split
        with self.lock:
            n_old, n = self.known.shape[0], split.n_rows
            if n > n_old:
                new = split.read_rows(np.arange(n_old, n))
                self.known = np.concatenate([self.known, new[n_old:]])
                self.dirty = True
            for i, rec in marked.items():
                self.known[i] = rec
                self.dirty = True
            index = read_index(split)
            if index is not None:
                newer = index[1] & (index[0][:, FIELD["generation"]] > self.known[:, FIELD["generation"]])
                self.known[newer] = index[0][newer]
            return self.known.copy()

    def set(self, i: int, record: np.ndarray) -> None:
        with self.lock:
            self.known[i] = record
            self.dirty = True

    def records(self) -> np.ndarray:
        with self.lock:
            return self.known.copy()

    def maybe_flush(self) -> None:
        if self.dirty and time.monotonic() - self.last_flush >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Write this part when it changed since the last write."""
        if not self.dirty:
            return
        with self.lock:
            known, self.dirty = self.known.copy(), False
        try:
            with store_access(self.split.store_path, f"write the row index of {self.split.name}"):
                write_part(self.split, self.name, self.shard, known)
        except BaseException:
            self.dirty = True
            raise
        self.last_flush = time.monotonic()


def write_part(split: IndexedSplit, name: str, shard: tuple[int, int], records: np.ndarray) -> None:
    n, width = records.shape
    grp = require_group(split.group, INDEX)  # safe when another shard creates it at the same moment
    try:
        arr = grp.create_array(name, shape=(n, width), chunks=(INDEX_CHUNK, width), dtype=np.int64, fill_value=0,
                               compressors=compressors("zstd", 3, 8), overwrite=False)
    except (ContainsArrayError, ContainsGroupError, FileExistsError):
        arr = grp[name]
        if not isinstance(arr, zarr.Array) or arr.shape[1] != width:
            raise
        if arr.shape[0] != n:
            arr.resize((n, width))
    if n:
        arr[:] = records
    arr.attrs.put({"shard": list(shard), "n_rows": int(n), "written_ns": time.time_ns()})
