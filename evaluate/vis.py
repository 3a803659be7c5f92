"""Overlays for ``boxrefine evaluate --vis``: ground truth, coarse and refined boxes over the image.

This is the one place outside ``extract`` that opens image files (docs/architecture.md, invariant 1, names it
as the single exception); ``evaluate/run.py`` imports it only when ``--vis`` is given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from boxrefine.shared.data.imageio import read_rgb
from boxrefine.shared.data.intensity import ImageError, Intensity
from boxrefine.shared.data.overlay import (  # noqa: F401  (line_width: part of this module's API)
    COARSE_COLOUR,
    GT_COLOUR,
    REFINED_COLOUR,
    draw_boxes,
    line_width,
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
