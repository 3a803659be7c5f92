"""The store's integrity checks and row protocol on tiny stores made in the test: every row
array's digest is checked (a missing or swapped chunk of ``gt_masks`` is damage, as one of the
embeddings is), verify and repair, records that fail their checksum or are lost, generations, states,
bad-image reports, usable rows (layout growth and the codecs: ``test_store_layout.py``). Behaviour
only, through the store's public methods, so that a rewrite of the read path keeps these tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from tiny_store import C, S, make_images, make_row, new_store, read_all, write_row

from boxrefine.shared.store import direct
from boxrefine.shared.store.bad_images import bad_images, record_bad_images, shard_reports
from boxrefine.shared.store.codecs import (
    digest,
    require_group,
    to_storage,
)
from boxrefine.shared.store.feature_store import FeatureStore, open_store
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.row_index import IndexPart, read_index
from boxrefine.shared.store.schema import (
    DIGEST,
    FIELD,
    ROW_ARRAYS,
    ROW_FIELDS,
    STATE_BAD,
    STATE_COMPLETE,
    STATE_DAMAGED,
    STATE_EMPTY,
    STATE_STALE,
)
from boxrefine.shared.store.split import RowBusy, StoreDamage
from boxrefine.shared.store.verify import check_row, count_rows, lost_records, verify_store


def _chunk_files(store_path: Path, split: str, array: str, row: int) -> list[Path]:
    """The files of row ``row``'s chunk of ``array`` (zarr v3, one chunk per row)."""
    base = store_path / split / array / "c" / str(row)
    return [p for p in base.rglob("*") if p.is_file()] if base.is_dir() else [p for p in [base] if p.is_file()]


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, dict[int, dict[str, Any]]]:
    """A store whose rows 0-2 are complete (row 3 empty)."""
    _, split = new_store(tmp_path)
    rows = {i: make_row(i) for i in range(3)}
    for i, row in rows.items():
        write_row(split, i, row)
    return tmp_path / "features.zarr", rows


def _said(capsys: pytest.CaptureFixture) -> str:
    """What the console printed (to stderr or stdout), on one line."""
    c = capsys.readouterr()
    return " ".join((c.out + c.err).split())


# ----------------------------------------------------------------------------- row digests, every array


@pytest.mark.parametrize("array", ROW_ARRAYS)
def test_a_missing_chunk_of_any_row_array_is_damage_naming_it(filled, array: str) -> None:
    """A missing chunk reads as the fill value, which no chunk checksum sees: the row's digest of that
    array must (gt_masks as much as the embeddings)."""
    path, _ = filled
    files = _chunk_files(path, "train", array, 1)
    assert files, f"no chunk file of {array} row 1"
    for f in files:
        f.unlink()
    split = open_store(str(path)).split("train")
    with pytest.raises(StoreDamage, match=f"row 1 .*array {array}: its values differ") as e:
        read_all(split, 1)
    assert (e.value.split, e.value.row, e.value.array) == ("train", 1, array)
    read_all(split, 0)  # the other rows are fine
    read_all(split, 2)
    report = verify_store(open_store(str(path)))
    assert [(d.row, d.array) for d in report.damaged] == [(1, array)] and not report.clean
    assert report.checked == 3


@pytest.mark.parametrize("array", ROW_ARRAYS)
def test_a_chunk_swapped_with_another_rows_is_damage(filled, array: str) -> None:
    """Row 2's chunk copied over row 1's: valid bytes (its crc32c passes), wrong values."""
    path, _ = filled
    src, dst = _chunk_files(path, "train", array, 2), _chunk_files(path, "train", array, 1)
    assert len(src) == len(dst) == 1
    dst[0].write_bytes(src[0].read_bytes())
    split = open_store(str(path)).split("train")
    with pytest.raises(StoreDamage, match=f"array {array}"):
        read_all(split, 1)
    record = split.read_record(1)
    with pytest.raises(StoreDamage, match=f"array {array}"):
        split.read_row(1, record)


