"""Where the refiner gains and where it loses: every matched box of an evaluation with its IoUs, and the
metrics split by COCO object size and by the coarse box's IoU band.

Sizes are COCO's (small < 32², medium < 96², large; by the GT's annotated ``area``, as pycocotools
splits AP, else the GT box's area when the annotation file gives none). Bands are the coarse box's IoU
to its GT: < 0.5, 0.5–0.75, ≥ 0.75 (a box the detector nearly missed, a loose one, a good one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boxrefine.shared.geometry.boxes import paired_iou
from boxrefine.shared.scoring.metrics import SIZES
from boxrefine.shared.scoring.predict import ImagePrediction
from boxrefine.shared.store.rows import StoreRows

SIZE_LIMITS = (32.0**2, 96.0**2)  # pycocotools' areaRng
BANDS = (("<0.5", 0.0, 0.5), ("0.5-0.75", 0.5, 0.75), (">=0.75", 0.75, float("inf")))


def annotation_areas(path: Path) -> dict[int, float]:
    """Annotation id → its ``area`` from a COCO file; empty when the file cannot be read."""
    try:
        doc = json.loads(Path(path).read_text())
        return {int(a["id"]): float(a["area"]) for a in doc.get("annotations", []) if "area" in a}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


@dataclass
class MatchedBoxes:
    """Every coarse box matched to a GT, in prediction order (the order ``summarize`` scores them)."""

    row: np.ndarray  # store row of the image
    index: np.ndarray  # position among the image's coarse boxes
    gt: np.ndarray  # n×4 xyxy, original px
    coarse: np.ndarray  # n×4
    area: np.ndarray  # COCO area of the GT
    coarse_iou: np.ndarray
    zero_shot_iou: np.ndarray | None

    @classmethod
    def of(cls, preds: list[ImagePrediction], ds: StoreRows, annotations: Path) -> MatchedBoxes:
        areas = annotation_areas(annotations)
        parts: dict[str, list[Any]] = {k: [] for k in ("row", "index", "gt", "coarse", "area", "zs")}
        for p in preds:
            ok = ~torch.isnan(p.gt).any(1)
            if not bool(ok.any()):
                continue
            gt = ds.read_gt(p.row)
            ann_ids = gt[2][p.gt_index[ok].numpy(), 0] if gt is not None else np.full(int(ok.sum()), -1)
            box_area = ((p.gt[ok, 2] - p.gt[ok, 0]) * (p.gt[ok, 3] - p.gt[ok, 1])).numpy()
            parts["area"].append(np.array([areas.get(int(a), float(b)) for a, b in zip(ann_ids, box_area,
                                                                                     strict=True)]))
            parts["row"].append(np.full(int(ok.sum()), p.row))
            parts["index"].append(np.flatnonzero(ok.numpy()))
            parts["gt"].append(p.gt[ok].numpy())
            parts["coarse"].append(p.coarse[ok].numpy())
            parts["zs"].append(None if p.zero_shot is None else p.zero_shot[ok].numpy())
        if not parts["row"]:
            empty = np.zeros(0)
            return cls(empty.astype(int), empty.astype(int), np.zeros((0, 4)), np.zeros((0, 4)), empty, empty, None)
        gt, coarse = np.concatenate(parts["gt"]), np.concatenate(parts["coarse"])
        zs = None if any(z is None for z in parts["zs"]) else _ious(np.concatenate(parts["zs"]), gt)
        return cls(np.concatenate(parts["row"]), np.concatenate(parts["index"]), gt, coarse,
                   np.concatenate(parts["area"]), _ious(coarse, gt), zs)

    def __len__(self) -> int:
        return len(self.row)

    def refined_boxes(self, preds: list[ImagePrediction]) -> np.ndarray:
        """Each matched box's refined box (``preds`` of a checkpoint, same order), n×4."""
        parts = [p.refined[~torch.isnan(p.gt).any(1)].numpy() for p in preds if p.refined is not None]
        return np.concatenate(parts) if parts else np.zeros((0, 4))

    def refined_iou(self, preds: list[ImagePrediction]) -> np.ndarray:
        """IoU of each matched box's refined box with its GT."""
        return _ious(self.refined_boxes(preds), self.gt)

    def groups(self) -> dict[str, dict[str, np.ndarray]]:
        """Boolean masks of the boxes in each size and each coarse-IoU band."""
        small, medium = SIZE_LIMITS
        size = {"small": self.area < small, "medium": (self.area >= small) & (self.area < medium),
                "large": self.area >= medium}
        band = {name: (self.coarse_iou >= lo) & (self.coarse_iou < hi) for name, lo, hi in BANDS}
        return {"by_size": {k: size[k] for k in SIZES}, "by_coarse_iou": band}

    def split(self, ious: np.ndarray | None, ap_by_size: dict[str, Any] | None = None) -> dict[str, Any]:
        """``{"by_size": {size: {"boxes", "mean_iou", AP...}}, "by_coarse_iou": {band: {"boxes", "mean_iou"}}}``
        for one set of per-box IoUs (coarse, zero-shot or a checkpoint's refined boxes)."""
        out: dict[str, Any] = {}
        for kind, masks in self.groups().items():
            out[kind] = {}
            for name, m in masks.items():
                n = int(m.sum())
                entry: dict[str, Any] = {"boxes": n,
                                         "mean_iou": float(ious[m].mean()) if ious is not None and n else None}
                if kind == "by_size":
                    entry.update((ap_by_size or {}).get(name) or {"AP": None, "AP50": None, "AP75": None})
                out[kind][name] = entry
        return out


def _ious(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    return paired_iou(torch.from_numpy(boxes).float(), torch.from_numpy(gt).float()).numpy().astype(np.float64)
