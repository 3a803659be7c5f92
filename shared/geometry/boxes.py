"""Box utilities (xyxy unless named otherwise). IoU and friends come from torchvision.ops."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou, masks_to_boxes


def xyxy_to_xywh(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[..., :2], b[..., 2:] - b[..., :2]], -1)


def paired_iou(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """IoU of a[i] with b[i] (n×4 each) → n, via torchvision.ops.box_iou in chunks."""
    if len(a) == 0:
        return torch.zeros(0, dtype=torch.float32)
    out = [box_iou(a[i:i + chunk].float(), b[i:i + chunk].float()).diagonal() for i in range(0, len(a), chunk)]
    return torch.cat(out)


def clip_boxes(boxes: torch.Tensor, hw: tuple[int, int], min_size: float = 1.0) -> torch.Tensor:
    """Clip n×4 boxes to an H×W image, keeping them at least ``min_size`` wide/high."""
    h, w = hw
    x0 = boxes[..., 0].clamp(0, w - min_size)
    y0 = boxes[..., 1].clamp(0, h - min_size)
    x1 = torch.maximum(boxes[..., 2].clamp(0, w), x0 + min_size)
    y1 = torch.maximum(boxes[..., 3].clamp(0, h), y0 + min_size)
    return torch.stack([x0, y0, x1, y1], -1)


def jitter_boxes(boxes: torch.Tensor, r: float, hw: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """The usual noisy-box model on n×4 boxes of an H×W image (``hw``): shift the centre by U(-r, r)·w
    and U(-r, r)·h, scale width and height by 1 + U(-r, r) each, clip to the image."""
    if len(boxes) == 0:
        return boxes
    u = (torch.rand((len(boxes), 4), generator=generator, dtype=torch.float64) * 2 - 1) * r
    u = u.to(boxes)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 + u[:, 0] * w
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 + u[:, 1] * h
    nw, nh = w * (1 + u[:, 2]), h * (1 + u[:, 3])
    out = torch.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], -1)
    return clip_boxes(out, hw)


def expand_boxes(boxes: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale boxes about their centres (context around a coarse box)."""
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * factor / 2
    return torch.cat([c - half, c + half], -1)


def mask_boxes(masks: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Pixel-tight boxes of boolean masks (n×H×W) in their own pixel frame: a mask covering columns
    3..5 gives x0 = 3, x1 = 6 (torchvision's ``masks_to_boxes`` + 1 on the far edges). Empty masks
    get their ``fallback`` box."""
    out = fallback.clone().float()
    nonempty = masks.flatten(1).any(1)
    if nonempty.any():
        b = masks_to_boxes(masks[nonempty]).float()
        b[:, 2:] += 1
        out[nonempty] = b.to(out.device)
    return out


def trainable_gt(gt_boxes: torch.Tensor, gt_info: torch.Tensor) -> torch.Tensor:
    """Which GT instances may be a training target: not crowd and of positive width and height (a
    zero-size box has no GIoU gradient worth following and a loss up to 2 per side)."""
    if len(gt_info) == 0:
        return torch.zeros(0, dtype=torch.bool)
    return (gt_info[:, 2] == 0) & (gt_boxes[:, 2] > gt_boxes[:, 0]) & (gt_boxes[:, 3] > gt_boxes[:, 1])
