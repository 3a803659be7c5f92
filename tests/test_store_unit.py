"""shared/store/feature_store.py without the encoder: rows written with random arrays and read back, the commit
protocol, layout idempotence and growth, stale rows, identity checks; on a local path and on an
fsspec ``memory://`` URL."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_store import S, tiny_identity  # S: gt_mask_size (smallest allowed), tiny GT arrays

from boxrefine.shared.config import StoreConfig
from boxrefine.shared.data.records import SplitRecords, load_coco
from boxrefine.shared.store.codecs import from_storage, to_storage
from boxrefine.shared.store.feature_store import FeatureStore, open_store
from boxrefine.shared.store.identity import StoreIdentity
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.schema import DIGEST, FIELD, ROW_FIELDS, STATE_COMPLETE, STATE_EMPTY, STATE_STALE
from boxrefine.shared.store.split import SplitStore

C = 8  # interm channels: the layout takes any count; small keeps rows cheap
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _create(path: str, dtype: str = "float16", identity: StoreIdentity | None = None, **cfg: Any) -> FeatureStore:
    return FeatureStore.open_or_create(StoreConfig(path=path, dtype=dtype, gt_mask_size=S, **cfg),
                                       identity or tiny_identity(dtype), {"kind": "random-init", "seed": 0},
                                       {"note": "unit test"})


def _layout(store: FeatureStore, recs: SplitRecords, name: str = "train", channels: int = C) -> SplitStore:
    return store.layout_split(name, recs.images, {"path": str(recs.annotations), "sha256": recs.sha256},
                              "/images/root", channels)


@pytest.fixture(params=["local", "memory"])
def store_path(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "features.zarr")
        return
    url = f"memory://teststore-{uuid.uuid4().hex}.zarr"
    yield url
    import fsspec

    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def coco(demo_root: Path) -> dict[str, Any]:
    return json.loads((demo_root / "annotations" / "instances_train.json").read_text())


@pytest.fixture
def records(demo_root: Path) -> SplitRecords:
    return load_coco(demo_root / "annotations" / "instances_train.json")


def _write_coco(tmp_path: Path, coco: dict[str, Any], name: str) -> SplitRecords:
    p = tmp_path / name
    p.write_text(json.dumps(coco))
    return load_coco(p)


def _random_row(seed: int, k: int, dtype: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    return {
        "emb": torch.randn(256, 64, 64, generator=g) * 4,
        "interm": torch.randn(64, 64, C, generator=g) * 100,
        "masks": (rng.random((k, S, S)) < 0.3).astype(np.uint8),
        "boxes": rng.uniform(0, 500, (k, 4)).astype(np.float32),
        "info": np.stack([np.arange(k) + 100, np.full(k, 2), np.zeros(k)], axis=1).astype(np.int64),
        "dtype": dtype,
    }


def _record(seed: int, k: int) -> dict[str, int]:
    return {"state": STATE_COMPLETE, "src_size": 1000 + seed, "src_mtime_ns": 10**18 + seed, "ann_hash": 77 + seed,
            "orig_h": 480, "orig_w": 640, "input_h": 768, "input_w": 1024, "n_instances": k, "generation": 1}


def _write_row(split: SplitStore, i: int, row: dict[str, Any], seed: int, commit: bool = True) -> None:
    k = len(row["boxes"])
    digests = split.write_features(i, to_storage(row["emb"], row["dtype"]), to_storage(row["interm"], row["dtype"]))
    digests.update(split.write_gt(i, row["masks"], row["boxes"], row["info"]))
    if commit:
        split.commit_row(i, {**_record(seed, k), **digests})


def _assert_row(split: SplitStore, i: int, row: dict[str, Any], seed: int) -> None:
    k = len(row["boxes"])
    want_dtype = TORCH_DTYPES[row["dtype"]]
    emb, interm = split.read_features(i)
    assert emb.dtype == want_dtype and interm.dtype == want_dtype
    assert tuple(emb.shape) == (256, 64, 64) and tuple(interm.shape) == (64, 64, C)
    assert torch.equal(emb, row["emb"].to(want_dtype))
    assert torch.equal(interm, row["interm"].to(want_dtype))
    masks, boxes, info = split.read_gt(i)
    np.testing.assert_array_equal(masks, row["masks"])
    np.testing.assert_array_equal(boxes, row["boxes"])
    np.testing.assert_array_equal(info, row["info"])
    rec = split.read_rows()[i]
    assert {f: v for f, v in zip(ROW_FIELDS, rec.tolist(), strict=True) if f not in DIGEST.values()} == \
        _record(seed, k)


# ------------------------------------------------------------------------------- write → read back


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_row_round_trip(store_path: str, records: SplitRecords, dtype: str) -> None:
    store = _create(store_path, dtype)
    if store_path.startswith("memory://"):
        assert type(store.group.store).__name__ == "FsspecStore"
    split = _layout(store, records)
    n, k_max = split.n_rows, split.max_instances
    assert n == len(records.images) == 4
    assert k_max == max(len(r.instances) for r in records.images)
    row = _random_row(1, 3, dtype)
    _write_row(split, 2, row, seed=1)

    # a fresh read-only open sees exactly what was written
    ro = open_store(store_path)
    assert ro.identity == tiny_identity(dtype)
    assert ro.attrs["storage"]["dtype"] == dtype
    sp = ro.split("train")
    assert sp.array("image_embeddings").dtype == np.dtype({"bfloat16": "uint16"}.get(dtype, dtype))
    _assert_row(sp, 2, row, seed=1)
    np.testing.assert_array_equal(sp.complete_indices(), [2])
    # padding beyond the row's instances: empty masks, NaN boxes, -1 info
    masks, boxes, info = (sp.array(a)[2] for a in ("gt_masks", "gt_boxes", "gt_info"))
    assert not masks[3:].any() and np.isnan(boxes[3:]).all() and (info[3:] == -1).all()
    # keys and image ids follow the records (file-name order)
    np.testing.assert_array_equal(sp.keys(), [r.key for r in records.images])
    np.testing.assert_array_equal(sp.image_ids(), [r.image_id for r in records.images])


def test_bfloat16_storage_keeps_bits() -> None:
    t = torch.tensor([1.0, -2.5, 3.14159, 1e30, -1e-30, 0.0, float("inf")])
    a = to_storage(t, "bfloat16")
    assert a.dtype == np.uint16
    back = from_storage(a, "bfloat16")
    assert back.dtype == torch.bfloat16
    assert torch.equal(back, t.to(torch.bfloat16))
    assert torch.equal(from_storage(to_storage(t, "float32"), "float32"), t)


def test_write_gt_refuses_more_instances_than_layout(tmp_path: Path, records: SplitRecords) -> None:
    split = _layout(_create(str(tmp_path / "s.zarr")), records)
    k = split.max_instances + 1
    with pytest.raises(StoreError, match=f"row 0 has {k} instances, layout holds {k - 1}"):
        split.write_gt(0, np.zeros((k, S, S), np.uint8), np.zeros((k, 4), np.float32), np.zeros((k, 3), np.int64))


# ------------------------------------------------------------------------------------ commit protocol


def test_uncommitted_row_is_not_complete(store_path: str, records: SplitRecords) -> None:
    split = _layout(_create(store_path), records)
    assert split.complete_indices().size == 0
    assert (split.read_rows() == 0).all()
    _write_row(split, 0, _random_row(0, 2, "float16"), seed=0, commit=False)
    _write_row(split, 1, _random_row(1, 2, "float16"), seed=1)
    np.testing.assert_array_equal(split.complete_indices(), [1])
    assert split.read_rows()[0, FIELD["state"]] == STATE_EMPTY
    # clearing a committed row withdraws it before any chunk changes
    split.clear_row(1)
    assert split.complete_indices().size == 0
    assert (split.read_rows()[1] == 0).all()


# --------------------------------------------------------------------------------------- layout


def test_layout_is_idempotent(store_path: str, records: SplitRecords) -> None:
    store = _create(store_path)
    split = _layout(store, records)
    row = _random_row(5, 2, "float16")
    _write_row(split, 3, row, seed=5)
    shapes = {name: split.array(name).shape for name in split.group.array_keys()}
    layout = split.group.attrs["layout"]
    keys = split.keys()

    again = _layout(_create(store_path), records)  # reopened, laid out a second time
    np.testing.assert_array_equal(again.keys(), keys)
    assert {name: again.array(name).shape for name in again.group.array_keys()} == shapes
    assert again.group.attrs["layout"] == layout
    _assert_row(again, 3, row, seed=5)
    assert store.splits == ["train"]


def test_layout_refuses_other_interm_channels(tmp_path: Path, records: SplitRecords) -> None:
    store = _create(str(tmp_path / "s.zarr"))
    _layout(store, records, channels=C)
    with pytest.raises(StoreError, match=f"interm_embeddings has {C} channels, model gives 16"):
        _layout(store, records, channels=16)


def test_layout_refuses_tampered_keys(tmp_path: Path, records: SplitRecords) -> None:
    store = _create(str(tmp_path / "s.zarr"))
    split = _layout(store, records)
    split.array("keys")[0] = 12345
    with pytest.raises(StoreError, match="do not match the published layout"):
        _layout(store, records)


def test_new_image_appends_one_row(store_path: str, tmp_path: Path, coco: dict[str, Any],
                                   records: SplitRecords) -> None:
    store = _create(store_path)
    split = _layout(store, records)
    old_keys = split.keys()
    old_k = split.max_instances
    row = _random_row(9, old_k, "float16")  # a full row: every instance slot used
    _write_row(split, 1, row, seed=9)

    grown = copy.deepcopy(coco)
    new_id = max(im["id"] for im in grown["images"]) + 1
    # sorts before every existing name, and has more instances than any image so far
    grown["images"].append({"id": new_id, "file_name": "a_new.jpg", "width": 64, "height": 48})
    next_ann = max(a["id"] for a in grown["annotations"]) + 1
    for j in range(old_k + 2):
        grown["annotations"].append({"id": next_ann + j, "image_id": new_id, "category_id": 1,
                                     "bbox": [j, j, 5, 5], "iscrowd": 0})
    recs2 = _write_coco(tmp_path, grown, "grown.json")

    split2 = _layout(_create(store_path), recs2)
    keys2 = split2.keys()
    assert split2.n_rows == len(old_keys) + 1
    np.testing.assert_array_equal(keys2[:-1], old_keys)  # old rows keep their positions
    new_rec = next(r for r in recs2.images if r.file_name == "a_new.jpg")
    assert keys2[-1] == new_rec.key
    assert split2.image_ids()[-1] == new_id
    assert split2.max_instances == old_k + 2
    for name in ("image_embeddings", "interm_embeddings", "gt_masks", "gt_boxes", "gt_info", "rows"):
        assert split2.array(name).shape[0] == len(old_keys) + 1
    # the committed row survives the growth untouched; the new row is empty
    _assert_row(split2, 1, row, seed=9)
    boxes, info = split2.array("gt_boxes")[1], split2.array("gt_info")[1]
    assert np.isnan(boxes[old_k:]).all() and (info[old_k:] == -1).all()
    np.testing.assert_array_equal(split2.complete_indices(), [1])
    assert split2.read_rows()[-1, FIELD["state"]] == STATE_EMPTY
    # and the new row can hold all its instances
    big = _random_row(3, old_k + 2, "float16")
    _write_row(split2, split2.n_rows - 1, big, seed=3)
    _assert_row(split2, split2.n_rows - 1, big, seed=3)


def test_removed_image_marks_row_stale(store_path: str, tmp_path: Path, coco: dict[str, Any],
                                       records: SplitRecords) -> None:
    store = _create(store_path)
    split = _layout(store, records)
    keys = split.keys()
    row0, row2 = _random_row(0, 1, "float16"), _random_row(2, 1, "float16")
    _write_row(split, 0, row0, seed=0)
    _write_row(split, 2, row2, seed=2)

    gone = records.images[2]
    shrunk = copy.deepcopy(coco)
    shrunk["images"] = [im for im in shrunk["images"] if im["id"] != gone.image_id]
    shrunk["annotations"] = [a for a in shrunk["annotations"] if a["image_id"] != gone.image_id]
    recs2 = _write_coco(tmp_path, shrunk, "shrunk.json")
    assert len(recs2.images) == len(records.images) - 1

    split2 = _layout(_create(store_path), recs2)
    np.testing.assert_array_equal(split2.keys(), keys)  # nothing moves, nothing is deleted
    states = split2.read_rows()[:, FIELD["state"]]
    assert states.tolist() == [STATE_COMPLETE, STATE_EMPTY, STATE_STALE, STATE_EMPTY]
    assert STATE_STALE == 3
    assert split2.image_ids()[2] == -1
    np.testing.assert_array_equal(split2.complete_indices(), [0])
    _assert_row(split2, 0, row0, seed=0)
    # laying out again keeps it stale (idempotent)
    split3 = _layout(_create(store_path), recs2)
    assert split3.read_rows()[2, FIELD["state"]] == STATE_STALE


# ------------------------------------------------------------------------------------ identity


def test_other_identity_refused_naming_both_values(store_path: str, records: SplitRecords) -> None:
    _write_row(_layout(_create(store_path, "float16"), records), 0, _random_row(0, 2, "float16"), seed=0)
    with pytest.raises(StoreError) as ei:
        _create(store_path, "float32")
    msg = str(ei.value)
    assert msg.startswith(f"{store_path}: ")
    assert "dtype: store has 'float16', config gives 'float32'" in msg
    with pytest.raises(StoreError) as ei:
        _create(store_path, identity=tiny_identity(checkpoint="sha256:abc", model_type="vit_b"))
    msg = str(ei.value)
    assert "checkpoint: store has 'random-init:seed=0', config gives 'sha256:abc'" in msg
    assert "model_type: store has 'vit_tiny', config gives 'vit_b'" in msg
    assert "dtype" not in msg
    # the same identity still opens, and the store is unchanged
    assert _create(store_path).identity == tiny_identity()


def test_overwrite_replaces_a_store(tmp_path: Path, records: SplitRecords) -> None:
    path = str(tmp_path / "s.zarr")
    _layout(_create(path, "float16"), records)
    store = FeatureStore.open_or_create(StoreConfig(path=path, dtype="float32", gt_mask_size=S),
                                        tiny_identity("float32"), {}, {}, overwrite=True)
    assert store.identity.dtype == "float32"
    assert store.splits == []


def test_foreign_zarr_group_refused(tmp_path: Path) -> None:
    import zarr

    path = str(tmp_path / "other.zarr")
    zarr.open_group(path, mode="w", zarr_format=3).create_group("something")
    with pytest.raises(StoreError, match="not empty and not a boxrefine feature store"):
        _create(path)


def test_unknown_split_named(tmp_path: Path, records: SplitRecords) -> None:
    store = _create(str(tmp_path / "s.zarr"))
    _layout(store, records)
    with pytest.raises(StoreError, match=r"no split 'val' in the store \(has \['train'\]\)"):
        store.split("val")


def test_open_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no feature store here"):
        open_store(str(tmp_path / "missing.zarr"))
