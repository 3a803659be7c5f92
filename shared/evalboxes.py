"""Coarse boxes: detector boxes matched to ground truth, and the fixed evaluation boxes.

Evaluation boxes are identical for every checkpoint: the detections file when one is configured,
otherwise a jitter of GT seeded per image (by its row key), saved beside the results so that a
rerun reads the same boxes back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from boxrefine.shared.boxes import jitter_boxes
from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.fileio import atomic_write_json, read_bytes
from boxrefine.shared.records import DataError
from boxrefine.shared.rowdata import StoreRows
from boxrefine.shared.store import F


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


def load_detections(path: Path) -> dict[int, list[tuple[list[float], float, int]]]:
    """COCO results JSON → {image_id: [(xyxy, score, category_id), ...]}."""
    try:
        data = json.loads(read_bytes(path, DataError, "detections file"))
    except ValueError as e:
        raise DataError(f"{path}: detections are not valid JSON: {e}") from None
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
    if not isinstance(data, list):
        raise DataError(f"{path}: detections must be a COCO results list")
    out: dict[int, list[tuple[list[float], float, int]]] = {}
    for i, d in enumerate(data):
        try:
            x, y, w, h = (float(v) for v in d["bbox"])
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
                raise ValueError("bad bbox")
            out.setdefault(int(d["image_id"]), []).append(([x, y, x + w, y + h], float(d.get("score", 1.0)),
                                                           int(d.get("category_id", -1))))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: [{i}]: expected {{image_id, bbox [x,y,w,h], score}}, got {d!r:.120}") from None
    return out


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


def make_coarse_boxes(gt_boxes: torch.Tensor, gt_info: torch.Tensor, hw: tuple[int, int], key: int,
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
    boxes = jitter_boxes(gt_boxes[idx].float(), jitter, hw, _row_generator(seed, key))
    return CoarseBoxes(boxes, idx.to(torch.int64), torch.ones(len(idx)), gt_info[idx, 1].to(torch.int64))


def save_coarse_boxes(path: Path, boxes: dict[int, CoarseBoxes], image_ids: dict[int, int], source: str,
                      meta: dict[str, Any]) -> None:
    """Write {key: boxes} as JSON, atomically."""
    doc = {"source": source, **meta, "images": {
        str(k): {"image_id": image_ids[k], "boxes": b.boxes.tolist(), "gt_index": b.gt_index.tolist(),
                 "scores": b.scores.tolist(), "category_id": b.category_id.tolist()} for k, b in boxes.items()}}
    atomic_write_json(path, doc)


def load_coarse_boxes(path: Path) -> tuple[dict[int, CoarseBoxes], dict[str, Any]]:
    doc = json.loads(path.read_text())
    out = {}
    for k, v in doc.pop("images").items():
        out[int(k)] = CoarseBoxes(torch.tensor(v["boxes"], dtype=torch.float32).reshape(-1, 4),
                                  torch.tensor(v["gt_index"], dtype=torch.int64),
                                  torch.tensor(v["scores"], dtype=torch.float32),
                                  torch.tensor(v["category_id"], dtype=torch.int64))
    return out, doc


def detection_pairs(dets: list[tuple[list[float], float, int]], gt_boxes: torch.Tensor, gt_info: torch.Tensor,
                    min_iou: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pairs from real detector boxes: (boxes k×4, their GT indices k), IoU ≥ min_iou."""
    if not dets or len(gt_boxes) == 0:
        return torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64)
    boxes = torch.tensor([d[0] for d in dets], dtype=torch.float32)
    valid = gt_info[:, 2] == 0
    idx = match_to_gt(boxes, gt_boxes, valid, min_iou)
    keep = idx >= 0
    return boxes[keep], idx[keep]


def sample_subset(n: int, ratio: float, seed: int) -> np.ndarray:
    """A seeded subset of ``round(ratio·n)`` (≥ 1) positions out of n, sorted."""
    k = max(1, int(round(ratio * n))) if n else 0
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def fixed_coarse_boxes(cfg: PipelineConfig, split: str, ds: StoreRows, path: Path | None) -> dict[int, CoarseBoxes]:
    """Fixed evaluation boxes of a split (detections, else seeded GT jitter, per ``cfg.evaluate``),
    read back from ``path`` when it exists and written there otherwise."""
    if path is not None and path.exists():
        boxes, _ = load_coarse_boxes(path)
        return boxes
    scfg = cfg.data.splits[split]
    dets = load_detections(scfg.detections) if scfg.detections else None
    sp = ds.split()
    ids = sp.image_ids()
    out, image_ids = {}, {}
    for i in ds.rows:
        rec = ds.records[i]
        gt = ds.read_gt(i)
        if gt is None:  # damaged, left out (store.on_damage: skip)
            continue
        _, boxes_np, info_np = gt
        gt_boxes, gt_info = torch.from_numpy(boxes_np), torch.from_numpy(info_np)
        key = int(ds.keys[i])
        hw = (int(rec[F["orig_h"]]), int(rec[F["orig_w"]]))
        det = dets.get(int(ids[i]), []) if dets is not None else None
        out[key] = make_coarse_boxes(gt_boxes, gt_info, hw, key, det, cfg.evaluate.seed, cfg.evaluate.jitter)
        image_ids[key] = int(ids[i])
    if path is not None:
        source = f"detections:{scfg.detections}" if dets is not None else "jitter"
        save_coarse_boxes(path, out, image_ids, source, {"split": split, "seed": cfg.evaluate.seed,
                                                         "jitter": cfg.evaluate.jitter})
    return out
