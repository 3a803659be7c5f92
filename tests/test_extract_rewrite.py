"""The crash protocol as extract runs it: watched from the store while extract rewrites a complete
row, every chunk of the row is written while the row's record on disk says "not complete" with the new
generation (step 1, clearing the record, came first), and the record that ends the rewrite is complete.
The concurrent-reader tests clear rows by hand; these watch extract do it, for a GT-only rewrite (the
annotations changed) and for a re-encoded image."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import make_config

from boxrefine.extract.run import run_extract
from boxrefine.shared.store.schema import FIELD, STATE_COMPLETE
from boxrefine.shared.store.split import SplitStore


def _record_on_disk(store: Path, split: str, row: int) -> np.ndarray:
    """The row's record as a reader opening the store now would read it (zarr, not boxrefine's reader)."""
    return np.asarray(zarr.open_group(str(store), mode="r")[split]["rows"][row])


@pytest.fixture
def watch_writes(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every chunk write of a row by extract, with the row's record on disk at that moment."""
    seen: list[dict[str, Any]] = []
    for name in ("write_features", "write_gt"):
        real = getattr(SplitStore, name)

        def spy(self: SplitStore, i: int, *args: Any, _real: Any = real, _name: str = name) -> Any:
            seen.append({"call": _name, "split": self.name, "row": i,
                         "record": _record_on_disk(Path(self.store_path), self.name, i).copy()})
            return _real(self, i, *args)

        monkeypatch.setattr(SplitStore, name, spy)
    return seen


def _assert_cleared_first(seen: list[dict[str, Any]], store: Path, split: str, row: int, old: np.ndarray,
                          calls: set[str]) -> None:
    mine = [s for s in seen if (s["split"], s["row"]) == (split, row)]
    assert {s["call"] for s in mine} == calls, seen
    new_generation = int(old[FIELD["generation"]]) + 1
    for s in mine:
        rec = s["record"]
        assert rec[FIELD["state"]] != STATE_COMPLETE, f"{s['call']} of a complete row before its record was cleared"
        assert rec[FIELD["generation"]] == new_generation, "the clearing write carries the new generation"
    after = _record_on_disk(store, split, row)
    assert after[FIELD["state"]] == STATE_COMPLETE and after[FIELD["generation"]] == new_generation


def test_gt_only_rewrite_clears_the_record_before_writing_chunks(reference_store: Path, data_copy: Path,
                                                                  tmp_path: Path, watch_writes) -> None:
    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    old = _record_on_disk(store, "val", 0)
    assert old[FIELD["state"]] == STATE_COMPLETE
    ann = data_copy / "annotations" / "instances_val.json"
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["bbox"][0] += 3.0
    ann.write_text(json.dumps(coco))
    res = run_extract(make_config(data_copy, store))
    assert (res.encoded, sum(s.gt_only for s in res.splits)) == (0, 1)
    _assert_cleared_first(watch_writes, store, "val", 0, old, {"write_gt"})


def test_reencoded_row_is_cleared_before_its_chunks_are_written(reference_store: Path, data_copy: Path,
                                                                 tmp_path: Path, sam, watch_writes) -> None:
    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    old = _record_on_disk(store, "val", 0)
    img = next((data_copy / "images" / "val").iterdir())
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed: encode it again
    res = run_extract(make_config(data_copy, store), model=sam)
    assert res.encoded == 1
    _assert_cleared_first(watch_writes, store, "val", 0, old, {"write_features", "write_gt"})
