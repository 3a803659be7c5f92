"""Tests for the synthetic demo dataset generator (shared/dev/demo.py)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from boxrefine.shared.cli.dev_cmd import demo_app
from boxrefine.shared.dev.demo import box_iou, generate_demo

SPLITS = ("train", "val")
# pycocotools 2.0.x + numpy 2: harmless "__array__ ... copy keyword" warning inside mask.decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _load(out: Path, split: str) -> tuple[dict, list]:
    ann = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
    det = json.loads((out / "annotations" / f"detections_{split}.json").read_text())
    return ann, det


def _tight_box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _pixels(out: Path, split: str) -> list[np.ndarray]:
    ann, _ = _load(out, split)
    return [
        cv2.imread(str(out / "images" / split / im["file_name"]), cv2.IMREAD_UNCHANGED)
        for im in ann["images"]
    ]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    summary = generate_demo(out, num_train=4, num_val=2, seed=0)
    return out, summary


def test_summary_and_layout(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    assert summary["out"] == str(out)
    assert summary["splits"]["train"]["images"] == 4
    assert summary["splits"]["val"]["images"] == 2
    for split in SPLITS:
        ann, _ = _load(out, split)
        assert summary["splits"][split]["instances"] == len(ann["annotations"])
        assert [c["name"] for c in ann["categories"]] == ["mushroom", "toadstool"]
        assert [im["id"] for im in ann["images"]] == list(range(1, len(ann["images"]) + 1))
        assert [a["id"] for a in ann["annotations"]] == list(range(1, len(ann["annotations"]) + 1))
        files = sorted(p.name for p in (out / "images" / split).iterdir())
        assert files == sorted(im["file_name"] for im in ann["images"])


def test_same_seed_is_deterministic(demo: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = demo
    again = tmp_path / "again"
    generate_demo(again, num_train=4, num_val=2, seed=0)
    for split in SPLITS:
        for kind in ("instances", "detections"):
            name = f"{kind}_{split}.json"
            assert (out / "annotations" / name).read_bytes() == (again / "annotations" / name).read_bytes()
        for a, b in zip(_pixels(out, split), _pixels(again, split), strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_different_seed_differs(demo: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = demo
    other = tmp_path / "other"
    generate_demo(other, num_train=4, num_val=2, seed=1)
    a = (out / "annotations" / "instances_train.json").read_bytes()
    b = (other / "annotations" / "instances_train.json").read_bytes()
    assert a != b
    pa, pb = _pixels(out, "train")[0], _pixels(other, "train")[0]
    assert pa.shape != pb.shape or not np.array_equal(pa, pb)


def test_masks_boxes_and_instance_counts(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    sizes, touches_border, overlapping_boxes = set(), False, False
    for split in SPLITS:
        ann, _ = _load(out, split)
        for im in ann["images"]:
            w, h = im["width"], im["height"]
            sizes.add((w, h))
            anns = [a for a in ann["annotations"] if a["image_id"] == im["id"]]
            assert 3 <= len(anns) <= 8
            union = np.zeros((h, w), np.uint8)
            for a in anns:
                assert a["iscrowd"] == 0 and a["category_id"] in (1, 2)
                assert isinstance(a["segmentation"]["counts"], str)
                assert a["segmentation"]["size"] == [h, w]
                m = mask_utils.decode(a["segmentation"])
                assert m.shape == (h, w)
                assert int(m.sum()) >= 50 and a["area"] == float(m.sum())
                assert a["bbox"] == _tight_box(m)
                assert all(isinstance(v, float) for v in a["bbox"])
                union += m
                x, y, bw, bh = a["bbox"]
                touches_border |= x == 0 or y == 0 or x + bw == w or y + bh == h
            assert union.max() <= 1, "visible masks of one image must be disjoint"
            boxes = [a["bbox"] for a in anns]
            overlapping_boxes |= any(
                box_iou(boxes[i], boxes[j]) > 0 for i in range(len(boxes)) for j in range(i + 1, len(boxes))
            )
    assert len(sizes) > 1 and any(w != h for w, h in sizes)
    assert touches_border
    assert overlapping_boxes


@pytest.mark.parametrize(
    ("split", "index", "ext", "ndim", "channels", "dtype"),
    [
        ("train", 0, ".jpg", 3, 3, np.uint8),
        ("train", 1, ".png", 2, None, np.uint8),
        ("train", 2, ".png", 3, 4, np.uint8),
        ("train", 3, ".png", 3, 3, np.uint16),
        ("val", 0, ".jpg", 3, 3, np.uint8),
        ("val", 1, ".png", 3, 3, np.uint8),
    ],
)
def test_file_formats(demo: tuple[Path, dict], split, index, ext, ndim, channels, dtype) -> None:
    out, _ = demo
    ann, _ = _load(out, split)
    im = ann["images"][index]
    assert im["file_name"].endswith(ext)
    arr = cv2.imread(str(out / "images" / split / im["file_name"]), cv2.IMREAD_UNCHANGED)
    assert arr is not None and arr.dtype == dtype and arr.ndim == ndim
    if channels is not None:
        assert arr.shape[2] == channels
    assert arr.shape[:2] == (im["height"], im["width"])
    if channels == 4:
        assert (arr[..., 3] == 255).all()
    if dtype == np.uint16:
        assert (arr % 257 == 0).all()


def test_pycocotools_loads_annotations_and_detections(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    for split in SPLITS:
        ann_path = out / "annotations" / f"instances_{split}.json"
        det_path = out / "annotations" / f"detections_{split}.json"
        coco = COCO(str(ann_path))
        res = coco.loadRes(str(det_path))
        ann, dets = _load(out, split)
        assert len(res.getAnnIds()) == len(dets) == len(ann["annotations"])
        # detections are written in GT order, one per instance
        for gt, det in zip(ann["annotations"], dets, strict=True):
            assert det["image_id"] == gt["image_id"] and det["category_id"] == gt["category_id"]
            assert 0 < det["score"] <= 1 and det["score"] == round(det["score"], 4)
            assert box_iou(det["bbox"], gt["bbox"]) > 0
            x, y, w, h = det["bbox"]
            im = coco.imgs[gt["image_id"]]
            assert w >= 2 and h >= 2 and x >= 0 and y >= 0
            assert x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6


def test_zero_noise_detections_equal_gt(tmp_path: Path) -> None:
    generate_demo(tmp_path, num_train=1, num_val=1, seed=3, noise=0.0)
    ann, dets = _load(tmp_path, "val")
    for gt, det in zip(ann["annotations"], dets, strict=True):
        assert det["bbox"] == pytest.approx(gt["bbox"])


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(demo_app, ["--out", str(out), "--num-train", "1", "--num-val", "1", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "val" in result.output
    assert (out / "annotations" / "instances_val.json").is_file()
    assert (out / "annotations" / "detections_train.json").is_file()
