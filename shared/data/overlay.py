"""Drawing boxes over an image with a legend: the overlays of ``evaluate --vis`` and ``refine --vis``
(both decode the image themselves; this module only draws on arrays)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from boxrefine.shared.runtime.fileio import atomic_write_bytes

# RGB
GT_COLOUR = (0, 200, 0)
COARSE_COLOUR = (230, 30, 30)
REFINED_COLOUR = (30, 90, 255)


def draw_boxes(img: np.ndarray, boxes: np.ndarray, colour: tuple[int, int, int], thickness: int) -> None:
    """Draw xyxy boxes (original px) on an H×W×3 uint8 image in place; non-finite boxes are skipped."""
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        if not np.isfinite([x0, y0, x1, y1]).all():
            continue
        cv2.rectangle(img, (int(round(x0)), int(round(y0))), (int(round(x1)) - 1, int(round(y1)) - 1), colour,
                      thickness, lineType=cv2.LINE_AA)


def line_width(hw: tuple[int, int]) -> int:
    """Box line width for an image: 1 px up to 400 px, growing with the image so boxes stay visible."""
    return max(1, int(round(max(hw) / 400)))


def with_legend(img: np.ndarray, items: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """The image with a white legend band *above* it (never over its boxes), text scaled to the
    image (readable on a 64-px crop and on a 4000-px photo alike)."""
    scale = min(max(max(img.shape[:2]) / 1400, 0.35), 2.0)
    th = max(1, int(round(scale * 1.5)))
    sizes = [cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, th) for text, _ in items]
    line_h = max(h + base for (_, h), base in sizes) + 4
    width = max(img.shape[1], max(w for (w, _), _ in sizes) + 8)
    canvas = np.full((img.shape[0] + line_h * len(items) + 4, width, 3), 255, np.uint8)
    canvas[line_h * len(items) + 4:, :img.shape[1]] = img
    for k, ((text, colour), ((_, h), _)) in enumerate(zip(items, sizes, strict=True)):
        cv2.putText(canvas, text, (4, 2 + k * line_h + h), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, th, cv2.LINE_AA)
    return canvas


def png_bytes(img: np.ndarray) -> bytes:
    """An RGB image encoded as PNG (cv2 encodes BGR)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError("cannot encode a PNG")
    return buf.tobytes()


def write_png(path: str | Path, img: np.ndarray) -> None:
    """An RGB image as a PNG file, through the atomic writer (the user's umask, never a torn file)."""
    atomic_write_bytes(path, png_bytes(img))
