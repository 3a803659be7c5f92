"""Stale inputs are refused, never used: changed annotations, changed detections, a changed image
size, an old store schema, another intensity mapping, and images that decode to almost nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import zarr
from conftest import make_config

from boxrefine.extract.run import run_extract
from boxrefine.shared.scoring.coarse import fixed_coarse_boxes, load_coarse_boxes
from boxrefine.shared.store.feature_store import open_store
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.rows import StoreRows
from boxrefine.shared.store.schema import FIELD, STATE_COMPLETE
from boxrefine.train.recipe import run_train


def _copy(reference_store: Path, tmp_path: Path) -> Path:
    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    return store


def _train_cfg(data: Path, store: Path, tmp_path: Path):
    return make_config(data, store, train={"runs_dir": str(tmp_path / "runs"), "epochs": 1, "num_workers": 0,
                                           "boxes_per_image": 2, "name": "r"},
                       refiner={"use_mask": False, "hidden": 32})


def test_changed_annotations_are_refused_until_extract_rewrites_gt(reference_store, data_copy, tmp_path,
                                                                    monkeypatch):
    """Train and evaluate stop on GT extracted from another version of the annotation file; extract
    then rewrites only the GT (no encoder), and training runs."""
    from boxrefine.evaluate.run import run_evaluate

    store = _copy(reference_store, tmp_path)
    ann = data_copy / "annotations" / "instances_val.json"
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["bbox"][0] += 5.0
    ann.write_text(json.dumps(coco))
    cfg = _train_cfg(data_copy, store, tmp_path)
    with pytest.raises(StoreError, match=r"instances_val\.json: annotations changed since extract.*GT only, no "
                                         "encoder work"):
        run_train(cfg)
    assert not (tmp_path / "runs" / "r").exists()
    (tmp_path / "x.pt").write_bytes(b"never read: the store is refused first")
    with pytest.raises(StoreError, match="annotations changed since extract"):
        run_evaluate(cfg, tmp_path / "x.pt")
    monkeypatch.setattr("boxrefine.extract.run.build_hq_sam", lambda *a, **k: pytest.fail("encoder built"))
    res = run_extract(cfg)
    assert res.encoded == 0 and sum(s.gt_only for s in res.splits) == 1
    monkeypatch.undo()
    assert run_train(cfg).epochs_done == 1


def test_changed_image_size_in_annotations_reencodes(reference_store, data_copy, tmp_path, sam):
    """The GT-only rewrite is taken only while the annotated size is the stored one."""
    store = _copy(reference_store, tmp_path)
    img = data_copy / "images" / "val" / "val_0000.jpg"
    ann = data_copy / "annotations" / "instances_val.json"
    coco = json.loads(ann.read_text())
    im = coco["images"][0]
    small = cv2.resize(cv2.imread(str(img)), (im["width"] // 2, im["height"] // 2))
    st = img.stat()
    assert cv2.imwrite(str(img), small)
    import os

    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))  # a resize that kept the file's mtime...
    im["width"], im["height"] = im["width"] // 2, im["height"] // 2
    for a in coco["annotations"]:
        a["bbox"] = [v / 2 for v in a["bbox"]]
        a["segmentation"] = []  # box-only after the resize
    ann.write_text(json.dumps(coco))
    res = run_extract(make_config(data_copy, store), model=sam)
    val = next(s for s in res.splits if s.split == "val")
    assert (val.encoded, val.gt_only) == (1, 0)  # ...is re-encoded, not given new GT over old features
    rec = open_store(str(store)).split("val").read_rows()[0]
    assert (rec[FIELD["orig_h"]], rec[FIELD["orig_w"]]) == (im["height"], im["width"])


def test_eval_boxes_are_rebuilt_when_their_inputs_change(reference_store, data_copy, tmp_path, capsys):
    store = _copy(reference_store, tmp_path)
    cfg = make_config(data_copy, store)
    ds = StoreRows.from_store(str(store), "val")
    path = tmp_path / "eval_boxes_val.json"
    first = fixed_coarse_boxes(cfg, "val", ds, path)
    _, meta = load_coarse_boxes(path)
    assert set(meta["provenance"]) == {"annotations_sha256", "detections_sha256", "layout_sha256"}
    again = fixed_coarse_boxes(cfg, "val", ds, path)  # same inputs: read back
    assert all(torch.equal(first[k].boxes, again[k].boxes) for k in first)
    dets_path = data_copy / "annotations" / "detections_val.json"
    dets = json.loads(dets_path.read_text())
    dets[0]["bbox"][0] += 7.0
    dets_path.write_text(json.dumps(dets))
    rebuilt = fixed_coarse_boxes(cfg, "val", ds, path)
    assert "came from other detections" in capsys.readouterr().err
    key = next(iter(rebuilt))
    assert not torch.equal(first[key].boxes, rebuilt[key].boxes)
    assert load_coarse_boxes(path)[1]["provenance"] != meta["provenance"]


def _write_schema_1(reference_store: Path, dst: Path) -> None:
    """A store as the previous release wrote it: schema 1, no intensity in the identity, no crc32c codec,
    9-field row records, GT masks in the old layout (here: the new masks shifted by one low-res pixel)."""
    from zarr.codecs import BloscCodec

    ref = zarr.open_group(str(reference_store), mode="r")
    old = zarr.open_group(str(dst), mode="w", zarr_format=3)
    ident = dict(ref.attrs["identity"])
    ident.pop("intensity")
    old.attrs.put({**ref.attrs.asdict(), "boxrefine": {"schema_version": 1, "tool_version": "0.1.0"},
                   "identity": ident})
    blosc = BloscCodec(cname="zstd", clevel=3)
    for name in ("train", "val"):
        src, grp = ref[name], old.create_group(name)
        grp.attrs.put(src.attrs.asdict())
        for arr in ("keys", "image_ids", "rows", "image_embeddings", "interm_embeddings", "gt_masks", "gt_boxes",
                    "gt_info"):
            data = np.asarray(src[arr][:])
            if arr == "rows":
                data = data[:, :9]
            if arr == "gt_masks":
                data = np.roll(data, 1, axis=-1)
            chunks = (max(1, data.shape[0]),) if data.ndim == 1 else (1, *data.shape[1:])
            grp.create_array(arr, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=blosc)[:] = data


def test_schema_1_store_is_refused_and_rebuilt_without_encoder_work_for_8bit_images(
        reference_store, demo_root, tmp_path, sam, monkeypatch):
    """A schema-1 store (no checksums, GT half a pixel off) is refused with the command that rebuilds
    it; that command copies the features of unchanged 8-bit images (the default percentile mapping
    changes only the 16-bit PNG, which is re-encoded), recomputes all GT, and gives the store a fresh
    extract gives."""
    old = tmp_path / "old.zarr"
    _write_schema_1(reference_store, old)
    with pytest.raises(StoreError, match=r"store schema 1; .*--reuse-features"):
        run_train(_train_cfg(demo_root, old, tmp_path))
    encoded_files: list[str] = []
    import boxrefine.extract.run as er

    real = er.Extractor._encode

    def spy(self, split, batch, writer):
        encoded_files.extend(job.path.name for job, *_ in batch)
        return real(self, split, batch, writer)

    monkeypatch.setattr(er.Extractor, "_encode", spy)
    new = tmp_path / "new.zarr"
    res = run_extract(make_config(demo_root, new, extract={"reuse_features": str(old)}), model=sam)
    assert encoded_files == ["train_0003.png"] and sum(s.reused for s in res.splits) == 4
    st, ref = open_store(str(new)), open_store(str(reference_store))
    assert st.identity == ref.identity
    for name in ("train", "val"):
        a, b = st.split(name), ref.split(name)
        assert (a.read_rows()[:, FIELD["state"]] == STATE_COMPLETE).all()
        np.testing.assert_array_equal(a.array("gt_masks")[:], b.array("gt_masks")[:])
        for i in range(a.n_rows):  # every row reads back through its checksums
            np.testing.assert_allclose(a.read_features(i)[0].float(), b.read_features(i)[0].float(), atol=2e-3)
    # features computed differently cannot be reused, naming the difference
    with pytest.raises(StoreError, match="cannot reuse its features.*checkpoint: that store has 'random-init:seed=0'"):
        run_extract(make_config(demo_root, tmp_path / "other.zarr", model={"seed": 1},
                                extract={"reuse_features": str(old)}))


def test_intensity_mapping_is_part_of_the_store_identity(reference_store, demo_root, tmp_path):
    store = _copy(reference_store, tmp_path)
    cfg = make_config(demo_root, store, data={"intensity": {"mode": "range", "range": [0, 4095]}})
    with pytest.raises(StoreError, match="intensity: store has 'percentile:0.5-99.5', config gives 'range:0-4095'"):
        run_extract(cfg)


def test_an_image_with_almost_no_grey_levels_is_warned_about(data_copy, tmp_path, sam, capsys):
    img = data_copy / "images" / "val" / "val_0000.jpg"
    h, w = cv2.imread(str(img)).shape[:2]
    flat = np.zeros((h, w), np.uint16)
    flat[: h // 2] = 3  # a 16-bit image with two values: no mapping can make it more than 2 levels
    target = img.with_suffix(".png")
    assert cv2.imwrite(str(target), flat)
    img.unlink()
    ann = data_copy / "annotations" / "instances_val.json"
    ann.write_text(ann.read_text().replace("val_0000.jpg", "val_0000.png"))
    run_extract(make_config(data_copy, tmp_path / "s.zarr", extract={"splits": ["val"]}), model=sam)
    err = capsys.readouterr().err
    assert f"{target}: decodes to only 2 grey level(s)" in err
