"""shared/data/records.py: safe file names, stable row keys, one-line DataErrors for malformed COCO files,
instance masks from every COCO segmentation form, and the GT resize into SAM's low-res frame."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from boxrefine.shared.data.records import (
    DataError,
    Instance,
    image_key,
    instance_mask,
    load_coco,
    resolve_image,
    safe_relpath,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ------------------------------------------------------------------------------------- safe_relpath


@pytest.mark.parametrize("name", [
    "../x.jpg", "a/../../x.jpg", "a/..", "..\\x.jpg", "/etc/passwd", "C:\\x.jpg", "C:x.jpg", "c:/x.jpg",
    "\\\\server\\x.jpg", "\\x.jpg", "", "   ", ".", "./", "a/\x00.jpg",
])
def test_safe_relpath_refuses(name: str) -> None:
    with pytest.raises(DataError) as ei:
        safe_relpath(name, source="ann.json")
    msg = str(ei.value)
    assert msg.startswith("ann.json: ")
    assert "\n" not in msg


@pytest.mark.parametrize("name", [None, 3, ["a.jpg"]])
def test_safe_relpath_refuses_non_strings(name: Any) -> None:
    with pytest.raises(DataError):
        safe_relpath(name)


@pytest.mark.parametrize(("name", "expected"), [
    ("./a//b.jpg", "a/b.jpg"),
    ("a\\b.jpg", "a/b.jpg"),
    ("a/./b/./c.png", "a/b/c.png"),
    ("x.jpg", "x.jpg"),
    ("dir/", "dir"),
    ("..a/b..jpg", "..a/b..jpg"),  # dots inside names are not '..' components
    ("a/../b.jpg", "b.jpg"),  # '..' inside the root is taken apart by name (where the file is: resolve_image)
])
def test_safe_relpath_normalises(name: str, expected: str) -> None:
    assert safe_relpath(name) == expected


def test_resolve_image_stays_under_root(tmp_path: Path) -> None:
    assert resolve_image(tmp_path, "./a\\b.jpg") == tmp_path / "a" / "b.jpg"
    with pytest.raises(DataError):
        resolve_image(tmp_path, "../outside.jpg")


# ---------------------------------------------------------------------------------------- image_key

# Stores are keyed by this value: it must never change (a change orphans every existing store).
TRAIN_0000_KEY = 7279501361153533080


def test_image_key_is_stable() -> None:
    assert image_key("train_0000.jpg") == TRAIN_0000_KEY
    assert image_key("train_0001.png") == 6148378306501306899


def test_image_key_range_and_distinctness() -> None:
    names = [f"img_{i:05d}.jpg" for i in range(2000)] + ["a/b.jpg", "a_b.jpg", "A/b.jpg", "é.jpg"]
    keys = [image_key(n) for n in names]
    assert all(isinstance(k, int) and 0 < k < 2**63 for k in keys)
    assert len(set(keys)) == len(keys)
    # keys fit int64 arrays without wrapping
    assert (np.array(keys, np.int64) > 0).all()


def test_records_are_keyed_by_normalised_name(tmp_path: Path) -> None:
    coco = {"images": [{"id": 5, "file_name": "./sub\\x.jpg", "width": 4, "height": 3}], "annotations": []}
    p = tmp_path / "a.json"
    p.write_text(json.dumps(coco))
    rec = load_coco(p).images[0]
    assert rec.file_name == "sub/x.jpg"
    assert rec.key == image_key("sub/x.jpg")


# -------------------------------------------------------------------------------- malformed COCO


def _coco() -> dict[str, Any]:
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 8},
                   {"id": 2, "file_name": "b.jpg", "width": 10, "height": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 2], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }


def _broken(fn) -> dict[str, Any]:
    d = _coco()
    fn(d)
    return d


BROKEN: dict[str, tuple[Any, str]] = {
    "not_json": ("{'images': [", "not valid JSON"),
    "top_level_list": ("[]", "expected a COCO object"),
    "missing_images": (_broken(lambda d: d.pop("images")), "images: missing or not a list"),
    "images_not_list": (_broken(lambda d: d.update(images={})), "images: missing or not a list"),
    "missing_annotations": (_broken(lambda d: d.pop("annotations")), "annotations: missing or not a list"),
    "image_without_width": (_broken(lambda d: d["images"][1].pop("width")), "images[1]: missing 'width'"),
    "zero_height": (_broken(lambda d: d["images"][0].update(height=0)), "height must be a positive integer"),
    "string_id": (_broken(lambda d: d["images"][0].update(id="1")), "id must be an integer"),
    "duplicate_image_id": (_broken(lambda d: d["images"][1].update(id=1)), "duplicate image id 1"),
    "unknown_image_id": (_broken(lambda d: d["annotations"][0].update(image_id=99)),
                         "annotations[0]: image_id 99 is not in 'images'"),
    "bbox_wrong_length": (_broken(lambda d: d["annotations"][0].update(bbox=[1, 2, 3])),
                          "annotations[0]: bbox must be [x, y, w, h]"),
    "bbox_nan": (_broken(lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 3])), "bbox must be"),
    "bbox_negative": (_broken(lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 3])), "negative size"),
    "annotation_without_bbox": (_broken(lambda d: d["annotations"][0].pop("bbox")), "missing 'bbox'"),
    "duplicate_file_name": (_broken(lambda d: d["images"][1].update(file_name="./a.jpg")),
                            "file_name 'a.jpg' listed twice"),
    "absolute_file_name": (_broken(lambda d: d["images"][0].update(file_name="/etc/passwd")), "is absolute"),
    "escaping_file_name": (_broken(lambda d: d["images"][0].update(file_name="../a.jpg")), "escapes the image root"),
    "image_id_list": (_broken(lambda d: d["annotations"][0].update(image_id=[1])), "image_id must be an integer"),
    "category_id_string": (_broken(lambda d: d["annotations"][0].update(category_id="cat")),
                           "category_id must be an integer"),
    "annotation_id_null": (_broken(lambda d: d["annotations"][0].update(id=None)),
                           "annotations[0]: id must be an integer"),
    "iscrowd_string": (_broken(lambda d: d["annotations"][0].update(iscrowd="yes")), "iscrowd must be 0 or 1"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_malformed_coco_one_line_error(tmp_path: Path, case: str) -> None:
    content, fragment = BROKEN[case]
    path = tmp_path / f"{case}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError) as ei:
        load_coco(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: "), msg
    assert fragment in msg, msg
    assert "\n" not in msg


def test_missing_annotations_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="annotations file not found") as ei:
        load_coco(tmp_path / "nope.json")
    assert str(ei.value).startswith(str(tmp_path / "nope.json"))


def test_valid_coco_records(tmp_path: Path) -> None:
    d = _coco()
    d["annotations"].append({"id": 7, "image_id": 2, "category_id": 1, "bbox": [0.5, 1, 2, 3]})
    d["annotations"].append({"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1], "iscrowd": 1})
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(d))
    recs = load_coco(path)
    assert [r.file_name for r in recs.images] == ["a.jpg", "b.jpg"]
    b = recs.images[1]
    assert (b.height, b.width, b.image_id) == (8, 10, 2)
    assert [a.ann_id for a in b.instances] == [3, 7]  # sorted by annotation id
    assert b.instances[1].box == (0.5, 1.0, 2.5, 4.0)  # xywh → xyxy
    assert b.instances[0].iscrowd == 1 and b.instances[1].iscrowd == 0
    assert len(recs.sha256) == 64

    # the annotation hash changes when (and only when) that image's annotations change
    d["annotations"][1]["bbox"] = [0.5, 1, 2, 4]
    path.write_text(json.dumps(d))
    again = load_coco(path)
    assert again.images[0].ann_hash == recs.images[0].ann_hash
    assert again.images[1].ann_hash != b.ann_hash
    assert again.sha256 != recs.sha256


# ---------------------------------------------------------------------------------- instance_mask


def _inst(seg: Any, box: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Instance:
    return Instance(1, 1, box, 0, seg)


def test_mask_from_polygons_matches_pycocotools() -> None:
    h, w = 20, 30
    polys = [[2, 2, 12, 2, 12, 9, 2, 9], [20, 10, 28, 10, 24, 18]]  # a rectangle and a triangle
    m = instance_mask(_inst(polys), h, w)
    want = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))
    assert m.dtype == np.uint8 and m.shape == (h, w)
    np.testing.assert_array_equal(m, want)
    # both polygons are in the mask (union), nothing else
    assert m[5, 7] == 1 and m[13, 24] == 1
    assert m[0, 0] == 0 and m[15, 5] == 0
    assert 60 <= int(m[:, :15].sum()) <= 90  # ~10×7 rectangle


def _rle_counts_colmajor(m: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE by hand: run lengths of the column-major pixels, starting with zeros."""
    flat = m.flatten(order="F").tolist()
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return counts


