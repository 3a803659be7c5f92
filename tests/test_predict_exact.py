"""Prediction at its boundaries (``shared/scoring/predict.py``): each box is refined, clipped and taken
back to the original frame, unmatched boxes never score, the frozen heads run only where something
reads them and on the image's own features, mask IoU is cropped to the valid region, summaries weight
by box counts. Synthetic rows, a stub refiner and stub heads: no store, no encoder."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import pytest
import torch
from test_scoring_boundaries import COARSE, GT0, GT1
from torch import nn

from boxrefine.shared.geometry.frames import ImageGeometry
from boxrefine.shared.scoring.predict import ImagePrediction, _mask_iou, predict, summarize

GEO = ImageGeometry((256, 512), (512, 1024))  # ×2 on both axes; low-res valid region 128 × 256


class ShiftRefiner(nn.Module):
    """Moves every box by +8 input px on each coordinate; records the mask logits it is given."""

    def __init__(self, use_mask: bool = False):
        super().__init__()
        self.use_mask = use_mask
        self.step = nn.Parameter(torch.tensor(8.0))  # a weight: outside no_grad its output needs grad
        self.seen: list[Any] = []
        self.regions_asked: list[torch.Tensor] = []

    def mask_regions(self, boxes: torch.Tensor) -> list[tuple[int, int, int, int]]:
        self.regions_asked.append(boxes.clone())
        return [(0, 0, 9, 9)] * len(boxes)

    def forward(self, emb, interm, boxes, mask_in=None, generators=None):
        self.seen.append(mask_in)
        return torch.cat(boxes) + self.step


class BoxHeads:
    """HQ-SAM stand-in: the logits of a box prompt are +5 inside the box (low-res frame), −5 outside."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, emb, interm, boxes, regions=None):
        self.calls.append({"n": len(boxes), "regions": regions, "boxes": boxes.clone(),
                           "features": (tuple(emb.shape), tuple(interm.shape), float(emb[0, 0, 0, 0]),
                                        float(interm[0, 0, 0, 0]))})
        out = torch.full((len(boxes), 1, 256, 256), -5.0)
        for i, b in enumerate((boxes / 4).round().long().tolist()):
            out[i, 0, b[1]:b[3], b[0]:b[2]] = 5.0
        return out, None


