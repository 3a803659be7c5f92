"""Overlays for ``boxrefine evaluate --vis``: ground truth, coarse and refined boxes over the image.

This is the one place outside ``extract`` that opens image files (docs/architecture.md, invariant 1, names it
as the single exception); ``evaluate/run.py`` imports it only when ``--vis`` is given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from boxrefine.shared.console import console
from boxrefine.shared.imageio import ImageError, Intensity, read_rgb
from boxrefine.shared.records import DataError, load_coco, resolve_image
from boxrefine.shared.scoring import ImagePrediction

# RGB
GT_COLOUR = (0, 200, 0)
COARSE_COLOUR = (230, 30, 30)
REFINED_COLOUR = (30, 90, 255)


def _draw_boxes(img: np.ndarray, boxes: np.ndarray, colour: tuple[int, int, int], thickness: int) -> None:
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


def draw_overlays(images_root: Path, annotations: Path, preds: list[ImagePrediction],
                  gt_of: Callable[[ImagePrediction], np.ndarray], out_dir: Path, count: int, split: str,
                  label: str, intensity: Intensity | None = None) -> list[Path]:
    """Write up to ``count`` PNGs (first images with boxes, in store order): GT green, coarse red,
    refined blue, over the image as the encoder saw it (``intensity``, as extract maps it), with the
    legend above. An image that cannot be read is reported and skipped."""
    try:
        records = {r.key: r for r in load_coco(annotations).images}
    except DataError as e:
        console.print(f"--vis: {e}; no overlays", style="yellow", soft_wrap=True, markup=False)
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for p in preds:
        if len(written) >= count:
            break
        rec = records.get(p.key)
        if rec is None or len(p.coarse) == 0:
            continue
        path = resolve_image(Path(images_root), rec.file_name)
        try:
            img = read_rgb(path, intensity)
        except ImageError as e:
            console.print(f"--vis: {e}; skipped", style="yellow", soft_wrap=True, markup=False)
            continue
        if img.shape[:2] != (rec.height, rec.width):
            console.print(f"--vis: {path}: image is {img.shape[1]}x{img.shape[0]}, annotations say "
                          f"{rec.width}x{rec.height}; skipped", style="yellow", soft_wrap=True, markup=False)
            continue
        img = np.ascontiguousarray(img)
        t = line_width(img.shape[:2])
        _draw_boxes(img, gt_of(p), GT_COLOUR, t)
        _draw_boxes(img, p.coarse.numpy(), COARSE_COLOUR, 2 * t)  # wider: stays visible under a refined box
        if p.refined is not None:
            _draw_boxes(img, p.refined.numpy(), REFINED_COLOUR, t)
        img = with_legend(img, [("ground truth", GT_COLOUR), ("coarse", COARSE_COLOUR),
                                (f"refined ({label})", REFINED_COLOUR)])
        dst = out_dir / f"{split}_{rec.image_id}_{Path(rec.file_name).stem}.png"
        if not cv2.imwrite(str(dst), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
            raise OSError(f"{dst}: cannot write overlay")
        written.append(dst)
    return written
