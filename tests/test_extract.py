"""Extract stage: features equal the package's own predictor, incremental runs, bad input, GT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import make_config
from pycocotools import mask as mask_utils

from boxrefine.extract.run import ExtractError, run_extract
from boxrefine.shared.data.imageio import read_rgb
from boxrefine.shared.data.records import load_coco
from boxrefine.shared.store.bad_images import bad_images
from boxrefine.shared.store.feature_store import open_store
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.schema import FIELD, STATE_BAD, STATE_COMPLETE


def _row_of(split, file_name: str, demo_root: Path, split_name: str) -> int:
    recs = {r.file_name: r for r in load_coco(demo_root / "annotations" / f"instances_{split_name}.json").images}
    keys = split.keys().tolist()
    return keys.index(recs[file_name].key)


@pytest.mark.parametrize("file_name", ["train_0000.jpg", "train_0003.png"])
def test_features_equal_sam_predictor(reference_store, demo_root, sam, file_name):
    """The package is the oracle: SamPredictor.set_image on the same image and weights."""
    from segment_anything_hq import SamPredictor

    split = open_store(str(reference_store)).split("train")
    i = _row_of(split, file_name, demo_root, "train")
    emb, interm = split.read_features(i)
    assert emb.dtype == torch.float16 and tuple(emb.shape) == (256, 64, 64)
    assert tuple(interm.shape) == (64, 64, 160)

    predictor = SamPredictor(sam)
    predictor.set_image(read_rgb(demo_root / "images" / "train" / file_name), image_format="RGB")
    want_emb = predictor.features[0]
    want_interm = predictor.interm_features[0][0]
    torch.testing.assert_close(emb.float(), want_emb, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(interm.float(), want_interm, atol=2e-3 * float(want_interm.abs().max()), rtol=2e-3)
    # and the store really is float16 of those values (not some other rounding)
    assert torch.equal(emb, want_emb.half())


def test_store_describes_itself(reference_store):
    store = open_store(str(reference_store))
    ident = store.identity
    assert (ident.model_type, ident.checkpoint, ident.dtype, ident.img_size) == (
        "vit_tiny", "random-init:seed=0", "float16", 1024)
    assert store.attrs["checkpoint"]["kind"] == "random-init"
    assert store.attrs["storage"]["codec"] == "none"
    assert store.attrs["config"]["model"]["type"] == "vit_tiny"
    for name in ("train", "val"):
        sp = store.split(name)
        ann = sp.group.attrs["annotations"]
        assert len(ann["sha256"]) == 64 and ann["path"].endswith(f"instances_{name}.json")
        rows = sp.read_rows()
        assert (rows[:, FIELD["state"]] == STATE_COMPLETE).all()
        # one chunk per image per feature array
        assert sp.array("image_embeddings").chunks == (1, 256, 64, 64)
        assert sp.array("interm_embeddings").chunks == (1, 64, 64, 160)
    # original and resized sizes are recorded per row
    rows = store.split("train").read_rows()
    assert (np.maximum(rows[:, FIELD["input_h"]], rows[:, FIELD["input_w"]]) == 1024).all()


def test_stored_gt_is_sams_low_res_frame(reference_store, demo_root):
    """The store's GT masks, taken back to the original size with SAM's own postprocess_masks, match
    the COCO masks (per instance IoU, no shift); boxes and info match the annotations."""
    from test_geometry import sam_postprocess

    from boxrefine.shared.store.rows import row_geometry

    coco = json.loads((demo_root / "annotations" / "instances_train.json").read_text())
    split = open_store(str(reference_store)).split("train")
    rows, ids = split.read_rows(), split.image_ids()
    ious = []
    for i, image_id in enumerate(ids.tolist()):
        anns = sorted((a for a in coco["annotations"] if a["image_id"] == image_id), key=lambda a: a["id"])
        n = int(rows[i, FIELD["n_instances"]])
        assert n == len(anns)
        masks, boxes, info = split.read_gt(i)
        geo = row_geometry(rows[i])
        back = (sam_postprocess(torch.from_numpy(masks).float() - 0.5, geo) > 0).numpy()
        for j, a in enumerate(anns):
            full = mask_utils.decode({"size": a["segmentation"]["size"],
                                      "counts": a["segmentation"]["counts"].encode()}) > 0
            ious.append((back[j] & full).sum() / (back[j] | full).sum())
            x, y, w, h = a["bbox"]
            np.testing.assert_allclose(boxes[j], [x, y, x + w, y + h], rtol=1e-6)
            assert info[j].tolist() == [a["id"], a["category_id"], 0]
    assert len(ious) > 10 and np.mean(ious) > 0.9, ious


def test_second_run_does_no_encoder_work(reference_store, demo_root, tmp_path, monkeypatch):
    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise AssertionError("the encoder model must not even be built")

    monkeypatch.setattr("boxrefine.extract.run.build_hq_sam", boom)
    monkeypatch.setattr("boxrefine.extract.run.encode", boom)
    res = run_extract(make_config(demo_root, store))
    assert res.encoded == 0
    assert sum(s.skipped for s in res.splits) == 5
    chunks_after = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file() and "/c/" in str(p)}
    assert all(before[p] == t for p, t in chunks_after.items()), "no chunk may be rewritten"


def test_changed_image_is_recomputed_alone(reference_store, data_copy, tmp_path, sam):
    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    img_path = data_copy / "images" / "train" / "train_0000.jpg"
    img = cv2.imread(str(img_path))
    cv2.imwrite(str(img_path), 255 - img)  # same size, different pixels
    split_before = open_store(str(store)).split("train")
    i = _row_of(split_before, "train_0000.jpg", data_copy, "train")
    old = [split_before.read_features(r)[0].clone() for r in range(split_before.n_rows)]

    res = run_extract(make_config(data_copy, store), model=sam)
    assert res.encoded == 1
    split = open_store(str(store)).split("train")
    new = [split.read_features(r)[0] for r in range(split.n_rows)]
    for r in range(split.n_rows):
        assert torch.equal(old[r], new[r]) == (r != i)
    assert split.read_rows()[i, FIELD["src_size"]] == img_path.stat().st_size


def test_annotation_change_rewrites_gt_without_encoder(reference_store, data_copy, tmp_path, monkeypatch):
    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    ann_path = data_copy / "annotations" / "instances_val.json"
    coco = json.loads(ann_path.read_text())
    dropped = coco["annotations"].pop(0)
    ann_path.write_text(json.dumps(coco))
    monkeypatch.setattr("boxrefine.extract.run.build_hq_sam", lambda *a, **k: pytest.fail("encoder built"))
    res = run_extract(make_config(data_copy, store))
    val = next(s for s in res.splits if s.split == "val")
    assert (val.encoded, val.gt_only) == (0, 1)
    sp = open_store(str(store)).split("val")
    n = int(sp.read_rows()[0, FIELD["n_instances"]])
    assert n == len(coco["annotations"])
    assert dropped["id"] not in sp.read_gt(0)[2][:, 0].tolist()
    assert sp.group.attrs["annotations"]["sha256"] == load_coco(ann_path).sha256


@pytest.mark.parametrize("change", [{"model": {"seed": 1}}, {"store": {"dtype": "float32"}},
                                    {"model": {"type": "vit_b"}}, {"store": {"gt_mask_size": 128}}])
def test_mismatched_store_is_refused(reference_store, demo_root, tmp_path, change):
    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    cfg = make_config(demo_root, store, **change)
    with pytest.raises(StoreError) as e:
        run_extract(cfg)
    msg = str(e.value)
    assert str(store) in msg and "store has" in msg and "config gives" in msg
    if "model" in change and "seed" in change["model"]:
        assert "random-init:seed=0" in msg and "random-init:seed=1" in msg


def _bad_dataset(data: Path) -> tuple[Path, dict[str, str]]:
    """Add broken entries to the val split: missing, garbage, truncated JPEG, wrong size."""
    ann_path = data / "annotations" / "instances_val.json"
    coco = json.loads(ann_path.read_text())
    img_dir = data / "images" / "val"
    good = img_dir / "val_0000.jpg"
    (img_dir / "x_garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    raw = good.read_bytes()
    (img_dir / "x_truncated.jpg").write_bytes(raw[: len(raw) // 2])
    small = cv2.resize(cv2.imread(str(good)), (50, 40))
    cv2.imwrite(str(img_dir / "x_wrongsize.png"), small)
    template = coco["images"][0]
    expected = {"x_missing.jpg": "file not found", "x_garbage.jpg": "cannot decode",
                "x_truncated.jpg": "truncated", "x_wrongsize.png": "annotations say"}
    for k, name in enumerate(expected, start=100):
        coco["images"].append({**template, "id": k, "file_name": name})
    ann_path.write_text(json.dumps(coco))
    return ann_path, expected


def test_bad_images_reported_not_fatal(data_copy, tmp_path, sam):
    _, expected = _bad_dataset(data_copy)
    store = tmp_path / "features.zarr"
    res = run_extract(make_config(data_copy, store, extract={"splits": ["val"]}), model=sam)
    val = res.splits[0]
    assert val.encoded == 1
    got = {rep["file"]: rep["reason"] for rep in val.bad.values()}
    assert set(got) == set(expected)
    for name, why in expected.items():
        assert why in got[name] and name in got[name]
    sp = open_store(str(store)).split("val")
    stored = {rep["file"]: rep["reason"] for rep in bad_images(sp).values()}
    assert stored == got  # the store's attributes list them too
    states = sp.read_rows()[:, FIELD["state"]]
    assert (states == STATE_COMPLETE).sum() == 1 and (states == STATE_BAD).sum() == 4

    # unchanged bad images are not retried; fixing one makes the next run pick it up
    res2 = run_extract(make_config(data_copy, store, extract={"splits": ["val"]}), model=sam)
    assert res2.splits[0].todo == 0
    shutil.copy(data_copy / "images" / "val" / "val_0000.jpg", data_copy / "images" / "val" / "x_missing.jpg")
    res3 = run_extract(make_config(data_copy, store, extract={"splits": ["val"]}), model=sam)
    assert res3.encoded == 1
    sp = open_store(str(store)).split("val")
    assert len(bad_images(sp)) == 3 and "x_missing.jpg" not in {r["file"] for r in bad_images(sp).values()}


def test_strict_makes_bad_images_fatal_and_keeps_rows(data_copy, tmp_path, sam):
    _bad_dataset(data_copy)
    store = tmp_path / "features.zarr"
    cfg = make_config(data_copy, store, extract={"splits": ["val"], "strict": True})
    with pytest.raises(ExtractError, match="--strict"):
        run_extract(cfg, model=sam)
    sp = open_store(str(store)).split("val")
    assert (sp.read_rows()[:, FIELD["state"]] == STATE_COMPLETE).sum() == 1  # the good row, written first, kept


def test_path_escaping_image_root_is_refused(data_copy, tmp_path):
    from boxrefine.shared.data.records import DataError

    ann_path = data_copy / "annotations" / "instances_val.json"
    coco = json.loads(ann_path.read_text())
    coco["images"][0]["file_name"] = "../train/train_0000.jpg"
    ann_path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"instances_val\.json: images\[0\].*escapes the image root"):
        run_extract(make_config(data_copy, tmp_path / "s.zarr", extract={"splits": ["val"]}))


def test_checkpoint_file_loads_through_real_path(demo_root, tmp_path, monkeypatch):
    """Save a (random, seed 7) state dict to a file and extract with it: identity records its sha256
    and the features are those of the seed-7 weights, i.e. the file was really loaded."""
    from boxrefine.shared.data.records import file_sha256
    from boxrefine.shared.model import sam as sam_mod

    ref = sam_mod.build_hq_sam("vit_tiny", None, 7, "cpu", announce=False)
    ckpt = tmp_path / "sam_hq_vit_tiny_test.pth"
    torch.save(ref.state_dict(), ckpt)
    store = tmp_path / "features.zarr"
    cfg = make_config(demo_root, store, model={"checkpoint": str(ckpt)}, extract={"splits": ["val"]})
    run_extract(cfg)
    st = open_store(str(store))
    assert st.identity.checkpoint == f"sha256:{file_sha256(ckpt)}"
    emb, _ = st.split("val").read_features(0)
    from segment_anything_hq import SamPredictor

    pred = SamPredictor(ref)
    pred.set_image(read_rgb(demo_root / "images" / "val" / "val_0000.jpg"))
    torch.testing.assert_close(emb.float(), pred.features[0], atol=2e-3, rtol=2e-3)

    # the sha256 is remembered per path+size+mtime: a second fingerprint does not re-hash
    from boxrefine.shared.model import weights

    monkeypatch.setattr(weights, "file_sha256", lambda p: pytest.fail("re-hashed"))
    assert weights.checkpoint_info("vit_tiny", ckpt, 0).sha256 == file_sha256(ckpt)
