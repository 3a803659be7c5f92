"""Box utilities (xyxy unless named otherwise). IoU and friends come from torchvision.ops."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou, masks_to_boxes


def xywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[..., :2], b[..., :2] + b[..., 2:]], -1)


def xyxy_to_xywh(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[..., :2], b[..., 2:] - b[..., :2]], -1)


def paired_iou(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """IoU of a[i] with b[i] (n×4 each) → n, via torchvision.ops.box_iou in chunks."""
    if len(a) == 0:
        return torch.zeros(0, dtype=torch.float32)
    out = [box_iou(a[i:i + chunk].float(), b[i:i + chunk].float()).diagonal() for i in range(0, len(a), chunk)]
    return torch.cat(out)


def scale_boxes(boxes: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """Map boxes between frames of one image (original px ↔ 1024-px model input), per axis, as
    ``ResizeLongestSide.apply_boxes`` does."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def clip_boxes(boxes: torch.Tensor, hw: tuple[int, int], min_size: float = 1.0) -> torch.Tensor:
    """Clip to the image and keep at least ``min_size`` wide/high (x1 ≥ x0 + min_size)."""
    h, w = hw
    x0 = boxes[..., 0].clamp(0, w - min_size)
    y0 = boxes[..., 1].clamp(0, h - min_size)
    x1 = torch.maximum(boxes[..., 2].clamp(0, w), x0 + min_size)
    y1 = torch.maximum(boxes[..., 3].clamp(0, h), y0 + min_size)
    return torch.stack([x0, y0, x1, y1], -1)


def jitter_boxes(boxes: torch.Tensor, r: float, hw: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """The usual noisy-box model: shift the centre by U(-r, r)·w and U(-r, r)·h, scale width and
    height by 1 + U(-r, r) each, clip to the image."""
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


def mask_logits_to_boxes(logits: torch.Tensor, fallback: torch.Tensor, scale: float = 4.0) -> torch.Tensor:
    """Tight boxes of ``logits > 0`` (n×H×W low-res masks) in the 1024-px input frame: pixel-tight,
    so a mask covering columns 3..5 gives x0=3, x1=6, times ``scale``. Empty masks → ``fallback``."""
    fg = logits > 0
    out = fallback.clone().float()
    nonempty = fg.flatten(1).any(1)
    if nonempty.any():
        b = masks_to_boxes(fg[nonempty]).float()
        b[:, 2:] += 1
        out[nonempty] = b * scale
    return out


def trainable_gt(gt_boxes: torch.Tensor, gt_info: torch.Tensor) -> torch.Tensor:
    """Which GT instances may be a training target: not crowd and of positive width and height (a
    zero-size box has no GIoU gradient worth following and a loss up to 2 per side)."""
    if len(gt_info) == 0:
        return torch.zeros(0, dtype=torch.bool)
    return (gt_info[:, 2] == 0) & (gt_boxes[:, 2] > gt_boxes[:, 0]) & (gt_boxes[:, 3] > gt_boxes[:, 1])