class Rows(torch.utils.data.Dataset):
    """What ``predict`` reads from a store: rows with features, GT and geometry."""

    store_path = "unused"

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items
        self.accepted: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return self.items[k]

    def accept(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        batch.pop("damaged", None)
        batch.pop("busy", None)
        self.accepted.append(list(batch["row"]))
        return batch if batch["row"] else None


def _item(row: int, key: int, gt_boxes: torch.Tensor) -> dict[str, Any]:
    masks = torch.zeros(len(gt_boxes), 256, 256, dtype=torch.uint8)
    for i, b in enumerate((GEO.boxes_to_input(gt_boxes) / 4).round().long().tolist()):
        masks[i, b[1]:b[3], b[0]:b[2]] = 1
    return {"row": row, "key": key, "image_embeddings": torch.full((256, 64, 64), float(row)),
            "interm_embeddings": torch.full((64, 64, 8), 10.0 + row), "gt_boxes": gt_boxes,
            "gt_info": torch.tensor([[i + 1, 1, 0] for i in range(len(gt_boxes))]), "geometry": GEO,
            "gt_masks": masks}


def _rows() -> Rows:
    return Rows([_item(0, 7, GT0), _item(1, 8, GT1), _item(2, 9, GT1)])


def test_predict_fills_gt_refined_boxes_and_loss_terms_per_image() -> None:
    heard = []
    preds = predict(_rows(), COARSE, torch.device("cpu"), refiner=ShiftRefiner(), heads=None, batch_images=2,
                    on_batch=heard.append)
    assert heard == [2, 1] and [p.row for p in preds] == [0, 1, 2] and [p.key for p in preds] == [7, 8, 9]
    p0, p1, p2 = preds
    assert torch.equal(p0.gt[0], GT0[0]) and torch.isnan(p0.gt[1]).all() and torch.equal(p0.gt[2], GT0[1])
    assert torch.equal(p0.scores, COARSE[7].scores) and torch.equal(p0.category_id, COARSE[7].category_id)
    # +8 input px = +4 original px, clipped to the 512 × 256 image
    torch.testing.assert_close(p0.refined, COARSE[7].boxes + 4.0)
    torch.testing.assert_close(p2.refined, torch.tensor([[504.0, 244.0, 512.0, 256.0]]))
    assert p1.refined.shape == (0, 4) and p1.gt.shape == (0, 4) and p1.loss_terms == {}
    assert p0.loss_terms["n"] == 2 and p0.loss_terms["l1"] > 0 and p0.loss_terms["giou"] > 0
    assert p0.zero_shot is None and p0.mask_iou_refined is None
    # stopping after the first batch keeps what is done
    stopped = predict(_rows(), COARSE, torch.device("cpu"), refiner=ShiftRefiner(), heads=None, batch_images=2,
                      should_stop=lambda: True)
    assert [p.row for p in stopped] == [0, 1]


def test_predict_with_heads_scores_zero_shot_and_masks_on_matched_boxes() -> None:
    heads = BoxHeads()
    refiner = ShiftRefiner(use_mask=True)
    preds = predict(_rows(), COARSE, torch.device("cpu"), refiner=refiner, heads=heads, batch_images=3,
                    zero_shot=True, masks=True)
    p0, p1, p2 = preds
    assert all(c["regions"] is None for c in heads.calls)  # whole masks: zero-shot boxes and mask IoU read them
    assert [c["n"] for c in heads.calls] == [3, 1, 3, 1]  # coarse prompts, then refined boxes, per image
    torch.testing.assert_close(p0.zero_shot, COARSE[7].boxes, atol=2.5, rtol=0)
    assert p1.zero_shot.shape == (0, 4) and p1.mask_iou_coarse.shape == (0,) and p1.mask_iou_refined.shape == (0,)
    assert torch.isnan(p0.mask_iou_coarse[1]) and torch.isnan(p0.mask_iou_refined[1])
    assert 0.8 < float(p0.mask_iou_coarse[0]) < 1.0 and float(p0.mask_iou_refined[0]) < float(p0.mask_iou_coarse[0])
    assert refiner.seen[0].shape == (4, 1, 256, 256)  # the logits of every image's boxes, in order
    no_coarse = predict(_rows(), COARSE, torch.device("cpu"), refiner=None, heads=heads, masks=True,
                        coarse_masks=False)
    assert all(p.mask_iou_coarse is None and p.refined is None for p in no_coarse)


def test_predict_asks_only_the_refiners_regions_when_nothing_else_reads_the_logits() -> None:
    heads, refiner = BoxHeads(), ShiftRefiner(use_mask=True)
    predict(_rows(), COARSE, torch.device("cpu"), refiner=refiner, heads=heads, batch_images=3)
    assert [c["regions"] for c in heads.calls] == [[(0, 0, 9, 9)] * 3, [(0, 0, 9, 9)]]
    torch.testing.assert_close(refiner.regions_asked[0], GEO.boxes_to_input(COARSE[7].boxes))
    heads2 = BoxHeads()
    predict(_rows(), COARSE, torch.device("cpu"), refiner=ShiftRefiner(use_mask=False), heads=heads2)
    assert heads2.calls == []  # nobody reads mask logits


def test_mask_iou_crops_to_the_valid_region_and_resizes_to_the_gt() -> None:
    geo = ImageGeometry((256, 512), (512, 1024))  # valid: 128 rows of 256
    gt = torch.zeros(2, 256, 256, dtype=torch.uint8)
    gt[0, 10:20, 10:20] = 1
    logits = torch.full((3, 1, 256, 256), -1.0)
    logits[0, 0, 10:20, 10:20] = 1.0
    logits[0, 0, 200:, :] = 1.0  # the padding: never scored
    logits[2, 0, 10:20, 10:15] = 1.0
    out = _mask_iou(logits, gt, torch.tensor([0, -1, 0]), geo)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == pytest.approx(0.5)
    small = torch.zeros(1, 64, 64, dtype=torch.uint8)  # store.gt_mask_size 64
    small[0, 2:5, 2:5] = 1
    lg = torch.full((1, 1, 256, 256), -1.0)
    lg[0, 0, 8:20, 8:20] = 1.0
    assert _mask_iou(lg, small, torch.tensor([0]), geo)[0] == 1.0
    assert torch.isnan(_mask_iou(lg, small, torch.tensor([-1]), geo)).all()


def test_summarize_scores_matched_boxes_and_weights_losses_by_count() -> None:
    def pred(coarse, gt, refined, terms=None, miou=None):
        p = ImagePrediction(0, 0, torch.tensor(coarse), torch.tensor(gt), torch.zeros(len(coarse)),
                            torch.ones(len(coarse)), torch.ones(len(coarse)))
        p.refined = torch.tensor(refined)
        p.loss_terms = terms or {}
        p.mask_iou_refined = torch.tensor(miou) if miou is not None else None
        return p

    nan = float("nan")
    a = pred([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 5.0, 5.0]], [[0.0, 0.0, 10.0, 20.0], [nan] * 4],
             [[0.0, 0.0, 10.0, 20.0], [9.0, 9.0, 10.0, 10.0]], {"l1": 1.0, "giou": 0.5, "n": 1}, [0.4, 0.9])
    b = pred([[0.0, 0.0, 10.0, 10.0]], [[0.0, 0.0, 10.0, 10.0]], [[0.0, 0.0, 10.0, 5.0]],
             {"l1": 4.0, "giou": 1.0, "n": 3}, [0.8])
    s = summarize([a, b])
    assert (s["images"], s["boxes"], s["unmatched"]) == (2, 2, 1)
    assert s["coarse"]["mean_iou"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["refined"]["mean_iou"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["mask_iou_refined"] == pytest.approx((0.4 + 0.8) / 2)
    assert s["loss_l1"] == pytest.approx((1.0 + 12.0) / 4) and s["loss_giou"] == pytest.approx((0.5 + 3.0) / 4)
    assert "zero_shot" not in s and "mask_iou_coarse" not in s
    b.refined = None  # one image without refined boxes: no refined metrics at all
    assert "refined" not in summarize([a, b])
    assert summarize([]) == {"images": 0}
    unmatched = pred([[0.0, 0.0, 1.0, 1.0]], [[nan] * 4], [[0.0, 0.0, 1.0, 1.0]], miou=[nan])
    s2 = summarize([unmatched])
    assert s2["boxes"] == 0 and math.isnan(s2["mask_iou_refined"]) and "loss_l1" not in s2




def test_predict_runs_without_gradients_in_this_process_with_its_defaults() -> None:
    pid, seen = os.getpid(), []

    class Here(Rows):
        def __getitem__(self, k: int) -> dict[str, Any]:
            seen.append(os.getpid())
            return super().__getitem__(k)

    heard: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. pin_memory asked for on a machine without an accelerator
        preds = predict(Here(_rows().items), COARSE, torch.device("cpu"), refiner=ShiftRefiner(), heads=None,
                        on_batch=heard.append)
    assert heard == [2, 1]  # two images per batch by default
    assert seen == [pid] * 3  # no DataLoader worker by default
    assert all(not p.refined.requires_grad for p in preds)


def test_on_batch_counts_damaged_and_busy_rows_too() -> None:
    items = _rows().items
    rows = Rows([items[0], {"row": 5, "damage": "a bad chunk"}, {"row": 6, "busy": True}, items[2]])
    heard: list[int] = []
    preds = predict(rows, COARSE, torch.device("cpu"), refiner=ShiftRefiner(), heads=None, batch_images=3,
                    on_batch=heard.append)
    assert heard == [3, 1] and [p.row for p in preds] == [0, 2]


def test_heads_read_each_images_own_features() -> None:
    heads = BoxHeads()
    predict(_rows(), COARSE, torch.device("cpu"), refiner=ShiftRefiner(use_mask=True), heads=heads, batch_images=3,
            masks=True)
    # the coarse prompts of each image with boxes (rows 0 and 2 of the batch), then their refined boxes
    assert [c["features"] for c in heads.calls] == [((1, 256, 64, 64), (1, 64, 64, 8), r, 10.0 + r)
                                                    for r in (0.0, 2.0, 0.0, 2.0)]


@pytest.mark.parametrize("zero_shot, coarse_masks", [(True, False), (False, True)])
def test_whole_masks_when_zero_shot_or_coarse_masks_reads_them(zero_shot: bool, coarse_masks: bool) -> None:
    heads = BoxHeads()
    predict(_rows(), COARSE, torch.device("cpu"), refiner=ShiftRefiner(use_mask=True), heads=heads, batch_images=3,
            zero_shot=zero_shot, masks=coarse_masks, coarse_masks=coarse_masks)
    assert heads.calls and all(c["regions"] is None for c in heads.calls)


def test_a_logit_of_zero_is_not_the_mask() -> None:
    geo = ImageGeometry((256, 512), (512, 1024))
    gt = torch.zeros(1, 256, 256, dtype=torch.uint8)
    gt[0, 10:20, 10:20] = 1
    logits = torch.full((1, 1, 256, 256), -1.0)
    logits[0, 0, 10:20, 10:20] = 1.0
    logits[0, 0, 30:40, 30:40] = 0.0
    assert _mask_iou(logits, gt, torch.tensor([0]), geo)[0] == 1.0
