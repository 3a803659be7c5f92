"""Overlays for ``boxrefine evaluate --vis`` (ground truth, coarse and refined boxes over the image) and
the crops of the report's galleries (the boxes that gained and lost most, enlarged).

This is the one place outside ``extract`` that opens image files (docs/architecture.md, invariant 1, names it
as the single exception); evaluate imports it only when it draws: ``--vis``, or a gallery whose image
folder is there (``evaluate.gallery``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from boxrefine.shared.data.imageio import read_rgb
from boxrefine.shared.data.intensity import ImageError, Intensity
from boxrefine.shared.data.overlay import (  # noqa: F401  (line_width: part of this module's API)
    COARSE_COLOUR,
    GT_COLOUR,
    REFINED_COLOUR,
    draw_boxes,
    line_width,
    png_bytes,
    with_legend,
    write_png,
)
from boxrefine.shared.data.records import DataError, load_coco, resolve_image
from boxrefine.shared.runtime.console import console
from boxrefine.shared.scoring.predict import ImagePrediction


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
        try:
            path = resolve_image(Path(images_root), rec.file_name)
            img = read_rgb(path, intensity)
        except (ImageError, DataError) as e:
            console.print(f"--vis: {e}; skipped", style="yellow", soft_wrap=True, markup=False)
            continue
        if img.shape[:2] != (rec.height, rec.width):
            console.print(f"--vis: {path}: image is {img.shape[1]}x{img.shape[0]}, annotations say "
                          f"{rec.width}x{rec.height}; skipped", style="yellow", soft_wrap=True, markup=False)
            continue
        img = np.ascontiguousarray(img)
        t = line_width(img.shape[:2])
        draw_boxes(img, gt_of(p), GT_COLOUR, t)
        draw_boxes(img, p.coarse.numpy(), COARSE_COLOUR, 2 * t)  # wider: stays visible under a refined box
        if p.refined is not None:
            draw_boxes(img, p.refined.numpy(), REFINED_COLOUR, t)
        img = with_legend(img, [("ground truth", GT_COLOUR), ("coarse", COARSE_COLOUR),
                                (f"refined ({label})", REFINED_COLOUR)])
        dst = out_dir / f"{split}_{rec.image_id}_{Path(rec.file_name).stem}.png"
        write_png(dst, img)
        written.append(dst)
    return written


@dataclass
class GalleryBox:
    """One box of the report's galleries: its image (store row → key), boxes (xyxy, original px) and IoUs."""

    key: int
    gt: np.ndarray
    coarse: np.ndarray
    refined: np.ndarray
    coarse_iou: float
    refined_iou: float


CROP_SIDE = 224  # px: the longest side of a gallery crop, however small the object


def crop_box(img: np.ndarray, box: GalleryBox) -> np.ndarray:
    """The region around a box's GT, coarse and refined boxes (padded by a quarter of their extent, at
    least 8 px), scaled so its longest side is CROP_SIDE (pixels kept sharp when enlarged), with the
    three boxes drawn at that scale: GT green, coarse red (wider), refined blue."""
    h, w = img.shape[:2]
    every = np.stack([box.gt, box.coarse, box.refined])
    x0, y0 = every[:, :2].min(0)
    x1, y1 = every[:, 2:].max(0)
    pad = max(8.0, 0.25 * max(x1 - x0, y1 - y0))
    cx0, cy0 = int(max(0, np.floor(x0 - pad))), int(max(0, np.floor(y0 - pad)))
    cx1, cy1 = int(min(w, np.ceil(x1 + pad))), int(min(h, np.ceil(y1 + pad)))
    crop = img[cy0:max(cy1, cy0 + 1), cx0:max(cx1, cx0 + 1)]
    scale = CROP_SIDE / max(crop.shape[:2])
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    big = cv2.resize(crop, size, interpolation=cv2.INTER_NEAREST if scale >= 1 else cv2.INTER_AREA)
    big = np.ascontiguousarray(big)
    shift = np.array([cx0, cy0, cx0, cy0], np.float64)
    # coarse wider, refined over it: a refined box that barely moved still shows the coarse one
    for b, colour, width in ((box.gt, GT_COLOUR, 2), (box.coarse, COARSE_COLOUR, 4), (box.refined, REFINED_COLOUR, 2)):
        draw_boxes(big, ((np.asarray(b, np.float64) - shift) * scale)[None], colour, width)
    return big


def gallery_crops(images_root: Path, annotations: Path, boxes: list[GalleryBox], intensity: Intensity | None = None
                  ) -> tuple[list[bytes | None], list[str], str]:
    """PNG bytes of each box's crop (None where its image cannot be read), its image's file name, and
    what went wrong (empty when every crop was drawn). Each image is decoded once, as the encoder saw
    it (``intensity``)."""
    try:
        records = {r.key: r for r in load_coco(annotations).images}
    except DataError as e:
        return [None] * len(boxes), [""] * len(boxes), str(e)
    images: dict[int, np.ndarray | None] = {}
    problems: list[str] = []
    out: list[bytes | None] = []
    for b in boxes:
        if b.key not in images:
            rec = records.get(b.key)
            try:
                images[b.key] = read_rgb(resolve_image(Path(images_root), rec.file_name), intensity) if rec else None
            except ImageError as e:
                images[b.key] = None
                problems.append(str(e))
        img = images[b.key]
        out.append(None if img is None else png_bytes(crop_box(img, b)))
    names = [records[b.key].file_name if b.key in records else "" for b in boxes]
    return out, names, "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
