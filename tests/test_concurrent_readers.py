"""Readers beside a writer: a row rewritten while it is read is read again or left out, never served
torn (chunks of one write with the record of another) nor reported as damage; train --follow."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, copy_store

from boxrefine.shared.store.feature_store import FeatureStore, open_store
from boxrefine.shared.store.rows import StoreRows, collate_rows
from boxrefine.shared.store.schema import FIELD, STATE_COMPLETE
from boxrefine.shared.store.split import SplitStore


def _reference_rows(store: Path, split: str) -> dict[int, dict]:
    sp = open_store(str(store)).split(split)
    out = {}
    for i in sp.complete_indices().tolist():
        emb, interm = sp.read_features(i)
        masks, boxes, info = sp.read_gt(i)
        out[i] = {"emb": emb, "interm": interm, "masks": masks, "boxes": boxes, "info": info}
    return out


def _assert_whole(item: dict, ref: dict) -> str:
    """The item is version A (as extracted) or B (features negated, first instance only) of its row,
    entirely: never features of one with the GT or sizes of the other. Returns "A" or "B"."""
    n = len(item["gt_boxes"])
    assert len(item["gt_info"]) == n and len(item["gt_masks"]) == n
    version = "A" if n == len(ref["boxes"]) else "B"
    sign = 1 if version == "A" else -1
    assert torch.equal(item["image_embeddings"], sign * ref["emb"])
    assert torch.equal(item["interm_embeddings"], sign * ref["interm"])
    k = len(ref["boxes"]) if version == "A" else 1
    np.testing.assert_array_equal(item["gt_boxes"].numpy(), ref["boxes"][:k])
    np.testing.assert_array_equal(item["gt_info"].numpy(), ref["info"][:k])
    np.testing.assert_array_equal(item["gt_masks"].numpy(), ref["masks"][:k])
    return version


def _rewrite(split: SplitStore, i: int, ref: dict, version: str) -> None:
    """Rewrite row i as extract does (clear, chunks, commit with the next generation)."""
    rec = split.read_record(i).copy()
    gen = int(rec[FIELD["generation"]]) + 1
    split.clear_row(i, gen)
    sign, k = (1, len(ref["boxes"])) if version == "A" else (-1, 1)
    digests = split.write_features(i, (sign * ref["emb"]).numpy(), (sign * ref["interm"]).numpy())
    digests.update(split.write_gt(i, ref["masks"][:k], ref["boxes"][:k], ref["info"][:k]))
    record = {name: int(rec[FIELD[name]]) for name in ("state", "src_size", "src_mtime_ns", "ann_hash", "orig_h",
                                                    "orig_w", "input_h", "input_w")}
    split.commit_row(i, {**record, "n_instances": k, "generation": gen, **digests})


def test_row_rewritten_between_record_and_chunks_is_read_again(reference_store, tmp_path, monkeypatch):
    """The reader's record (from opening the split) is older than the chunks it reads: served in the
    new version, whole; before row generations this was reported as damage."""
    store = copy_store(reference_store, tmp_path)
    ref = _reference_rows(store, "train")
    ds = StoreRows.from_store(str(store), "train", with_masks=True)
    writer = FeatureStore.open(str(store), "a").split("train")
    _rewrite(writer, 1, ref[1], "B")  # after the reader opened the split
    item = ds[ds.rows.index(1)]
    assert "damage" not in item and _assert_whole(item, ref[1]) == "B"
    assert item["geometry"] is not None and int(ds.split().read_record(1)[FIELD["generation"]]) == 2

    # rewritten *while* its chunks are read: between the features and the GT
    real = SplitStore.read_gt
    calls = {"n": 0}

    def rewrite_midway(self, i, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            _rewrite(writer, 2, ref[2], "B")
        return real(self, i, *a, **k)

    monkeypatch.setattr(SplitStore, "read_gt", rewrite_midway)
    item = ds[ds.rows.index(2)]
    assert "damage" not in item and _assert_whole(item, ref[2]) == "B" and calls["n"] == 2


def test_row_cleared_while_read_is_left_out_not_damage(reference_store, tmp_path, monkeypatch, capsys):
    store = copy_store(reference_store, tmp_path)
    ds = StoreRows.from_store(str(store), "train")
    writer = FeatureStore.open(str(store), "a").split("train")
    real = SplitStore.read_gt

    def clear_midway(self, i, *a, **k):
        writer.clear_row(i, int(writer.read_record(i)[FIELD["generation"]]) + 1)  # a rewrite has begun
        return real(self, i, *a, **k)

    monkeypatch.setattr(SplitStore, "read_gt", clear_midway)
    item = ds[0]
    assert item.get("busy") and "damage" not in item
    batch = ds.accept(collate_rows([item]))
    assert batch is None and ds.busy == {item["row"]} and not ds.skipped
    assert "being rewritten" in capsys.readouterr().err


@pytest.mark.slow
def test_rows_rewritten_in_a_loop_by_another_process_are_never_served_torn(reference_store, tmp_path):
    """A writer process rewrites every row again and again (extract's own row writer); a reader reads
    them meanwhile: every row it returns is one write, whole (sizes, keys, GT and features agree)."""
    store = copy_store(reference_store, tmp_path)
    ref = _reference_rows(store, "train")
    stop = tmp_path / "stop"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "rewrite_rows.py"), str(store), "train", str(stop),
                             "120"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = {"A": 0, "B": 0}
    busy = 0
    try:
        deadline = time.monotonic() + 90
        while (seen["B"] < 5 or seen["A"] < 5) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            ds = StoreRows.from_store(str(store), "train", with_masks=True)  # a fresh epoch
            for k in range(len(ds)):
                item = ds[k]
                assert "damage" not in item, item["damage"]
                if item.get("busy"):
                    busy += 1
                    continue
                seen[_assert_whole(item, ref[item["row"]])] += 1
    finally:
        stop.touch()
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert int(out.split()[-1]) > 0
    assert seen["A"] >= 5 and seen["B"] >= 5, (seen, busy)


def test_complete_rows_of_the_index_are_checked_against_their_records(reference_store, tmp_path):
    """The row index may lag: a row it lists as complete that has been cleared since is left out."""
    store = copy_store(reference_store, tmp_path)
    sp = FeatureStore.open(str(store), "a").split("train")
    sp.clear_row(0, 5)  # not through extract: the index still says complete
    ds = StoreRows.from_store(str(store), "train")
    assert 0 in ds.rows and int(ds.records[0, FIELD["state"]]) == STATE_COMPLETE
    assert ds[ds.rows.index(0)].get("busy")
