"""The row index (shared/store/row_index.py): opening a split costs a bounded number of reads whatever its
row count (counted, not timed), the parts of several writers merge by generation, and rows the index
does not cover are read from their own records."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr.storage
from tiny_store import S, tiny_identity

from boxrefine.shared.config import StoreConfig
from boxrefine.shared.data.records import ImageRecord
from boxrefine.shared.store.feature_store import FeatureStore, open_store
from boxrefine.shared.store.row_index import INDEX, IndexPart, read_index
from boxrefine.shared.store.schema import FIELD, ROW_FIELDS, STATE_COMPLETE, STATE_DAMAGED
from boxrefine.shared.store.split import SplitStore


def synthetic_split(path: Path, n: int, index: bool = True) -> SplitStore:
    """A split of ``n`` rows whose records say complete (no chunks: only the records are read here),
    with the row index extract writes (part ``shard-0-of-1``) unless ``index`` is False."""
    store = FeatureStore.open_or_create(StoreConfig(path=str(path), gt_mask_size=S), tiny_identity(),
                                        {"kind": "random-init", "seed": 0}, {"note": "row index test"})
    recs = [ImageRecord(image_id=i + 1, file_name=f"img_{i:06d}.jpg", key=1000 + i, height=480, width=640,
                        instances=(), ann_hash=7) for i in range(n)]
    split = store.layout_split("train", recs, {"path": "synthetic.json", "sha256": "0"}, "/images", 8)
    rows = np.zeros((n, len(ROW_FIELDS)), np.int64)
    rows[:, FIELD["state"]], rows[:, FIELD["generation"]], rows[:, FIELD["orig_h"]] = STATE_COMPLETE, 1, 480
    rows[:, FIELD["src_size"]] = np.arange(n)
    split.array("rows")[:] = rows  # one record chunk per row, as extract's commits leave them
    if index:
        part = IndexPart(split, (0, 1))
        part.load(split.read_rows())
        part.flush()
    return split


@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every read of a local store (zarr's LocalStore.get), by the array it touches."""
    reads: Counter[str] = Counter()
    real = zarr.storage.LocalStore.get

    async def get(self: Any, key: str, *a: Any, **k: Any) -> Any:
        parts = key.split("/")
        reads["rows chunks" if "rows" in parts and "c" in parts else "other"] += 1
        return await real(self, key, *a, **k)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)
    return reads


def _open_reads(path: Path, reads: Counter[str]) -> tuple[int, int, np.ndarray]:
    reads.clear()
    records, complete = open_store(str(path)).split("train").usable_rows("error")
    return reads["rows chunks"], reads["other"], complete


def test_opening_a_split_costs_the_same_reads_for_300_or_3000_rows(tmp_path, count_reads):
    counts = {}
    for n in (300, 3000):
        synthetic_split(tmp_path / f"s{n}.zarr", n)
        row_chunks, other, complete = _open_reads(tmp_path / f"s{n}.zarr", count_reads)
        assert len(complete) == n
        counts[n] = (row_chunks, other)
    assert counts[300] == counts[3000], counts
    assert counts[3000][0] == 0 and counts[3000][1] < 40, counts

    # without the index (a store written before it, or its folder lost) every record is read: one per row
    shutil.rmtree(tmp_path / "s3000.zarr" / "train" / INDEX)
    row_chunks, _, complete = _open_reads(tmp_path / "s3000.zarr", count_reads)
    assert len(complete) == 3000 and row_chunks == 3000


def test_parts_merge_by_generation_and_uncovered_rows_are_read(tmp_path):
    split = synthetic_split(tmp_path / "s.zarr", 40)
    # a second writer (shard 1 of 2) knows a newer generation of its rows: row 3 damaged, row 5 rewritten
    part = IndexPart(split, (1, 2))
    part.load(split.read_rows())
    part.set(3, split.mark(3, STATE_DAMAGED, 2))
    part.set(5, split.commit_row(5, {"state": STATE_COMPLETE, "src_size": 555, "generation": 2}))
    split.mark(4, STATE_DAMAGED, 2)  # not through any part: the index still says complete
    part.flush()
    merged, covered = read_index(open_store(str(tmp_path / "s.zarr")).split("train"))
    assert covered.all()
    assert merged[3, FIELD["state"]] == STATE_DAMAGED and merged[5, FIELD["src_size"]] == 555
    assert merged[4, FIELD["state"]] == STATE_COMPLETE  # stale: a reader checks its record (test_concurrent_readers)

    # rows appended after the index was written are read from their own records
    recs = [ImageRecord(image_id=i + 1, file_name=f"img_{i:06d}.jpg", key=1000 + i, height=480, width=640,
                        instances=(), ann_hash=7) for i in range(45)]
    store = FeatureStore.open(str(tmp_path / "s.zarr"), "a")
    grown = store.layout_split("train", recs, {"path": "synthetic.json", "sha256": "0"}, "/images", 8)
    grown.commit_row(44, {"state": STATE_COMPLETE, "src_size": 4444, "generation": 1})
    records = open_store(str(tmp_path / "s.zarr")).split("train").records()
    assert records.shape[0] == 45 and records[44, FIELD["src_size"]] == 4444 and records[43, FIELD["state"]] == 0
