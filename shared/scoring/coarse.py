"""Coarse boxes: detector boxes matched to ground truth, and the fixed evaluation boxes.

Evaluation boxes are identical for every checkpoint: the detections file when one is configured,
otherwise a jitter of GT seeded per image (by its row key), saved beside the results so that a
rerun reads the same boxes back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_iou

from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.data.detections import load_detections
from boxrefine.shared.data.records import DataError, file_sha256
from boxrefine.shared.geometry.boxes import jitter_boxes, trainable_gt
from boxrefine.shared.geometry.frames import ImageGeometry
from boxrefine.shared.runtime.console import console
from boxrefine.shared.runtime.fileio import atomic_write_json
from boxrefine.shared.store.rows import StoreRows, row_geometry


class SavedBoxesError(DataError):
    """Saved evaluation boxes that cannot be read back: the file itself is the problem (deleting it
    draws new ones), not the annotations or detections they are drawn from."""


@dataclass
class CoarseBoxes:
    """Coarse boxes of one image. ``gt_index[i]`` is the GT instance (position in the store row)
    box i is scored against, -1 if it overlaps none. Boxes are xyxy in original pixels."""
    boxes: torch.Tensor  # m×4 float32
    gt_index: torch.Tensor  # m int64
    scores: torch.Tensor  # m float32 (1.0 for jittered GT)
    category_id: torch.Tensor  # m int64

    def __len__(self) -> int:
        return len(self.boxes)



def match_to_gt(boxes: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, min_iou: float) -> torch.Tensor:
    """For each box, the index of the valid GT it overlaps most, if IoU ≥ ``min_iou`` (else -1)."""
    if len(boxes) == 0 or not bool(valid.any()):
        return torch.full((len(boxes),), -1, dtype=torch.int64)
    iou = box_iou(boxes.float(), gt.float())
    iou[:, ~valid] = -1
    best, idx = iou.max(1)
    return torch.where(best >= min_iou, idx, torch.full_like(idx, -1))


def _row_generator(seed: int, key: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + int(key)) % (2**63 - 1))


def make_coarse_boxes(gt_boxes: torch.Tensor, gt_info: torch.Tensor, geometry: ImageGeometry, key: int,
                      detections: list[tuple[list[float], float, int]] | None, seed: int, jitter: float,
                      min_iou: float = 1e-6) -> CoarseBoxes:
    """Fixed evaluation boxes of one image (see module docstring). Crowd GT is never a target."""
    valid = gt_info[:, 2] == 0 if len(gt_info) else torch.zeros(0, dtype=torch.bool)
    if detections is not None:
        if not detections:
            z = torch.zeros((0, 4))
            return CoarseBoxes(z, torch.zeros(0, dtype=torch.int64), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
        boxes = torch.tensor([d[0] for d in detections], dtype=torch.float32)
        scores = torch.tensor([d[1] for d in detections], dtype=torch.float32)
        cats = torch.tensor([d[2] for d in detections], dtype=torch.int64)
        return CoarseBoxes(boxes, match_to_gt(boxes, gt_boxes, valid, min_iou), scores, cats)
    idx = torch.nonzero(valid).flatten()
    boxes = jitter_boxes(gt_boxes[idx].float(), jitter, geometry.orig_hw, _row_generator(seed, key))
    return CoarseBoxes(boxes, idx.to(torch.int64), torch.ones(len(idx)), gt_info[idx, 1].to(torch.int64))


def save_coarse_boxes(path: Path, boxes: dict[int, CoarseBoxes], image_ids: dict[int, int], source: str,
                      meta: dict[str, Any]) -> None:
    """Write {key: boxes} as JSON, atomically."""
    doc = {"source": source, **meta, "images": {
        str(k): {"image_id": image_ids[k], "boxes": b.boxes.tolist(), "gt_index": b.gt_index.tolist(),
                 "scores": b.scores.tolist(), "category_id": b.category_id.tolist()} for k, b in boxes.items()}}
    atomic_write_json(path, doc)


def load_coarse_boxes(path: Path) -> tuple[dict[int, CoarseBoxes], dict[str, Any]]:
    """Saved evaluation boxes; a non-finite box or score (a file written before detections were
    checked) is a DataError naming the file and the image."""
    doc = json.loads(path.read_text())
    out = {}
    for k, v in doc.pop("images").items():
        cb = CoarseBoxes(torch.tensor(v["boxes"], dtype=torch.float32).reshape(-1, 4),
                         torch.tensor(v["gt_index"], dtype=torch.int64),
                         torch.tensor(v["scores"], dtype=torch.float32),
                         torch.tensor(v["category_id"], dtype=torch.int64))
        if not (torch.isfinite(cb.boxes).all() and torch.isfinite(cb.scores).all()):
            raise DataError(f"{path}: image_id {v.get('image_id')}: a box or score is not a finite number")
        out[int(k)] = cb
    return out, doc


def detection_pairs(dets: list[tuple[list[float], float, int]], gt_boxes: torch.Tensor, gt_info: torch.Tensor,
                    min_iou: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pairs from real detector boxes: (boxes k×4, their GT indices k), IoU ≥ min_iou; only
    GT that may be a target (``trainable_gt``)."""
    if not dets or len(gt_boxes) == 0:
        return torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64)
    boxes = torch.tensor([d[0] for d in dets], dtype=torch.float32)
    valid = trainable_gt(gt_boxes, gt_info)
    idx = match_to_gt(boxes, gt_boxes, valid, min_iou)
    keep = idx >= 0
    return boxes[keep], idx[keep]


