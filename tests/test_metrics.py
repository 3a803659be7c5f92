"""Metrics on hand-made inputs with known answers, and COCO box AP against pycocotools run directly."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import coco_stats
from pycocotools.coco import COCO

from boxrefine.shared.scoring.metrics import box_metrics, coco_box_ap, mask_iou


def test_box_metrics_known_answers() -> None:
    pred = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [100, 100, 110, 110.]])
    gt = torch.tensor([[0, 0, 10, 10],  # IoU 1, side errors 0
                       [0, 0, 10, 20],  # IoU 100/200 = 0.5, |Δy1| = 10
                       [5, 0, 15, 10],  # IoU 50/150 = 1/3, |Δx0| = |Δx1| = 5
                       [102, 100, 110, 110.]])  # IoU 80/100 = 0.8, |Δx0| = 2
    m = box_metrics(pred, gt)
    assert m["n"] == 4
    assert m["mean_iou"] == pytest.approx((1 + 0.5 + 1 / 3 + 0.8) / 4)
    assert m["acc@0.5"] == pytest.approx(3 / 4)  # the threshold is inclusive: IoU 0.5 counts
    assert m["acc@0.75"] == pytest.approx(2 / 4)
    assert m["acc@0.9"] == pytest.approx(1 / 4)
    assert m["side_err_px"] == pytest.approx((10 + 5 + 5 + 2) / 16)


def test_box_metrics_empty_is_nan() -> None:
    m = box_metrics(torch.zeros((0, 4)), torch.zeros((0, 4)))
    assert m["n"] == 0 and math.isnan(m["mean_iou"]) and math.isnan(m["acc@0.5"]) and math.isnan(m["side_err_px"])


def test_mask_iou_known_answers() -> None:
    a = torch.zeros((4, 4, 4), dtype=torch.bool)
    b = torch.zeros((4, 4, 4), dtype=torch.bool)
    a[0, :2, :2] = True  # 4 px
    b[0, :2, :4] = True  # 8 px, 4 shared → 4 / 8
    a[1, :, :] = True
    b[1, :, :] = True  # identical → 1
    a[2, 0, 0] = True  # disjoint → 0
    b[2, 3, 3] = True
    # [3]: both empty → 1 by convention
    iou = mask_iou(a, b)
    assert iou.tolist() == pytest.approx([0.5, 1.0, 0.0, 1.0])
    # uint8 masks (as stored) give the same answer
    assert mask_iou(a.to(torch.uint8), b.to(torch.uint8)).tolist() == pytest.approx([0.5, 1.0, 0.0, 1.0])


def test_coco_box_ap_equals_pycocotools_on_demo_files(demo_root: Path, capsys) -> None:
    ann = demo_root / "annotations" / "instances_train.json"
    det_path = demo_root / "annotations" / "detections_train.json"
    dets = json.loads(det_path.read_text())
    before = copy.deepcopy(dets)
    ours = coco_box_ap(ann, dets)
    direct = coco_stats(ann, det_path)
    assert [ours["AP"], ours["AP50"], ours["AP75"]] == pytest.approx(direct, abs=1e-12)
    assert 0 < ours["AP"] < 1  # noisy demo detections: neither trivial nor perfect
    assert dets == before  # loadRes adds keys to what it is given: the wrapper passes copies
    assert capsys.readouterr().out == ""  # pycocotools' printing silenced
    # restricted to some image ids, against pycocotools restricted the same way
    ids = [2, 4]
    sub = coco_box_ap(ann, dets, ids)
    assert [sub["AP"], sub["AP50"], sub["AP75"]] == pytest.approx(coco_stats(ann, det_path, ids), abs=1e-12)
    assert sub["AP"] != pytest.approx(ours["AP"])
    # with a loaded COCO object too
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann))
    assert coco_box_ap(coco, dets) == ours


def test_coco_box_ap_of_ground_truth_is_one(demo_root: Path) -> None:
    """GT boxes as results (xywh, real category ids) score AP 1: no xyxy/xywh or id mix-up."""
    ann = demo_root / "annotations" / "instances_val.json"
    doc = json.loads(ann.read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in doc["annotations"]]
    assert coco_box_ap(ann, perfect) == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})
    as_xyxy = [{**r, "bbox": [r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]}
               for r in perfect]
    assert coco_box_ap(ann, as_xyxy)["AP"] < 0.9  # the wrong box format is visible
    assert coco_box_ap(ann, []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def _size_case(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Two categories over three images: category 1 small and medium boxes (one image holds 12 small
    ones, more than COCO's maxDets 10), category 2 large boxes only (no small or medium GT: those
    precisions are -1 in COCOeval); detections with IoUs between 0.5 and 0.75 for some boxes, so AP50
    and AP75 differ within a size, one between 0.75 and 0.9, and two false positives."""
    anns, dets = [], []

    def add(img: int, cat: int, box: list[float], shift: float, score: float) -> None:
        anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat, "bbox": box, "iscrowd": 0,
                     "area": box[2] * box[3]})
        dets.append({"image_id": img, "category_id": cat, "bbox": [box[0] + shift * box[2], *box[1:]],
                     "score": score})

    for k in range(12):  # small, 20×20: every other one shifted by 30 % (IoU ≈ 0.54)
        add(1, 1, [10.0 + 30 * (k % 6), 10.0 + 40 * (k // 6), 20.0, 20.0], 0.3 * (k % 2), 0.9 - 0.01 * k)
    for k in range(3):  # medium, 50×50: IoU 1, ≈ 0.67 and ≈ 0.82 (AP75 is not AP at 0.9)
        add(2, 1, [20.0 + 80 * k, 30.0, 50.0, 50.0], (0.0, 0.2, 0.1)[k], 0.8 - 0.1 * k)
    for k in range(2):  # large, 120×120, category 2
        add(3, 2, [10.0 + 150 * k, 20.0, 120.0, 120.0], 0.25 * k, 0.95 - 0.2 * k)
    dets += [{"image_id": 2, "category_id": 1, "bbox": [300.0, 300.0, 50.0, 50.0], "score": 0.99},
             {"image_id": 3, "category_id": 2, "bbox": [5.0, 300.0, 120.0, 120.0], "score": 0.3}]
    doc = {"images": [{"id": i, "file_name": f"{i}.png", "width": 400, "height": 450} for i in (1, 2, 3)],
           "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    path = tmp_path / "sizes.json"
    path.write_text(json.dumps(doc))
    return path, dets


def _pycocotools_by_size(ann: Path, dets: list[dict], area: list[float]) -> list[float]:
    """AP, AP50, AP75 from pycocotools with its area ranges replaced by the one given."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), iouType="bbox")
        ev.params.areaRng, ev.params.areaRngLbl = [area], ["all"]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(x) for x in ev.stats[:3]]


def test_coco_box_ap_by_size_equals_pycocotools_per_area_range(tmp_path: Path) -> None:
    ann, dets = _size_case(tmp_path)
    ours = coco_box_ap(ann, dets, by_size=True)
    assert [ours["AP"], ours["AP50"], ours["AP75"]] == pytest.approx(coco_stats(ann, dets), abs=1e-12)
    ranges = {"small": [0, 32 ** 2], "medium": [32 ** 2, 96 ** 2], "large": [96 ** 2, 1e10]}
    for name, area in ranges.items():
        got = [ours[name]["AP"], ours[name]["AP50"], ours[name]["AP75"]]
        assert got == pytest.approx(_pycocotools_by_size(ann, dets, area), abs=1e-12), name
    # the case reaches what a slip would change: AP50 ≠ AP75 per size, the small image's 12 boxes
    # (maxDets 100, not 10), category 2's missing small and medium GT left out of the mean
    for name in ranges:
        assert ours[name]["AP50"] > ours[name]["AP75"] >= 0, name
    assert ours["small"]["AP50"] == pytest.approx(1.0)
    assert ours["medium"]["AP50"] < 1.0  # its false positive outranks every true one


def test_coco_box_ap_by_size_without_gt_of_a_size_is_minus_one(tmp_path: Path) -> None:
    ann, dets = _size_case(tmp_path)
    doc = json.loads(ann.read_text())
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != 3]  # no large GT at all
    ann.write_text(json.dumps(doc))
    ours = coco_box_ap(ann, [d for d in dets if d["image_id"] != 3], by_size=True)
    assert ours["large"] == {"AP": -1.0, "AP50": -1.0, "AP75": -1.0}
    assert ours["small"]["AP"] > 0 and ours["medium"]["AP"] > 0
    none = coco_box_ap(ann, [], by_size=True)
    assert none == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, **{s: {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
                                                          for s in ("small", "medium", "large")}}
