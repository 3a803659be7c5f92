"""Images-only splits: a folder (no annotations key) or a COCO file with images and no annotations.
Sizes come from the image headers; rows hold features and no GT, the store says so, train and
evaluate refuse them with one line, and config errors name the YAML key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import config_dict, invoke
from PIL import Image

from boxrefine.extract.sources import list_images, split_records
from boxrefine.shared.config import ConfigError, SplitConfig, validate_config
from boxrefine.shared.data.imageio import header_size, read_rgb
from boxrefine.shared.data.intensity import ImageError
from boxrefine.shared.data.records import DataError, load_coco
from boxrefine.shared.store.feature_store import open_store
from boxrefine.shared.store.schema import FIELD


def _rotated_jpeg(src: Path, dst: Path, orientation: int = 6) -> None:
    im = Image.open(src)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(dst, exif=exif, quality=90)


# ------------------------------------------------------------------------------------ units
def test_header_size_is_the_decoded_size(demo_root: Path, tmp_path: Path) -> None:
    """PIL's header size with EXIF quarter turns applied equals what extract's decoder gives, for
    JPEG (rotated or not), grey, RGBA and 16-bit PNG; an unreadable header is an ImageError."""
    files = sorted((demo_root / "images" / "train").iterdir())
    _rotated_jpeg(files[0], tmp_path / "rot6.jpg", 6)
    _rotated_jpeg(files[0], tmp_path / "rot3.jpg", 3)
    for path in [*files, tmp_path / "rot6.jpg", tmp_path / "rot3.jpg"]:
        assert header_size(path) == read_rgb(path).shape[:2], path.name
    h, w = read_rgb(files[0]).shape[:2]
    assert header_size(tmp_path / "rot6.jpg") == (w, h) != (h, w)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ImageError, match=r"bad\.png: cannot read the image header"):
        header_size(tmp_path / "bad.png")
    with pytest.raises(ImageError, match=r"gone\.png: file not found"):
        header_size(tmp_path / "gone.png")


def test_folder_listing_and_coco_without_annotations(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "b" / "c").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for name in ("z.JPG", "a.png", "b/c/d.tiff", "b/x.txt", ".hidden/h.png", ".dot.png"):
        cv2.imwrite(str(root / name), np.zeros((6, 9, 3), np.uint8)) if not name.endswith(".txt") else \
            (root / name).write_text("x")
    assert list_images(root) == ["a.png", "b/c/d.tiff", "z.JPG"]
    recs, bad = split_records(SplitConfig(images=root))
    assert not recs.ground_truth and not bad and recs.annotations is None
    assert [(r.image_id, r.file_name, r.height, r.width, r.instances) for r in recs.images] == [
        (1, "a.png", 6, 9, ()), (2, "b/c/d.tiff", 6, 9, ()), (3, "z.JPG", 6, 9, ())]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in this folder"):
        split_records(SplitConfig(images=tmp_path / "empty"))
    with pytest.raises(DataError, match="image folder not found"):
        split_records(SplitConfig(images=tmp_path / "nowhere"))

    coco = tmp_path / "images.json"
    coco.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.png"}, {"id": 8, "file_name": "gone.png",
                                                                               "width": 5, "height": 5}]}))
    with pytest.raises(DataError, match="annotations: missing or not a list"):
        load_coco(coco)  # GT is asked for: still refused
    recs, bad = split_records(SplitConfig(images=root, annotations=coco))
    assert not recs.ground_truth and [(r.image_id, r.height, r.width) for r in recs.images] == [(7, 6, 9)]
    assert [(v["image_id"], v["file"]) for v in bad.values()] == [(8, "gone.png")]
    assert "gone.png: file not found" in next(iter(bad.values()))["reason"]
    coco.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.png"}], "annotations": []}))
    assert not split_records(SplitConfig(images=root, annotations=coco))[0].ground_truth


def test_config_names_images_only_splits_by_key(tmp_path: Path) -> None:
    raw = config_dict(tmp_path, tmp_path / "s.zarr")
    raw["data"]["splits"]["photos"] = {"images": str(tmp_path / "photos")}
    cfg = validate_config(raw, "<t>", tmp_path)
    assert cfg.data.splits["photos"].annotations is None and cfg.data.splits["photos"].images_only
    del raw["data"]["splits"]["val"]["annotations"]  # val images only: train validates on nothing
    assert validate_config(raw, "<t>", tmp_path).val_split() is None
    raw["train"] = {"train_split": "photos", "val_split": "val"}
    raw["evaluate"] = {"split": "photos"}
    with pytest.raises(ConfigError) as e:
        validate_config(raw, "<t>", tmp_path)
    keys = {k for k, _ in e.value.errors}
    assert keys == {"train.train_split", "train.val_split", "evaluate.split"}
    assert "split 'photos' is images only (data.splits.photos.annotations is not set)" in str(e.value)


# ------------------------------------------------------------------------------------ extract, train, evaluate
def test_images_only_splits_extract_and_are_refused_for_training(demo_root: Path, sam, tmp_path: Path) -> None:
    """A folder split and a COCO-without-annotations split extract (features, no GT, an EXIF-rotated
    JPEG sized as decoded; a second run has nothing to do); the store records them as images only;
    train and evaluate refuse them with one line."""
    from boxrefine.evaluate.run import run_evaluate
    from boxrefine.extract.run import run_extract
    from boxrefine.shared.store.location import StoreError
    from boxrefine.train.recipe import run_train

    photos = tmp_path / "photos"
    photos.mkdir()
    _rotated_jpeg(demo_root / "images" / "val" / "val_0000.jpg", photos / "turned.jpg")
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps({"images": [{"id": 3, "file_name": "turned.jpg"}], "categories": []}))
    store = tmp_path / "features.zarr"
    raw = config_dict(demo_root, store, train={"runs_dir": str(tmp_path / "runs"), "num_workers": 0})
    raw["data"]["splits"] = {"photos": {"images": str(photos)},
                             "train": {"images": str(photos), "annotations": str(listed)}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = validate_config(raw, str(path), tmp_path)
    res = run_extract(cfg, model=sam)
    assert res.encoded == 2 and [s.encoded for s in res.splits] == [1, 1]

    st = open_store(str(store))
    h, w = read_rgb(photos / "turned.jpg").shape[:2]
    for name in ("photos", "train"):
        sp = st.split(name)
        assert not sp.has_ground_truth
        rec = sp.read_rows()[0]
        assert (rec[FIELD["orig_h"]], rec[FIELD["orig_w"]], rec[FIELD["n_instances"]]) == (h, w, 0) and w > h  # turned
    assert st.split("train").image_ids().tolist() == [3]
    assert run_extract(cfg, model=sam).encoded == 0

    with pytest.raises(StoreError, match=r"split 'train' holds images only \(no annotations"):
        run_train(cfg)
    cfg.evaluate.split = "train"
    (tmp_path / "some.pt").write_bytes(b"x")
    with pytest.raises(StoreError, match=r"split 'train' holds images only"):
        run_evaluate(cfg, checkpoint=tmp_path / "some.pt")
    result, out = invoke("train", "--config", str(path))
    assert result.exit_code == 1
    assert [ln for ln in out.splitlines() if ln.startswith("error:")] == [
        f"error: {store}: split 'train' holds images only (no annotations, from {listed}): nothing to train on or "
        "score; `boxrefine refine` uses such splits"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    shutil.rmtree(photos)
