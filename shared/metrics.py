"""Box and mask metrics: one implementation, used by train's periodic evaluation and by evaluate."""

from __future__ import annotations

import torch

from shared.boxes import paired_iou

IOU_THRESHOLDS = (0.5, 0.75, 0.9)


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