@pytest.mark.parametrize("array", ROW_ARRAYS)
def test_a_flipped_byte_fails_the_chunk_checksum(filled, array: str) -> None:
    path, _ = filled
    f = _chunk_files(path, "train", array, 0)[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    split = open_store(str(path)).split("train")
    with pytest.raises(StoreDamage, match="row 0 .*crc32c|row 0 .*cannot be decoded|row 0 .*values differ"):
        read_all(split, 0)


@pytest.mark.parametrize("direct_reads", [True, False])
def test_rows_read_back_exactly_with_their_instances_only(filled, direct_reads: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct, "ENABLED", direct_reads)  # False: every read through zarr's indexing
    path, rows = filled
    split = open_store(str(path)).split("train")
    for i, row in rows.items():
        emb, interm = split.read_features(i)
        assert torch.equal(emb, row["emb"].half()) and torch.equal(interm, row["interm"].half())
        masks, boxes, info = split.read_gt(i)
        np.testing.assert_array_equal(masks, row["masks"])
        np.testing.assert_array_equal(boxes, row["boxes"])
        np.testing.assert_array_equal(info, row["info"])
        assert boxes.dtype == np.float32 and info.dtype == np.int64 and boxes.shape == (2, 4)
        none, b2, i2 = split.read_gt(i, masks=False)
        assert none is None and np.array_equal(b2, boxes) and np.array_equal(i2, info)
        record, parts = split.read_row(i, split.read_record(i), features=False)
        assert parts[0] is None and parts[1] is None and np.array_equal(parts[2], row["masks"])
        _, parts = split.read_row(i, split.read_record(i), masks=False)
        assert parts[2] is None and torch.equal(parts[0], row["emb"].half())
    # padding of the instances the row does not have: empty masks, NaN boxes, -1 info
    raw = zarr.open_group(str(path), mode="r")["train"]
    assert not raw["gt_masks"][0, 2:].any() and np.isnan(raw["gt_boxes"][0, 2:]).all()
    assert (raw["gt_info"][0, 2:] == -1).all()


def test_write_gt_digests_cover_the_instances_only(tmp_path: Path) -> None:
    _, split = new_store(tmp_path)
    row = make_row(1, k=2)
    d = split.write_gt(0, row["masks"], row["boxes"], row["info"])
    assert d == {DIGEST["gt_masks"]: digest(row["masks"]), DIGEST["gt_boxes"]: digest(row["boxes"]),
                 DIGEST["gt_info"]: digest(row["info"])}
    with pytest.raises(StoreError, match="row 1 has 4 instances, layout holds 3"):
        split.write_gt(1, np.zeros((4, S, S), np.uint8), np.zeros((4, 4), np.float32), np.zeros((4, 3), np.int64))
    f = split.write_features(0, to_storage(row["emb"], "float16"), to_storage(row["interm"], "float16"))
    assert f == {DIGEST["image_embeddings"]: digest(to_storage(row["emb"], "float16")),
                 DIGEST["interm_embeddings"]: digest(to_storage(row["interm"], "float16"))}


# ------------------------------------------------------------------------------------ records


def test_a_record_failing_its_checksum_reads_as_damaged(filled) -> None:
    path, _ = filled
    f = _chunk_files(path, "train", "rows", 1)[0]
    data = bytearray(f.read_bytes())
    data[0] ^= 0xFF
    f.write_bytes(bytes(data))
    split = open_store(str(path)).split("train")
    records = split.read_rows()
    assert records[:, FIELD["state"]].tolist() == [STATE_COMPLETE, STATE_DAMAGED, STATE_COMPLETE, STATE_EMPTY]
    assert list(split.damaged_records) == [1] and split.damaged_records[1].array == "rows"
    only = split.read_rows(np.array([0, 1]))
    assert only[:, FIELD["state"]].tolist() == [STATE_COMPLETE, STATE_DAMAGED, STATE_EMPTY, STATE_EMPTY]
    np.testing.assert_array_equal(split.complete_indices(), [0, 2])
    with pytest.raises(StoreDamage, match="row 1"):
        split.usable_rows("error")
    records, complete = split.usable_rows("skip")
    assert complete.tolist() == [0, 2]
    report = verify_store(open_store(str(path)))
    assert [d.row for d in report.damaged] == [1] and report.checked == 3
    assert split.next_generation(1) == 1  # an unreadable record counts as generation 0 (no row index here)
    # a clean read after a failed one forgets the failure
    assert split.read_rows(np.array([0]))[0, FIELD["state"]] == STATE_COMPLETE and not split.damaged_records


def test_verify_repair_marks_damaged_rows_with_a_new_generation(filled) -> None:
    path, _ = filled
    for row in (1, 2):
        for f in _chunk_files(path, "train", "gt_masks", row):
            f.unlink()
    report = verify_store(FeatureStore.open(str(path), "a"), repair=True)
    assert report.repaired == 2 and [d.row for d in report.damaged] == [1, 2]
    split = open_store(str(path)).split("train")
    rec = split.read_rows()
    assert rec[:, FIELD["state"]].tolist() == [STATE_COMPLETE, STATE_DAMAGED, STATE_DAMAGED, STATE_EMPTY]
    assert rec[2, FIELD["generation"]] == 2 and rec[0, FIELD["generation"]] == 1
    assert split.records()[2, FIELD["state"]] == STATE_DAMAGED  # readers learn of it through the row index
    merged, covered = read_index(split)  # every repaired row, odd and even
    assert covered[1:3].all() and (merged[1:3, FIELD["state"]] == STATE_DAMAGED).all()
    again = verify_store(open_store(str(path)))
    assert again.clean and again.checked == 1 and again.repaired == 0
    assert count_rows(open_store(str(path))) == 1
    assert check_row(split, 0) is None


def test_verify_without_repair_changes_nothing_and_counts_progress(filled) -> None:
    path, _ = filled
    for f in _chunk_files(path, "train", "gt_boxes", 0):
        f.unlink()
    before = open_store(str(path)).split("train").read_rows()
    calls = []
    report = verify_store(open_store(str(path)), ["train"], on_row=lambda: calls.append(1))
    assert len(calls) == 3 and report.repaired == 0 and [d.array for d in report.damaged] == ["gt_boxes"]
    np.testing.assert_array_equal(open_store(str(path)).split("train").read_rows(), before)


def test_verify_reports_a_damaged_index_array_of_the_split(filled) -> None:
    path, _ = filled
    val = FeatureStore.open(str(path), "a").layout_split("val", make_images(2), {"path": "none.json", "sha256": "ab"},
                                                         "/images", C)
    write_row(val, 1, make_row(5))  # a later split: still walked after the first one's problem
    for f in _chunk_files(path, "val", "gt_boxes", 1):
        f.unlink()
    f = [p for p in (path / "train" / "keys").rglob("*") if p.is_file() and p.name != "zarr.json"][0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    report = verify_store(open_store(str(path)))
    assert len(report.split_problems) == 1 and not report.clean
    assert [(d.split, d.row) for d in report.damaged] == [("val", 1)] and report.checked == 1
    train = open_store(str(path)).split("train")
    assert train.describe_row(0) == "image unknown: the split's index arrays are damaged"
    assert "array keys" in str(report.split_problems[0]) and "rebuild the store" in str(report.split_problems[0])


def test_a_lost_record_is_damage_while_the_index_says_it_was_written(filled) -> None:
    path, _ = filled
    store = FeatureStore.open(str(path), "a")
    split = store.split("train")
    part = IndexPart(split, (0, 1))
    part.load(split.read_rows())
    part.flush()
    known = split.records()[1].copy()
    for f in _chunk_files(path, "train", "rows", 1):
        f.unlink()
    split = open_store(str(path)).split("train")
    lost = lost_records(split, split.read_rows())
    assert list(lost) == [1] and "record is missing" in str(lost[1]) and "complete, generation 1" in str(lost[1])
    with pytest.raises(StoreDamage, match="record is missing"):
        split.read_row(1, known)
    report = verify_store(open_store(str(path)))
    assert [d.row for d in report.damaged] == [1]
    assert split.next_generation(1) == 2  # the index's generation counts when the record is gone


def test_read_row_rereads_a_row_rewritten_meanwhile_and_never_serves_it_torn(filled) -> None:
    path, rows = filled
    split = FeatureStore.open(str(path), "a").split("train")
    old = split.read_record(0)
    new = write_row(split, 0, make_row(7), generation=2)  # rewritten after the reader took its record
    record, parts = split.read_row(0, old)
    np.testing.assert_array_equal(record, new)
    assert torch.equal(parts[0], make_row(7)["emb"].half())
    split.clear_row(0, 3)  # a rewrite has begun: not complete now
    with pytest.raises(RowBusy) as e:
        split.read_row(0, new)
    assert e.value.row == 0 and e.value.record[FIELD["state"]] == STATE_EMPTY
    with pytest.raises(RowBusy):
        split.read_row(0, new, retries=0)


def test_generations_clear_mark_and_commit(tmp_path: Path) -> None:
    _, split = new_store(tmp_path)
    assert split.next_generation(0) == 1
    write_row(split, 0, make_row(0), generation=1)
    assert split.next_generation(0) == 2
    split.clear_row(0, 2)
    rec = split.read_record(0)
    assert rec[FIELD["state"]] == STATE_EMPTY and rec[FIELD["generation"]] == 2 and rec.sum() == 2
    assert split.next_generation(0) == 3
    marked = split.mark_damaged(0)
    assert marked[FIELD["state"]] == STATE_DAMAGED and marked[FIELD["generation"]] == 3
    seen = []
    split.watch_records(lambda i, r: seen.append((i, r.copy())))
    committed = split.commit_row(1, {"state": STATE_BAD, "src_size": 9, "generation": 4})
    assert seen and seen[-1][0] == 1 and np.array_equal(seen[-1][1], committed)
    assert committed[FIELD["src_size"]] == 9 and committed[FIELD["state"]] == STATE_BAD
    assert len(committed) == len(ROW_FIELDS)
    np.testing.assert_array_equal(split.read_record(1), committed)
    split.clear_row(1)
    assert split.read_record(1).sum() == 0



def test_bad_image_reports_merge_shards_and_keep_only_rows_still_bad(tmp_path: Path) -> None:
    _, split = new_store(tmp_path)  # row keys 5000..5003
    assert bad_images(split) == {}
    record_bad_images(split, "shard-0-of-2", {5000: {"file": "img000.png", "reason": "truncated"}})
    record_bad_images(split, "shard-1-of-2", {5001: {"file": "img001.png", "reason": "missing"},
                                              5003: {"file": "img003.png", "reason": "corrupt"}})
    assert bad_images(split) == {}  # no row is marked bad yet
    split.commit_row(0, {"state": STATE_BAD, "generation": 1})
    split.commit_row(1, {"state": STATE_BAD, "generation": 1})
    write_row(split, 3, make_row(3))  # re-extracted since its report: no longer bad
    assert bad_images(split) == {5000: {"file": "img000.png", "reason": "truncated"},
                                 5001: {"file": "img001.png", "reason": "missing"}}
    record_bad_images(split, "shard-1-of-2", {})  # a shard's reports are replaced whole
    assert bad_images(split) == {5000: {"file": "img000.png", "reason": "truncated"}}


def test_a_shards_own_reports_are_all_it_recorded_and_none_before(tmp_path: Path) -> None:
    """What extract merges a shard's new bad images into: every report that shard recorded, whatever the
    rows say now; nothing for a shard (or a split) that has recorded none."""
    _, split = new_store(tmp_path)
    assert shard_reports(split, "shard-0-of-2") == {}  # no report of any shard yet
    record_bad_images(split, "shard-1-of-2", {5001: {"file": "img001.png", "reason": "missing"}})
    assert shard_reports(split, "shard-0-of-2") == {}  # another shard's reports are not this one's
    assert shard_reports(split, "shard-1-of-2") == {5001: {"file": "img001.png", "reason": "missing"}}


# ------------------------------------------------------------------------------------ usable rows


def test_usable_rows_refuse_an_empty_split_and_count_the_rest(tmp_path: Path, capsys) -> None:
    _, split = new_store(tmp_path)
    with pytest.raises(StoreError, match=r"split 'train' has no complete rows \(0 of 4 images\); run extract"):
        split.usable_rows()
    split.commit_row(3, {"state": STATE_BAD, "generation": 1})
    with pytest.raises(StoreError, match=r"0 of 4 images; 1 bad, listed by"):
        split.usable_rows()
    write_row(split, 0, make_row(0))
    split.mark(2, STATE_STALE, 1)  # left the annotations: not counted as an image
    records, complete = split.usable_rows()
    assert complete.tolist() == [0] and len(records) == 4
    assert "1 of 3 images complete; run extract (1 bad" in _said(capsys)
    write_row(split, 1, make_row(1))
    capsys.readouterr()
    _, complete = split.usable_rows()
    out = _said(capsys)
    assert complete.tolist() == [0, 1] and "2 of 3 images complete (1 bad" in out and "run extract" not in out
    split.commit_row(3, {"state": STATE_EMPTY, "generation": 2})
    write_row(split, 3, make_row(3))
    capsys.readouterr()
    split.usable_rows()
    assert "images complete" not in _said(capsys)


def test_a_store_path_is_printed_verbatim(tmp_path: Path, capsys) -> None:
    where = tmp_path / "[bold]x"
    where.mkdir()
    _, split = new_store(where)
    write_row(split, 0, make_row(0))
    split.usable_rows()
    assert "[bold]x/features.zarr: split 'train': 1 of 4 images complete" in _said(capsys)
    f = _chunk_files(where / "features.zarr", "train", "rows", 0)[0]
    f.write_bytes(bytes([f.read_bytes()[0] ^ 0xFF]) + f.read_bytes()[1:])
    with pytest.raises(StoreError):
        open_store(str(where / "features.zarr")).split("train").usable_rows("skip")  # no complete row left
    said = _said(capsys)
    assert "skipped (store.on_damage: skip): " in said and said.count("[bold]x/features.zarr") >= 2


def test_an_environment_fault_of_a_direct_read_is_one_line(filled, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = filled
    split = open_store(str(path)).split("train")

    def refused(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(split.direct, "read", refused)
    with pytest.raises(StoreError, match=r"cannot read train/(rows|image_embeddings): .*ermission denied"):
        split.read_features(0)


def test_arrays_left_by_an_unpublished_layout_are_laid_out_anew(tmp_path: Path) -> None:
    store, split = new_store(tmp_path, images=make_images(2, k=2))
    split.group.attrs.__delitem__("layout")  # a layout that stopped before publishing itself
    again = store.layout_split("train", make_images(3, k=2), {"path": "a.json", "sha256": "cd"}, "/images", C)
    assert again.keys().tolist() == [5000, 5001, 5002] and again.group.attrs["layout"]["n_rows"] == 3


def test_ground_truth_and_annotation_checks(tmp_path: Path, capsys) -> None:
    _, split = new_store(tmp_path)
    assert split.annotations_sha256 == "ab" and split.has_ground_truth
    split.require_ground_truth()
    ann = tmp_path / "ann.json"
    ann.write_text("{}")
    with pytest.raises(StoreError, match=r"annotations changed since extract .*has sha256 ab…, the file "
                                         r"[0-9a-f]{12}…\)"):
        split.check_annotations(ann)
    long = {**split.group.attrs["annotations"], "sha256": "0123456789abcdef" * 4}
    split.group.attrs["annotations"] = long
    with pytest.raises(StoreError, match=r"has sha256 0123456789ab…, the file"):
        split.check_annotations(ann)
    split.check_annotations(tmp_path / "[bold]missing.json")
    assert "[bold]missing.json: annotations not readable" in _said(capsys)  # the path printed verbatim
    split.group.attrs["annotations"] = {"path": None, "sha256": "x", "ground_truth": False}
    assert not split.has_ground_truth
    with pytest.raises(StoreError, match="holds images only .*from /images"):
        split.require_ground_truth()
    split.group.attrs["annotations"] = {"path": "/data/photos.json", "sha256": "x", "ground_truth": False}
    with pytest.raises(StoreError, match="holds images only .*from /data/photos.json"):
        split.require_ground_truth()  # an images-only COCO file is named, not the image folder
    import hashlib

    split.group.attrs["annotations"] = {"path": str(ann), "sha256": hashlib.sha256(b"{}").hexdigest()}
    split.check_annotations(ann)
    assert split.has_ground_truth


def test_local_rows_are_read_directly_not_through_zarr(filled, monkeypatch: pytest.MonkeyPatch) -> None:
    path, rows = filled
    split = open_store(str(path)).split("train")
    through_zarr: list[str] = []
    get = split._get
    monkeypatch.setattr(split, "_get", lambda name, sel, row: through_zarr.append(name) or get(name, sel, row))
    split.read_row(0, split.read_record(0))
    assert not set(through_zarr) & set(ROW_ARRAYS)


def test_require_group_takes_the_group_another_process_created_meanwhile(tmp_path: Path) -> None:
    from zarr.errors import ContainsGroupError

    root = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    made = root.create_group("row_index")

    class Racing:  # another process created the group between the check and the create
        def require_group(self, name: str) -> zarr.Group:
            raise ContainsGroupError(name)

        def __getitem__(self, name: str) -> zarr.Group:
            return root[name]

    assert require_group(Racing(), "row_index").path == made.path
    assert require_group(root, "row_index").path == made.path
