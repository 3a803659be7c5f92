"""Box and mask metrics: one implementation, used by train's periodic evaluation and by evaluate."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from boxrefine.shared.geometry.boxes import paired_iou

IOU_THRESHOLDS = (0.5, 0.75, 0.9)
# COCO's object sizes (pycocotools' areaRng): area < 32², 32²–96², ≥ 96² pixels
SIZES = ("small", "medium", "large")


def box_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """Matched pairs pred[i] ↔ gt[i] (n×4 xyxy, original px): mean IoU, accuracy at IoU ≥ 0.5 /
    0.75 / 0.9, and the mean absolute side error in pixels."""
    if len(pred) == 0:
        return {"n": 0, "mean_iou": float("nan"), **{f"acc@{t}": float("nan") for t in IOU_THRESHOLDS},
                "side_err_px": float("nan")}
    iou = paired_iou(pred.float(), gt.float())
    out = {"n": int(len(pred)), "mean_iou": float(iou.mean())}
    for t in IOU_THRESHOLDS:
        out[f"acc@{t}"] = float((iou >= t).float().mean())
    out["side_err_px"] = float((pred.float() - gt.float()).abs().mean())
    return out


def mask_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-pair IoU of boolean masks pred[i] ↔ gt[i] (n×H×W, same frame). Both empty → 1."""
    p, g = pred.flatten(1).bool(), gt.flatten(1).bool()
    inter = (p & g).sum(1).float()
    union = (p | g).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _ap(precision: Any, iou_index: int | None, area_index: int) -> float:
    """AP from COCOeval's accumulated precision (T×R×K×A×M) as ``COCOeval.summarize`` computes it:
    all IoU thresholds (or one), one area range, maxDets 100; -1 when nothing is there to score."""
    p = precision[:, :, :, area_index, -1] if iou_index is None else precision[iou_index, :, :, area_index, -1]
    p = p[p > -1]
    return float(p.mean()) if p.size else -1.0


def coco_box_ap(annotations: str | Path | Any, results: list[dict[str, Any]],
                image_ids: Iterable[int] | None = None, by_size: bool = False) -> dict[str, Any]:
    """COCO box AP / AP50 / AP75 of ``results`` (COCO results format: image_id, category_id,
    bbox [x, y, w, h], score) against ``annotations`` (a COCO instances JSON path, or a loaded
    ``pycocotools.coco.COCO``), by pycocotools' own ``loadRes`` + ``COCOeval(iouType="bbox")``,
    restricted to ``image_ids`` (default: every image of the annotations). pycocotools' printing
    is silenced; ``results`` is not modified. No results at all gives 0.0 everywhere. ``by_size``:
    also ``{"small": {"AP", "AP50", "AP75"}, "medium": ..., "large": ...}`` (COCO's area ranges)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        gt = annotations if isinstance(annotations, COCO) else COCO(str(annotations))
        ids = sorted(int(i) for i in image_ids) if image_ids is not None else sorted(gt.getImgIds())
        wanted = set(ids)
        res = [copy.deepcopy(r) for r in results if int(r["image_id"]) in wanted]
        if not res or not ids:
            zero = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
            return {**zero, **({s: dict(zero) for s in SIZES} if by_size else {})}
        dt = gt.loadRes(res)  # loadRes adds area/id/segmentation to the dicts it is given: copies
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: dict[str, Any] = {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2])}
    if by_size:
        prec, thresholds = ev.eval["precision"], list(ev.params.iouThrs)
        i50, i75 = thresholds.index(0.5), int(min(range(len(thresholds)), key=lambda i: abs(thresholds[i] - 0.75)))
        for a, name in enumerate(SIZES, start=1):  # area range 0 is "all"
            out[name] = {"AP": _ap(prec, None, a), "AP50": _ap(prec, i50, a), "AP75": _ap(prec, i75, a)}
    return out
