"""The robustness curve of ``evaluate --noise 0.1,0.2,...``: the best checkpoint scored on GT boxes
jittered at each level (the noisy-box protocol of OA-MIL, Liu et al. 2022: centre ±r·w/h, sides ×(1±r),
seeded per image by ``evaluate.seed``), beside the jittered boxes themselves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from boxrefine.shared.model.refiner import BoxRefiner
from boxrefine.shared.scoring.coarse import CoarseBoxes, make_coarse_boxes
from boxrefine.shared.scoring.predict import ImagePrediction, summarize
from boxrefine.shared.store.rows import StoreRows, row_geometry


def jittered_gt(ds: StoreRows, level: float, seed: int) -> dict[int, CoarseBoxes]:
    """Every image's GT boxes jittered at ``level`` (detections, if any, are not used here)."""
    out = {}
    for i in ds.rows:
        gt = ds.read_gt(i)
        if gt is None:  # damaged, left out (store.on_damage: skip)
            continue
        _, boxes, info = gt
        key = int(ds.keys[i])
        out[key] = make_coarse_boxes(torch.from_numpy(boxes), torch.from_numpy(info), row_geometry(ds.records[i]),
                                     key, None, seed, level)
    return out


def robustness_curve(levels: list[float], ds: StoreRows, seed: int, refiner: BoxRefiner,
                     predict: Callable[..., list[ImagePrediction]]) -> list[dict[str, Any]]:
    """Per level: {"noise", "boxes", "coarse_mean_iou", "refined_mean_iou"}; ``predict(coarse, refiner=)``
    is the evaluation's prediction (same device, precision, batches, heads)."""
    out = []
    for level in levels:
        s = summarize(predict(jittered_gt(ds, level, seed), refiner=refiner))
        mean = {k: json_num((s.get(k) or {}).get("mean_iou")) for k in ("coarse", "refined")}
        out.append({"noise": level, "boxes": s.get("boxes"), "coarse_mean_iou": mean["coarse"],
                    "refined_mean_iou": mean["refined"]})
    return out


def json_num(v: float | None) -> float | None:
    """NaN (no box) → None."""
    return None if v is None or v != v else float(v)