def test_mask_from_uncompressed_rle() -> None:
    h, w = 6, 7
    want = np.zeros((h, w), np.uint8)
    want[1:4, 2:5] = 1
    want[5, 0] = 1
    want[0, 6] = 1
    seg = {"size": [h, w], "counts": _rle_counts_colmajor(want)}
    np.testing.assert_array_equal(instance_mask(_inst(seg), h, w), want)


def test_mask_from_compressed_rle_string() -> None:
    rng = np.random.default_rng(0)
    h, w = 17, 23
    want = (rng.random((h, w)) < 0.4).astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(want))
    seg = {"size": [h, w], "counts": rle["counts"].decode("ascii")}  # as it is stored in JSON
    got = instance_mask(_inst(seg), h, w)
    np.testing.assert_array_equal(got, want)
    assert isinstance(seg["counts"], str), "the caller's annotation must not be modified"


def test_rle_of_wrong_size_is_refused() -> None:
    m = np.ones((4, 5), np.uint8)
    rle = mask_utils.encode(np.asfortranarray(m))
    seg = {"size": [4, 5], "counts": rle["counts"].decode("ascii")}
    with pytest.raises(DataError, match="mask is 5x4, image is 6x4"):
        instance_mask(_inst(seg), 4, 6)


@pytest.mark.parametrize("seg", [None, [], {}])
def test_missing_segmentation_fills_the_box(seg: Any) -> None:
    m = instance_mask(_inst(seg, box=(1.5, 2.2, 4.0, 5.0)), 8, 7)
    want = np.zeros((8, 7), np.uint8)
    want[2:5, 1:4] = 1  # floor(x0/y0) .. ceil(x1/y1), exclusive
    np.testing.assert_array_equal(m, want)


def test_unsupported_segmentation_type() -> None:
    with pytest.raises(DataError, match="unsupported segmentation type str"):
        instance_mask(_inst("not a mask"), 4, 4)