def boxes_provenance(cfg: PipelineConfig, split: str, ds: StoreRows) -> dict[str, str | None]:
    """What a split's evaluation boxes are computed from: the annotations its stored GT came from,
    the detections file, and the store's row layout (sha256 each)."""
    dets = cfg.data.splits[split].detections
    split_store = ds.split()
    return {"annotations_sha256": split_store.annotations_sha256,
            "detections_sha256": file_sha256(dets) if dets is not None and dets.is_file() else None,
            "layout_sha256": split_store.layout_digest()}


def fixed_coarse_boxes(cfg: PipelineConfig, split: str, ds: StoreRows, path: Path | None) -> dict[int, CoarseBoxes]:
    """Fixed evaluation boxes of a split (detections, else seeded GT jitter, per ``cfg.evaluate``).
    With a ``path``, they are read back from it when it exists and was made from the same
    annotations, detections and store layout (:func:`boxes_provenance`); otherwise they are drawn and
    written there, and a rebuilt file is announced."""
    provenance = boxes_provenance(cfg, split, ds)
    if path is not None and path.exists():
        try:
            boxes, meta = load_coarse_boxes(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SavedBoxesError(f"{path}: cannot read the saved evaluation boxes ({e}); delete it to draw new "
                                  "ones") from None
        old = meta.get("provenance") or {}
        changed = [k.removesuffix("_sha256") for k in provenance if old.get(k) != provenance[k]]
        if not changed:
            return boxes
        console.print(f"note: {path}: the saved evaluation boxes came from other {', '.join(changed)}; "
                      "drawing them again", style="yellow", markup=False)
    split_cfg = cfg.data.splits[split]
    split_store = ds.split()
    ids = split_store.image_ids()
    dets = load_detections(split_cfg.detections, {int(ids[i]) for i in ds.rows} - {-1}, set(ids.tolist()) - {-1},
                           cfg.evaluate.missing_score) if split_cfg.detections else None
    out, image_ids = {}, {}
    for i in ds.rows:
        rec = ds.records[i]
        gt = ds.read_gt(i)
        if gt is None:  # damaged, left out (store.on_damage: skip)
            continue
        _, boxes_np, info_np = gt
        gt_boxes, gt_info = torch.from_numpy(boxes_np), torch.from_numpy(info_np)
        key = int(ds.keys[i])
        det = dets.get(int(ids[i]), []) if dets is not None else None
        out[key] = make_coarse_boxes(gt_boxes, gt_info, row_geometry(rec), key, det, cfg.evaluate.seed,
                                     cfg.evaluate.jitter)
        image_ids[key] = int(ids[i])
    if path is not None:
        source = f"detections:{split_cfg.detections}" if dets is not None else "jitter"
        save_coarse_boxes(path, out, image_ids, source, {"split": split, "seed": cfg.evaluate.seed,
                                                         "jitter": cfg.evaluate.jitter, "provenance": provenance})
    return out
