"""Scoring at its boundaries (``shared/scoring/metrics.py``, ``coarse.py``): accuracy thresholds are
inclusive, mask IoU counts pixels; coarse boxes match the GT they overlap most above the threshold,
crowd GT is never a target, the seeded jitter is per image and saved boxes read back or are redrawn
when their inputs change. Synthetic data: no store, no encoder. Prediction: tests/test_predict_exact.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from boxrefine.shared.data.records import DataError
from boxrefine.shared.geometry.frames import ImageGeometry
from boxrefine.shared.scoring.coarse import (
    CoarseBoxes,
    SavedBoxesError,
    _row_generator,
    detection_pairs,
    fixed_coarse_boxes,
    load_coarse_boxes,
    make_coarse_boxes,
    match_to_gt,
    save_coarse_boxes,
)
from boxrefine.shared.scoring.metrics import box_metrics, coco_box_ap, mask_iou

# rows 7 and 9 of the synthetic split (original px) and their coarse boxes; row 8 has none
GT0 = torch.tensor([[10.0, 20.0, 60.0, 80.0], [100.0, 100.0, 200.0, 180.0]])
GT1 = torch.tensor([[300.0, 50.0, 400.0, 120.0]])
COARSE = {
    7: CoarseBoxes(torch.tensor([[12.0, 22.0, 58.0, 78.0], [400.0, 200.0, 420.0, 240.0], [104.0, 96.0, 196.0, 176.0]]),
                   torch.tensor([0, -1, 1]), torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 2, 1])),
    8: CoarseBoxes(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                   torch.zeros(0, dtype=torch.int64)),
    9: CoarseBoxes(torch.tensor([[500.0, 240.0, 530.0, 260.0]]), torch.tensor([0]), torch.tensor([1.0]),
                   torch.tensor([3])),
}


# ------------------------------------------------------------------------------------------ metrics


def test_accuracy_thresholds_are_inclusive_at_each_level() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(4, 1)
    pred = torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 7.5], [0.0, 0.0, 10.0, 9.0], [0.0, 0.0, 10.0, 4.9]])
    m = box_metrics(pred, gt)  # IoU 0.5, 0.75, 0.9, 0.49
    assert m["acc@0.5"] == pytest.approx(3 / 4)
    assert m["acc@0.75"] == pytest.approx(2 / 4)
    assert m["acc@0.9"] == pytest.approx(1 / 4)
    assert m["side_err_px"] == pytest.approx((5 + 2.5 + 1 + 5.1) / 16)
    assert m["mean_iou"] == pytest.approx((0.5 + 0.75 + 0.9 + 0.49) / 4)
    assert set(m) == {"n", "mean_iou", "acc@0.5", "acc@0.75", "acc@0.9", "side_err_px"}
    assert set(box_metrics(torch.zeros((0, 4)), torch.zeros((0, 4)))) == set(m)
    m16 = box_metrics(pred.half(), gt.double())
    assert m16["acc@0.5"] == pytest.approx(3 / 4) and m16["n"] == 4


def test_mask_iou_counts_pixels_and_empty_pairs() -> None:
    p = torch.zeros(2, 3, 3, dtype=torch.uint8)
    g = torch.zeros(2, 3, 3, dtype=torch.uint8)
    p[0, 0, :] = 1
    g[0, :, 0] = 1  # 1 shared of 5
    g[1, 1, 1] = 1  # prediction empty, GT not: 0
    assert mask_iou(p, g).tolist() == pytest.approx([0.2, 0.0])
    one = torch.zeros(1, 3, 3, dtype=torch.bool)
    one[0, 1, 1] = True  # a single pixel on both sides: union 1, IoU 1
    assert mask_iou(one, one).tolist() == [1.0]


def test_one_pair_is_scored() -> None:
    m = box_metrics(torch.tensor([[0.0, 0.0, 10.0, 5.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert m["n"] == 1 and m["mean_iou"] == pytest.approx(0.5) and m["acc@0.5"] == 1.0 and m["acc@0.75"] == 0.0
    assert m["side_err_px"] == pytest.approx(5 / 4)


def test_coco_ap_of_no_results_is_zero_and_results_are_not_modified(tmp_path: Path) -> None:
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"},
                                          {"id": 2, "width": 100, "height": 100, "file_name": "b.png"}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30],
                                                "area": 900, "iscrowd": 0},
                                               {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 20, 20],
                                                "area": 400, "iscrowd": 0}],
                               "categories": [{"id": 1, "name": "x"}]}))
    res = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9}]
    kept = json.dumps(res)
    assert coco_box_ap(ann, []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    assert coco_box_ap(ann, res, image_ids=[]) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    assert coco_box_ap(ann, res, image_ids=[2]) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    one = coco_box_ap(ann, res, image_ids=[1])
    assert one["AP"] == pytest.approx(1.0) and one["AP50"] == pytest.approx(1.0)
    both = coco_box_ap(ann, res)  # image 2's GT is missed: AP below 1
    assert 0.0 < both["AP"] < 1.0
    assert json.dumps(res) == kept


# ------------------------------------------------------------------------------------------ coarse


def test_match_to_gt_takes_the_best_valid_gt_above_the_threshold() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [50.0, 50.0, 60.0, 60.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 18.0], [50.0, 50.0, 60.0, 55.0], [50.0, 50.0, 60.0, 54.9],
                          [200.0, 200.0, 210.0, 210.0]])
    valid = torch.tensor([True, True, True])
    assert match_to_gt(boxes, gt, valid, 0.5).tolist() == [1, 2, -1, -1]  # IoU 0.5 matches, 0.49 does not
    assert match_to_gt(boxes, gt, torch.tensor([True, False, True]), 0.5).tolist() == [0, 2, -1, -1]
    assert match_to_gt(boxes, gt, torch.tensor([False, False, False]), 0.5).tolist() == [-1] * 4
    assert match_to_gt(torch.zeros((0, 4)), gt, valid, 0.5).shape == (0,)
    assert match_to_gt(boxes, gt, valid, 1e-6).tolist()[3] == -1  # no overlap is never a match


def test_coarse_boxes_from_detections_and_from_seeded_jitter() -> None:
    geo = ImageGeometry.of(480, 640)
    gt = torch.tensor([[10.0, 20.0, 110.0, 220.0], [300.0, 100.0, 500.0, 300.0], [550.0, 400.0, 600.0, 450.0]])
    info = torch.tensor([[1, 4, 0], [2, 5, 0], [3, 6, 1]])  # the third is crowd
    dets = [([12.0, 22.0, 108.0, 230.0], 0.9, 4), ([550.0, 400.0, 600.0, 450.0], 0.5, 6),
            ([600.0, 0.0, 640.0, 10.0], 0.1, 1)]
    cb = make_coarse_boxes(gt, info, geo, 42, dets, seed=1, jitter=0.25)
    assert cb.gt_index.tolist() == [0, -1, -1]  # the crowd box is never a target
    assert cb.scores.tolist() == pytest.approx([0.9, 0.5, 0.1]) and cb.category_id.tolist() == [4, 6, 1]
    assert len(make_coarse_boxes(gt, info, geo, 42, [], 1, 0.25)) == 0
    j = make_coarse_boxes(gt, info, geo, 42, None, seed=1, jitter=0.25)
    assert j.gt_index.tolist() == [0, 1] and j.scores.tolist() == [1.0, 1.0] and j.category_id.tolist() == [4, 5]
    again = make_coarse_boxes(gt, info, geo, 42, None, seed=1, jitter=0.25)
    assert torch.equal(j.boxes, again.boxes)
    for other in (make_coarse_boxes(gt, info, geo, 43, None, 1, 0.25),
                  make_coarse_boxes(gt, info, geo, 42, None, 2, 0.25)):
        assert not torch.equal(j.boxes, other.boxes)
    small = make_coarse_boxes(gt, info, geo, 42, None, seed=1, jitter=0.05)
    assert (small.boxes - gt[:2]).abs().max() < (j.boxes - gt[:2]).abs().max()
    no_gt = make_coarse_boxes(torch.zeros((0, 4)), torch.zeros((0, 3), dtype=torch.int64), geo, 1, None, 1, 0.25)
    assert len(no_gt) == 0
    g1, g2 = _row_generator(1, 42), _row_generator(42, 1)
    assert float(torch.rand((), generator=g1)) != float(torch.rand((), generator=g2))


def test_detection_pairs_keep_matched_trainable_gt_only() -> None:
    gt = torch.tensor([[10.0, 20.0, 110.0, 220.0], [0.0, 0.0, 50.0, 50.0], [5.0, 5.0, 5.0, 40.0]])
    info = torch.tensor([[1, 1, 0], [2, 1, 1], [3, 1, 0]])
    dets = [([12.0, 22.0, 108.0, 230.0], 0.9, 1), ([0.0, 0.0, 50.0, 50.0], 0.5, 1), ([5.0, 5.0, 6.0, 40.0], 0.5, 1)]
    boxes, idx = detection_pairs(dets, gt, info, 0.5)
    assert boxes.tolist() == [[12.0, 22.0, 108.0, 230.0]] and idx.tolist() == [0]
    for empty in (detection_pairs([], gt, info, 0.5), detection_pairs(dets, torch.zeros((0, 4)), info[:0], 0.5)):
        assert empty[0].shape == (0, 4) and empty[1].shape == (0,) and empty[1].dtype == torch.int64


def test_saved_boxes_round_trip_and_refuse_non_finite(tmp_path: Path) -> None:
    path = tmp_path / "boxes.json"
    cb = {7: COARSE[7], 8: COARSE[8]}
    save_coarse_boxes(path, cb, {7: 70, 8: 80}, "jitter", {"seed": 3, "provenance": {"a": "b"}})
    back, meta = load_coarse_boxes(path)
    assert meta == {"source": "jitter", "seed": 3, "provenance": {"a": "b"}}
    assert set(back) == {7, 8} and back[8].boxes.shape == (0, 4)
    for k in cb:
        for f in ("boxes", "gt_index", "scores", "category_id"):
            assert torch.equal(getattr(back[k], f), getattr(cb[k], f)), (k, f)
            assert getattr(back[k], f).dtype == getattr(cb[k], f).dtype
    doc = json.loads(path.read_text())
    assert doc["images"]["7"]["image_id"] == 70
    for bad in ("boxes", "scores"):
        broken = json.loads(path.read_text())
        v = broken["images"]["7"][bad]
        if bad == "boxes":
            v[0][1] = float("inf")
        else:
            v[0] = float("nan")
        path.write_text(json.dumps(broken))
        with pytest.raises(DataError, match="image_id 70: a box or score is not a finite number"):
            load_coarse_boxes(path)


class _Split:
    def __init__(self, sha: str, layout: str, ids: list[int]):
        self.annotations_sha256, self._layout, self._ids = sha, layout, ids

    def layout_digest(self) -> str:
        return self._layout

    def image_ids(self):
        import numpy as np

        return np.array(self._ids)


class _Ds:
    """What ``fixed_coarse_boxes`` reads of a split: its rows, records, keys and GT."""

    def __init__(self, sha: str = "s1", layout: str = "l1", ids: tuple[int, ...] = (70, 71, 72),
                 rows: tuple[int, ...] = (0, 1, 2)):
        import numpy as np

        from boxrefine.shared.store.schema import FIELD, ROW_FIELDS

        self._split = _Split(sha, layout, list(ids))
        self.rows = list(rows)
        rec = np.zeros((3, len(ROW_FIELDS)), np.int64)
        rec[:, FIELD["orig_h"]], rec[:, FIELD["orig_w"]] = 480, 640
        rec[:, FIELD["input_h"]], rec[:, FIELD["input_w"]] = 768, 1024
        self.records = rec
        self.keys = np.array([7, 8, 9])
        self.gt = {0: (None, GT0.numpy(), np.array([[1, 1, 0], [2, 1, 0]])), 1: None,
                   2: (None, GT1.numpy(), np.array([[3, 1, 0]]))}

    def split(self):
        return self._split

    def read_gt(self, i, masks=False):
        return self.gt[i]


def _cfg(tmp_path: Path, detections: Path | None = None):
    from conftest import config_dict

    from boxrefine.shared.config import validate_config

    raw = config_dict(tmp_path, tmp_path / "s.zarr")
    raw["data"]["splits"]["val"]["detections"] = str(detections) if detections else None
    raw["evaluate"] = {"seed": 5, "jitter": 0.2}
    return validate_config(raw, "<test>", tmp_path)


def test_fixed_boxes_are_saved_read_back_and_redrawn_when_inputs_change(tmp_path: Path, capsys) -> None:
    cfg, path = _cfg(tmp_path), tmp_path / "eval_boxes.json"
    boxes = fixed_coarse_boxes(cfg, "val", _Ds(), path)
    assert set(boxes) == {7, 9}  # row 1's GT is damaged and left out
    meta = json.loads(path.read_text())
    assert meta["source"] == "jitter" and meta["seed"] == 5 and meta["jitter"] == 0.2
    assert meta["provenance"] == {"annotations_sha256": "s1", "detections_sha256": None, "layout_sha256": "l1"}
    assert meta["images"]["9"]["image_id"] == 72
    path.write_text(path.read_text().replace(json.dumps(meta["images"]["7"]["boxes"][0][0]), "1.5", 1))
    again = fixed_coarse_boxes(cfg, "val", _Ds(), path)  # read back: the edit shows
    assert float(again[7].boxes[0, 0]) == 1.5
    capsys.readouterr()
    redrawn = fixed_coarse_boxes(cfg, "val", _Ds(layout="l2"), path)
    assert torch.equal(redrawn[7].boxes, boxes[7].boxes)
    c = capsys.readouterr()
    assert "came from other layout; drawing them again" in " ".join((c.out + c.err).split())
    fixed_coarse_boxes(cfg, "val", _Ds(sha="s2", layout="l3"), path)
    c = capsys.readouterr()
    assert "came from other annotations, layout;" in " ".join((c.out + c.err).split())
    assert fixed_coarse_boxes(cfg, "val", _Ds(), None).keys() == {7, 9}
    path.write_text("{not json")
    with pytest.raises(SavedBoxesError, match="cannot read the saved evaluation boxes .*delete it"):
        fixed_coarse_boxes(cfg, "val", _Ds(), path)


def test_fixed_boxes_from_detections(tmp_path: Path) -> None:
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 70, "category_id": 1, "bbox": [10, 20, 50, 60], "score": 0.9},
                                {"image_id": 72, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.3}]))
    cfg, path = _cfg(tmp_path, dets), tmp_path / "eval_boxes.json"
    boxes = fixed_coarse_boxes(cfg, "val", _Ds(), path)
    assert boxes[7].boxes.tolist() == [[10.0, 20.0, 60.0, 80.0]] and boxes[7].gt_index.tolist() == [0]
    assert boxes[9].gt_index.tolist() == [-1] and boxes[9].scores.tolist() == pytest.approx([0.3])
    meta = json.loads(path.read_text())
    assert meta["source"] == f"detections:{dets}" and meta["provenance"]["detections_sha256"] is not None


def test_fixed_boxes_use_detections_of_every_usable_row_and_count_the_others(tmp_path: Path, capsys) -> None:
    """Image id 1 is an image like any other (-1 marks a row whose image left the annotations)."""
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [10, 20, 50, 60], "score": 0.9},
                                {"image_id": 2, "category_id": 1, "bbox": [10, 20, 50, 60], "score": 0.9},
                                {"image_id": -1, "category_id": 1, "bbox": [10, 20, 50, 60], "score": 0.9}]))
    cfg = _cfg(tmp_path, dets)
    boxes = fixed_coarse_boxes(cfg, "val", _Ds(ids=(1, 2, 3), rows=(0, 2)), None)
    assert len(boxes[7]) == 1 and boxes[7].gt_index.tolist() == [0] and len(boxes[9]) == 0
    said = " ".join("".join(capsys.readouterr()).split())
    assert "1 detection(s) for 1 image(s) of the split without a usable row" in said and "(e.g. 2)" in said
    assert "1 detection(s) for 1 image id(s) not in the split (e.g. -1)" in said
    fixed_coarse_boxes(cfg, "val", _Ds(ids=(2, 1, -1), rows=(0,)), None)
    said = " ".join("".join(capsys.readouterr()).split())
    assert "without a usable row (bad, damaged or not extracted) (e.g. 1)" in said
    assert "image id(s) not in the split (e.g. -1)" in said


def test_jitter_seeds_differ_for_every_image() -> None:
    geo = ImageGeometry.of(480, 640)
    gt = torch.tensor([[100.0, 100.0, 300.0, 300.0]])
    info = torch.tensor([[1, 1, 0]])
    drawn = {tuple(make_coarse_boxes(gt, info, geo, key, None, 1234, 0.25).boxes[0].tolist()) for key in range(300)}
    assert len(drawn) == 300
    big = make_coarse_boxes(gt, info, geo, 2**62 + 5, None, 2**40, 0.25)  # any int64 key and seed
    assert big.boxes.shape == (1, 4)


def test_edge_cases_of_matching() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    none = match_to_gt(boxes, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.bool), 0.5)
    assert none.tolist() == [-1] and none.dtype == torch.int64
    geo = ImageGeometry.of(480, 640)
    empty = make_coarse_boxes(torch.zeros((0, 4)), torch.zeros((0, 3), dtype=torch.int64), geo, 1, [], 1, 0.25)
    assert empty.boxes.shape == (0, 4) and empty.gt_index.shape == (0,) and empty.scores.shape == (0,)
    assert empty.category_id.shape == (0,) and empty.gt_index.dtype == torch.int64
    one_gt = detection_pairs([([0.0, 0.0, 10.0, 10.0], 0.9, 1)], torch.tensor([[0.0, 0.0, 10.0, 11.0]]),
                             torch.tensor([[1, 1, 0]]), 0.5)
    assert one_gt[1].tolist() == [0]
